"""Smoke test of ``bench/load_test.py``: the short mode, in a subprocess.

It builds the tiny checkpoint, starts a real ``kgdx serve`` with a queue of 4, drives
``/v1/predict`` and STOW-RS with 4, 8 and 16 clients for about 20 s, reads every result
and stored instance back, and must exit 0 with every figure printed. It takes about
40-70 s on 2 busy cores; the subprocess is stopped after 240 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runner import run_bench

PHASES = ("warm-up", "1x", "2x", "4x", "total")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_short_mode_passes_and_prints_the_figures(tmp_path: Path) -> None:
    run = run_bench("load_test.py", ["--short"], tmp_path / "unused-home", timeout_s=240)
    assert run.returncode == 0, run.output[-4000:]
    figures = run.figures
    assert figures["pass"] is True and figures["failures"] == []
    assert figures["mode"] == "short" and figures["checkpoint"] == "tiny"
    assert figures["levels"] == [4, 8, 16] and figures["max_queue"] == 4
    assert set(figures["phases"]) == set(PHASES)
    total = figures["phases"]["total"]
    assert total["ok"] > 0 and total["ok_per_s"] > 0
    assert total["p99_ms"] >= total["p50_ms"] > 0
    assert set(total["routes"]) == {"predict", "stow"}
    statuses = total["statuses"]
    assert statuses["predict 200"] > 0 and statuses["stow 200"] > 0
    assert set(statuses) <= {"predict 200", "predict 503", "stow 200", "stow 503"}
    for name in ("rss_start_mb", "rss_end_mb", "rss_peak_mb", "rss_growth_pct"):
        assert name in figures, name
    assert figures["rss_end_mb"] > 0 and figures["rss_start_mb"] > 0
    verify = figures["verify"]
    assert verify["results_found"] == verify["results_expected"] > 0
    assert verify["instances_found"] == verify["instances_expected"] > 0
    for line in ("warm-up", "total", "server RSS:", "verified in", "PASS"):
        assert line in run.stdout, line
    # No wall-clock assertion (speed lives in the figures); the subprocess timeout bounds it.
    print(f"load_test --short: {run.elapsed_s:.1f} s")
