"""Runs a bench script as the smoke tests do: a subprocess in the repository, on a
throwaway ``$KGDX_HOME``, its last stdout line the figures as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kgdx_server import child_env

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BenchRun:
    """What a bench script printed, and its figures."""

    returncode: int
    stdout: str
    output: str  # stdout then stderr, for failure messages
    figures: dict[str, Any]
    elapsed_s: float


def run_bench(script: str, args: list[str], home: Path, timeout_s: float) -> BenchRun:
    """Run ``bench/<script>`` with ``args``; the subprocess is stopped after ``timeout_s``.

    ``figures`` is the last stdout line parsed as JSON, or ``{}`` when it is not JSON (the
    caller's assertion on ``returncode`` then shows ``output``).
    """
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        env=child_env(home),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = res.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        figures = {}
    return BenchRun(
        res.returncode, res.stdout, res.stdout + res.stderr, figures, time.monotonic() - t0
    )
