"""Smoke test of ``bench/fuzz_api.py``: the quick run (``--quick``), in a subprocess.

It starts a real ``kgdx serve``, makes a result and a study, runs schemathesis over every
operation of the OpenAPI document (5 cases per operation and phase, seeded), and must exit 0
(no server error but 503 backpressure, every answer declared with its schema, nothing
unhandled in the server's log) with a final JSON line carrying every figure. It takes about
40-70 s on 2 busy cores; the subprocess is stopped after 170 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.runner import run_bench

KEYS = {
    "operations",
    "cases",
    "failures",
    "failures_by_check",
    "schemathesis_errors",
    "server_errors",
    "statuses",
    "fuzz_s",
    "wall_s",
    "pass",
}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]


def test_quick_run_passes_and_reports_every_figure(tmp_path: Path) -> None:
    run = run_bench("fuzz_api.py", ["--quick"], tmp_path / "unused-home", timeout_s=170)
    assert run.returncode == 0, run.output[-6000:]
    figures = run.figures
    assert not KEYS - set(figures), sorted(KEYS - set(figures))
    assert figures["pass"] is True and figures["quick"] is True
    assert figures["failures"] == [] and figures["failures_by_check"] == {}
    assert figures["schemathesis_errors"] == [] and figures["server_errors"] == []
    assert figures["errors"] == []
    ops = figures["operations"]
    assert ops["total"] >= 15  # every route of the API is in the document
    if figures["stopped_at_time_bound"]:  # a very busy machine: a partial run still counts
        assert ops["tested"] >= 1
    else:
        assert ops["tested"] == ops["total"]
        # The seeded ids and files carry cases past 404 / 415 to the routes' real work.
        statuses = figures["statuses"]
        for op in ("GET /v1/results/{result_id}", "GET /v1/concepts/{concept_id}"):
            assert "200" in statuses[op], (op, statuses[op])
    assert figures["cases"]["generated"] > ops["tested"]
    for line in ("operations tested", "cases generated", "failures by check", "wall time"):
        assert line in run.stdout, line
    # No wall-clock assertion: speed lives in the figures; the subprocess timeout bounds it.
    print(f"fuzz_api --quick: {run.elapsed_s:.1f} s, {figures['cases']['generated']} cases")
