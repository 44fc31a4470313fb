"""Smoke test of ``bench/pipeline_stages.py``: one small batch of the sample radiographs
through the bundled checkpoint, in a subprocess; every stage is timed and printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runner import run_bench

STAGES = {
    "decode",
    "preprocess",
    "forward",
    "heat maps and evidence",
    "paths (cached)",
    "paths (walk, before)",
    "findings JSON",
    "in all (cached paths)",
}

pytestmark = pytest.mark.timeout(240)


def test_every_stage_is_timed_and_printed(tmp_path: Path) -> None:
    run = run_bench(
        "pipeline_stages.py", ["--batches", "1", "--batch-size", "2"], tmp_path / "home", 200
    )
    assert run.returncode == 0, run.output[-4000:]
    ms = run.figures["ms_per_image"]
    assert set(ms) == STAGES and all(v > 0 for v in ms.values())
    assert run.figures["images"] == 2
    assert ms["in all (cached paths)"] == pytest.approx(
        sum(v for k, v in ms.items() if k not in {"paths (walk, before)", "in all (cached paths)"}),
        abs=0.01,
    )
    for stage in STAGES:
        assert stage in run.stdout


def test_bad_options_end_in_a_usage_error(tmp_path: Path) -> None:
    run = run_bench("pipeline_stages.py", ["--batches", "0"], tmp_path / "home", 60)
    assert run.returncode == 2 and "must be >= 1" in run.output
