"""Fail points: named places where a test can make this process die (a testing aid only).

Crash-recovery tests need a process killed at an exact point (an instance stored but not
answered, a job claimed but its result not written, an SR sent but not recorded), and a
kill timed from outside lands anywhere. A fail point is a call, ``failpoint("stow.mid_body")``,
at such a place in the product code, in the manner of FoundationDB's ``BUGGIFY`` and TiKV's
``fail-rs``. It does nothing unless ``$KGDX_FAILPOINTS`` (comma-separated names, read when
this module is first imported) names it; then it writes ``kgdx failpoint <name>: SIGKILL``
to stderr and sends SIGKILL to its own process: no ``finally`` block, no shutdown hook, no
flush runs, as in a power cut or an OOM kill. Never set the variable in production.

The check is a lookup in a frozen set, empty unless armed. An unknown name in the variable
fails at import with the list of known ones, so a misspelt test cannot wait for a kill that
never comes.

The points (:data:`POINTS`):

========================  ========================================================================
stow.mid_body             STOW-RS: the first part of a multi-part body is handled (stored when
                          valid), the later ones are still spool files; no answer went out.
stow.before_response      STOW-RS: every part is stored; no answer went out.
worker.before_enqueue     The study is quiet and about to become a job (its instances were
                          acknowledged); no job row yet.
worker.inference          A claimed job's images are scored; no result is written.
worker.results_stored     The job's results are written; the job has not recorded them.
sr_push.before_send       The job's SR is built and recorded; it is about to be sent.
sr_push.after_send        The destination accepted the SR; the push is not recorded.
========================  ========================================================================

Example (a test)::

    server = KgdxServer(home, {"KGDX_FAILPOINTS": "worker.inference"}).start()
    ...  # send a study; the server dies with SIGKILL once the job is scored
    del server.settings["KGDX_FAILPOINTS"]
    server.restart()
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "POINTS", "armed", "failpoint", "parse"]

#: The environment variable naming the armed points.
ENV = "KGDX_FAILPOINTS"

#: Every fail point and where it sits.
POINTS: dict[str, str] = {
    "stow.mid_body": "STOW-RS: the first part of a body handled, the others not; no answer sent",
    "stow.before_response": "STOW-RS: every part stored; no answer sent",
    "worker.before_enqueue": "a quiet study is about to become a job",
    "worker.inference": "a claimed job is scored; no result written",
    "worker.results_stored": "a job's results are written but not recorded on the job",
    "sr_push.before_send": "an SR is built and recorded; not sent yet",
    "sr_push.after_send": "the destination accepted an SR; the push is not recorded",
}


def parse(value: str | None) -> frozenset[str]:
    """The point names in a ``$KGDX_FAILPOINTS`` value.

    Raises:
        ValueError: a name that is not in :data:`POINTS` (the message lists the known ones).
    """
    names = frozenset(n.strip() for n in (value or "").split(",") if n.strip())
    unknown = sorted(names - POINTS.keys())
    if unknown:
        raise ValueError(
            f"{ENV} names unknown fail point(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(POINTS))}"
        )
    return names


_ARMED: frozenset[str] = parse(os.environ.get(ENV))


def armed() -> frozenset[str]:
    """The points armed in this process."""
    return _ARMED


def failpoint(name: str) -> None:
    """Die here with SIGKILL if ``name`` is armed; otherwise do nothing."""
    if name in _ARMED:
        os.write(2, f"kgdx failpoint {name}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
