"""Fail points: inert unless named in ``$KGDX_FAILPOINTS``; armed, the process dies by SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.failpoints import ENV, POINTS, armed, failpoint, parse

REPO = Path(__file__).resolve().parents[2]


def python(code: str, points: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if points is not None:
        env[ENV] = points
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_names_are_parsed_and_checked() -> None:
    assert parse(None) == parse("") == parse(" , ") == frozenset()
    assert parse(" stow.mid_body ,worker.inference") == {"stow.mid_body", "worker.inference"}
    with pytest.raises(ValueError, match=r"stow\.typo.*known: .*sr_push\.after_send"):
        parse("stow.typo")


def test_inert_by_default() -> None:
    assert ENV not in os.environ and armed() == frozenset()
    for name in POINTS:
        failpoint(name)  # nothing happens


def test_an_armed_point_kills_the_process_and_others_do_not() -> None:
    code = (
        "from service.failpoints import failpoint\n"
        "failpoint('worker.inference'); print('passed one', flush=True)\n"
        "failpoint('stow.mid_body'); print('passed two', flush=True)\n"
    )
    res = python(code, "stow.mid_body")
    assert res.returncode == -signal.SIGKILL
    assert res.stdout == "passed one\n"
    assert "kgdx failpoint stow.mid_body: SIGKILL" in res.stderr


def test_an_unknown_name_fails_at_import() -> None:
    res = python("import service.failpoints", "worker.typo")
    assert res.returncode == 1 and "unknown fail point(s) worker.typo" in res.stderr


def test_every_point_is_placed_in_the_service_exactly_once() -> None:
    source = "\n".join(
        p.read_text() for p in (REPO / "service").glob("*.py") if p.name != "failpoints.py"
    )
    placed = re.findall(r'failpoint\("([a-z_.]+)"\)', source)
    assert sorted(placed) == sorted(POINTS)
