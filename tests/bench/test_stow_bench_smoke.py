"""Smoke test of ``bench/stow_bench.py``: the quick run, without Orthanc, in a subprocess.

It starts a real ``kgdx serve`` (tiny checkpoint), posts small STOW-RS studies and a 40 MB
one, and must exit 0 with a final JSON line carrying every figure. It takes about 15-25 s;
the subprocess is stopped after 150 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runner import run_bench

KEYS = {"checkpoint", "ingest", "memory", "orthanc", "errors", "misses", "pass", "targets"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    args = ["--quick", "--skip-orthanc"]
    run = run_bench("stow_bench.py", args, tmp_path / "unused-home", timeout_s=150)
    assert run.returncode == 0, run.output[-4000:]
    figures = run.figures
    assert not KEYS - set(figures), sorted(KEYS - set(figures))
    assert figures["pass"] is True and figures["errors"] == [] and figures["misses"] == []
    assert figures["quick"] is True
    ingest = figures["ingest"]
    assert ingest["instances"] == 10 and len(ingest["rounds"]) == 2
    for name in ("best_instances_per_s", "best_mb_per_s", "median_instances_per_s"):
        assert ingest[name] > 0, name
    memory = figures["memory"]
    assert memory["instances"] == 40 and memory["sent_mb"] == pytest.approx(40, abs=1)
    for name in ("rss_start_mb", "rss_peak_mb", "rss_growth_mb", "samples"):
        assert name in memory, name
    assert memory["rss_peak_mb"] >= memory["rss_start_mb"] > 0
    assert memory["rss_growth_mb"] < figures["targets"]["rss_growth_mb"]
    assert figures["orthanc"] == {"skipped": "--skip-orthanc"}
    assert "STOW ingest" in run.stdout and "server RSS" in run.stdout
    # About 15-25 s on 2 busy cores; no wall-clock assertion (speed lives in the figures),
    # the subprocess timeout is the bound.
    print(f"stow_bench --quick --skip-orthanc: {run.elapsed_s:.1f} s")
