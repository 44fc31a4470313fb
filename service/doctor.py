"""``kgdx doctor``: check that the database and the files under ``$KGDX_HOME`` agree; repair.

A crash (SIGKILL, power cut, OOM) can stop kgdx between two steps that the code keeps in
order but cannot make one: a STOW-RS body half spooled, an instance file placed whose row
never committed, a job claimed by a process that is gone. The service recovers most of it
by itself when it starts and on every worker pass (:mod:`service.study_worker`); the doctor
checks the same invariants from outside, says what it found, and with ``repair=True`` applies
the service's own recovery (the same functions, so the two always agree) plus the repairs
the service does not attempt.

The invariants, derived from the tables (``svc_instances``, ``svc_jobs``, ``svc_job_srs``,
``svc_results``) and the files (``instances/``, ``spool/``); for each check, what a finding
is and what ``repair`` does:

- ``instance-file-missing``: an instance row whose file is gone. Repair: drop the row (the
  PACS may re-send the instance), unless a running or done job used it; then it is left for
  the operator: re-send the instance, and the faithful copy puts the file back.
- ``instance-file-damaged``: an instance file whose size or SHA-256 differs from its row.
  Repair: as above, and the damaged file goes with the row.
- ``instance-path-invalid``: a row whose path is not ``<study>/<series>/<sop>.dcm`` of its
  own UIDs (a tampered database). Reported only.
- ``orphan-file``: a file under ``instances/`` that no row names: a crash between placing
  the file and committing its row, so the request was never answered. Repair: remove it.
- ``temp-file``: a file in ``spool/``, a STOW-RS body that never finished. Repair: remove it
  (the service removes them itself at start once they are an hour old).
- ``job-state-unknown``: a job outside ``queued running done failed``. Reported only.
- ``job-owner-gone``: a ``running`` job whose process on this host is gone. Repair: back to
  ``queued`` (:meth:`~service.jobs.JobQueue.recover_dead_owners`, as the service at start).
- ``job-lease-expired``: a ``running`` job whose lease has passed. Repair: back to
  ``queued``, or ``failed`` when its tries are spent
  (:meth:`~service.jobs.JobQueue.recover_expired`, as every worker pass).
- ``instance-job-missing``: an instance attached to a job that does not exist. Repair:
  detach it, so that it gets a job again.
- ``study-without-job``: a study quiet for ``stable_seconds`` whose new instances have no
  job. Repair: make the job (:meth:`~service.jobs.JobQueue.enqueue_study`, as every worker
  pass).
- ``job-results-missing``, ``job-sr-missing``, ``job-push-incomplete``: a ``done`` job
  whose results are not all stored, that lacks an SR per result, or whose SRs are not all
  recorded as accepted by the destination (checked when a destination is configured, or
  when the job says it pushed). Repair: back to ``queued`` with those checkpoints cleared;
  result ids and SR UIDs are derived from the job, so redoing a step makes the same
  objects, and a re-pushed SR lands on itself at the destination.
- ``sr-without-job``: a stored SR whose job does not exist. Reported only.

Files younger than ``grace_s`` (default :data:`service.instances.SPOOL_MAX_AGE_S`, the age
at which the service removes spool files) may belong to a request in progress: they are
listed as notes, not problems, and left alone. With the service stopped, ``grace_s=0``
removes every leftover at once. Studies still inside ``stable_seconds`` are notes too.

The report names instances and studies by :func:`service.logs.hash_uid`, as the logs do,
never by their UIDs; jobs by their (random) ids.

Example::

    with ServiceDatabase() as db:
        db.create_all()
        report = examine(db, kgdx_home(), repair=True, grace_s=0)
    report.healthy, [f.check for f in report.problems]
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from service.db import ServiceDatabase, results, utcnow
from service.instances import (
    SPOOL_MAX_AGE_S,
    InstanceIdentity,
    InstanceRow,
    InstanceStore,
    file_digest,
    instances,
    is_valid_uid,
)
from service.jobs import JobQueue, job_srs, jobs, owner_gone, owner_id
from service.logs import hash_uid

__all__ = ["CHECKS", "DoctorReport", "Finding", "examine"]

#: Every check, in the order it runs, with what a finding means.
CHECKS: dict[str, str] = {
    "instance-file-missing": "instance rows whose file is gone",
    "instance-file-damaged": "instance files whose size or SHA-256 differs from their row",
    "instance-path-invalid": "instance rows whose path is not <study>/<series>/<sop>.dcm",
    "orphan-file": "files under instances/ that no row names",
    "temp-file": "spool files of STOW-RS requests that never finished",
    "job-state-unknown": "jobs in an unknown state",
    "job-owner-gone": "running jobs whose process on this host is gone",
    "job-lease-expired": "running jobs whose lease has passed",
    "instance-job-missing": "instances attached to a job that does not exist",
    "study-without-job": "quiet studies whose new instances have no job",
    "job-results-missing": "done jobs whose results are not all stored",
    "job-sr-missing": "done jobs without an SR per result",
    "job-push-incomplete": "done jobs whose SRs are not all accepted by the destination",
    "sr-without-job": "stored SRs whose job does not exist",
}

_JOB_STATES = ("queued", "running", "done", "failed")


@dataclass
class Finding:
    """One thing the doctor found.

    Attributes:
        check: a key of :data:`CHECKS`.
        subject: what it is about (``instance <hash>``, ``job <id>``, ``spool/<file>``).
        detail: what is wrong, in a few words.
        problem: ``False`` for a note (a file or study that may still be in progress).
        action: what ``--repair`` does (did) about it; ``None`` when it cannot repair it.
        repaired: whether this run repaired it.
    """

    check: str
    subject: str
    detail: str
    problem: bool = True
    action: str | None = None
    repaired: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DoctorReport:
    """What :func:`examine` found and did.

    Attributes:
        home: the ``$KGDX_HOME`` examined.
        database: the database URL, password hidden.
        repair: whether repairs were applied.
        checked: how many of each kind of thing were looked at.
        findings: problems and notes, in check order.
    """

    home: str
    database: str
    repair: bool
    checked: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """Problems (repaired or not)."""
        return [f for f in self.findings if f.problem]

    @property
    def remaining(self) -> list[Finding]:
        """Problems this run did not repair."""
        return [f for f in self.problems if not f.repaired]

    @property
    def repaired(self) -> list[Finding]:
        return [f for f in self.problems if f.repaired]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if not f.problem]

    @property
    def healthy(self) -> bool:
        """No problem left (after the repairs, if any were made)."""
        return not self.remaining

    def by_check(self) -> dict[str, dict[str, int]]:
        """Per check: problems ``found``, ``repaired``, ``left``, and ``notes``."""
        table = {c: {"found": 0, "repaired": 0, "left": 0, "notes": 0} for c in CHECKS}
        for f in self.findings:
            row = table[f.check]
            if not f.problem:
                row["notes"] += 1
                continue
            row["found"] += 1
            row["repaired" if f.repaired else "left"] += 1
        return table

    def summary(self) -> str:
        """One line for people."""
        things = ", ".join(
            f"{n} {kind.replace('_', ' ').replace('srs', 'SRs')}"
            for kind, n in self.checked.items()
        )
        if not self.problems:
            return f"healthy: the database and the files agree ({things} checked)"
        if self.healthy:
            return f"repaired {len(self.repaired)} problem(s); healthy now ({things} checked)"
        left = len(self.remaining)
        fixable = sum(1 for f in self.remaining if f.action is not None)
        hint = (
            f"; `kgdx doctor --repair` repairs {fixable} of them"
            if fixable and not self.repair
            else ""
        )
        done = f"repaired {len(self.repaired)}, " if self.repair else ""
        return f"unhealthy: {done}{left} problem(s) left{hint} ({things} checked)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "repair": self.repair,
            "home": self.home,
            "database": self.database,
            "checked": dict(self.checked),
            "summary": {
                "problems": len(self.problems),
                "repaired": len(self.repaired),
                "remaining": len(self.remaining),
                "notes": len(self.notes),
            },
            "checks": self.by_check(),
            "findings": [f.to_dict() for f in self.findings],
        }


def examine(
    db: ServiceDatabase,
    home: Path | str,
    *,
    repair: bool = False,
    grace_s: float = SPOOL_MAX_AGE_S,
    stable_seconds: float = 5.0,
    verify_hashes: bool = True,
    destination_configured: bool = False,
    max_attempts: int = 5,
    now: float | None = None,
) -> DoctorReport:
    """Check (and with ``repair``, repair) a kgdx home and its database.

    Args:
        db: the service database, tables created.
        home: the ``$KGDX_HOME`` whose ``instances/`` and ``spool/`` the database describes.
        repair: apply the repairs of the table in the module doc.
        grace_s: files younger than this are notes (a request may still be writing them).
        stable_seconds: the service's ``stable_seconds``: a study quiet this long should
            have a job.
        verify_hashes: read every instance file for its SHA-256 (sizes are always compared).
        destination_configured: SRs are pushed to a PACS, so every done job must have
            pushed its SRs.
        max_attempts: the service's ``job_max_attempts`` (an expired job that used them all
            fails instead of going back to the queue, as in the service).
        now: epoch seconds (tests pass a fixed one).

    Raises:
        ValueError: ``grace_s`` or ``stable_seconds`` is negative.
    """
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s!r}")
    if stable_seconds < 0:
        raise ValueError(f"stable_seconds must be >= 0, got {stable_seconds!r}")
    home = Path(home)
    store = InstanceStore(db, home / "instances", home / "spool")
    queue = JobQueue(db, max_attempts=max_attempts)
    doctor = _Doctor(
        db=db,
        home=home,
        store=store,
        queue=queue,
        repair=repair,
        grace_s=grace_s,
        stable_seconds=stable_seconds,
        verify_hashes=verify_hashes,
        destination_configured=destination_configured,
        now=time.time() if now is None else now,
    )
    return doctor.run()


@dataclass
class _Doctor:
    db: ServiceDatabase
    home: Path
    store: InstanceStore
    queue: JobQueue
    repair: bool
    grace_s: float
    stable_seconds: float
    verify_hashes: bool
    destination_configured: bool
    now: float
    report: DoctorReport = field(init=False)

    def __post_init__(self) -> None:
        self.report = DoctorReport(home=str(self.home), database=self.db.url, repair=self.repair)

    def add(self, finding: Finding) -> Finding:
        self.report.findings.append(finding)
        return finding

    def run(self) -> DoctorReport:
        self.check_instances()
        self.check_orphans()
        self.check_spool()
        self.check_running_jobs()
        self.check_dangling_job_ids()
        self.check_studies()
        self.check_done_jobs()
        order = list(CHECKS)
        self.report.findings.sort(key=lambda f: order.index(f.check))
        return self.report

    # -- reading -------------------------------------------------------------------------

    def _instance_rows(self) -> list[InstanceRow]:
        with self.db.read() as conn:
            rows = conn.execute(select(instances)).all()
        return [InstanceRow(**dict(r._mapping)) for r in rows]

    def _job_states(self) -> dict[str, str]:
        with self.db.read() as conn:
            return {str(i): str(s) for i, s in conn.execute(select(jobs.c.id, jobs.c.state))}

    # -- instances and their files -------------------------------------------------------

    def check_instances(self) -> None:
        rows = self._instance_rows()
        states = self._job_states()
        self.report.checked["instances"] = len(rows)
        for row in rows:
            subject = f"instance {hash_uid(row.sop_instance_uid)}"
            expected = _expected_path(row)
            if expected is None or row.path != expected:
                self.add(
                    Finding(
                        "instance-path-invalid",
                        subject,
                        "its path is not <study>/<series>/<sop>.dcm of its own UIDs",
                    )
                )
                continue
            path = self.store.root / row.path
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                self._damaged(row, states, "instance-file-missing", subject, "its file is gone")
                continue
            if size != row.size:
                detail = f"its file has {size} bytes, the row says {row.size}"
                self._damaged(row, states, "instance-file-damaged", subject, detail)
            elif self.verify_hashes and file_digest(path)[1] != row.sha256:
                detail = "its file's SHA-256 differs from the row's"
                self._damaged(row, states, "instance-file-damaged", subject, detail)

    def _damaged(
        self, row: InstanceRow, states: dict[str, str], check: str, subject: str, detail: str
    ) -> None:
        state = states.get(row.job_id) if row.job_id is not None else None
        if state in ("running", "done"):
            # Its result and SR stand; dropping the row would let a re-send make a second job.
            self.add(
                Finding(
                    check,
                    subject,
                    f"{detail}; a {state} job used it: re-send the instance from the PACS, "
                    "a faithful copy is put back",
                )
            )
            return
        finding = self.add(
            Finding(check, subject, detail, action="drop the row (the PACS may re-send it)")
        )
        if not self.repair:
            return
        with self.db.write() as conn:
            gone = conn.execute(
                delete(instances).where(
                    instances.c.sop_instance_uid == row.sop_instance_uid,
                    instances.c.sha256 == row.sha256,
                )
            ).rowcount
        if not gone:  # changed since we looked (a re-send put the file back): leave it
            return
        path = self.store.root / row.path
        if check == "instance-file-damaged":
            path.unlink(missing_ok=True)
        _prune_dirs(path.parent, self.store.root)
        finding.repaired = True
        finding.action = "row dropped" + (", damaged file removed" if "damaged" in check else "")

    def check_orphans(self) -> None:
        root = self.store.root
        with self.db.read() as conn:
            known = {str(p) for p in conn.execute(select(instances.c.path)).scalars()}
        files = [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]
        self.report.checked["instance_files"] = len(files)
        for path in files:
            rel = path.relative_to(root).as_posix()
            if rel in known:
                continue
            subject = f"file {_redact(rel)}"
            if not self._old(path):
                self.add(
                    Finding(
                        "orphan-file",
                        subject,
                        "no row names it; it is recent and may be a request in progress",
                        problem=False,
                    )
                )
                continue
            finding = self.add(
                Finding(
                    "orphan-file",
                    subject,
                    "no row names it (its STOW-RS request never committed)",
                    action="remove the file",
                )
            )
            if self.repair:
                with self.db.read() as conn:  # a row committed since we looked keeps it
                    taken = conn.execute(
                        select(instances.c.sop_instance_uid).where(instances.c.path == rel)
                    ).first()
                if taken is None:
                    path.unlink(missing_ok=True)
                    _prune_dirs(path.parent, root)
                    finding.repaired, finding.action = True, "file removed"

    def check_spool(self) -> None:
        spool = self.store.spool
        files = sorted(p for p in spool.iterdir() if p.is_file() or p.is_symlink())
        self.report.checked["temp_files"] = len(files)
        for path in files:
            subject = f"spool/{path.name}"
            if not self._old(path):
                self.add(
                    Finding(
                        "temp-file",
                        subject,
                        "a STOW-RS request may still be writing it",
                        problem=False,
                    )
                )
                continue
            finding = self.add(
                Finding(
                    "temp-file",
                    subject,
                    "left by a STOW-RS request that never finished",
                    action="remove the file",
                )
            )
            if self.repair:
                path.unlink(missing_ok=True)
                finding.repaired, finding.action = True, "file removed"

    def _old(self, path: Path) -> bool:
        try:
            return self.now - path.lstat().st_mtime >= self.grace_s
        except FileNotFoundError:
            return False

    # -- jobs ----------------------------------------------------------------------------

    def check_running_jobs(self) -> None:
        me = owner_id()
        with self.db.read() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.state, jobs.c.owner, jobs.c.lease_until)
            ).all()
        self.report.checked["jobs"] = len(rows)
        flagged: list[tuple[str, str | None, Finding]] = []
        for r in rows:
            subject = f"job {r.id}"
            if r.state not in _JOB_STATES:
                self.add(Finding("job-state-unknown", subject, f"state {str(r.state)[:20]!r}"))
                continue
            if r.state != "running":
                continue
            if owner_gone(r.owner, me):
                finding = Finding(
                    "job-owner-gone",
                    subject,
                    "running, but the kgdx process that took it is gone",
                    action="back to the queue",
                )
            elif r.lease_until is None or float(r.lease_until) < self.now:
                finding = Finding(
                    "job-lease-expired",
                    subject,
                    "running, but its lease has passed (its worker stopped)",
                    action="back to the queue (failed if its tries are spent)",
                )
            else:
                continue
            flagged.append((r.id, r.owner, self.add(finding)))
        if not self.repair or not flagged:
            return
        # The service's own recovery, so that the doctor and the service never disagree.
        self.queue.recover_dead_owners(me)
        self.queue.recover_expired()
        for job_id, owner, finding in flagged:
            job = self.queue.get(job_id)
            if job is None or job.state != "running" or job.owner != owner:
                finding.repaired = True
                finding.action = f"now {job.state if job else 'gone'}"

    def check_dangling_job_ids(self) -> None:
        with self.db.read() as conn:
            dangling = conn.execute(
                select(instances.c.sop_instance_uid, instances.c.job_id).where(
                    instances.c.job_id.is_not(None),
                    instances.c.job_id.not_in(select(jobs.c.id)),
                )
            ).all()
        for sop, job_id in dangling:
            finding = self.add(
                Finding(
                    "instance-job-missing",
                    f"instance {hash_uid(sop)}",
                    f"attached to job {job_id}, which does not exist",
                    action="detach it so that it gets a job again",
                )
            )
            if self.repair:
                with self.db.write() as conn:
                    changed = conn.execute(
                        update(instances)
                        .where(
                            instances.c.sop_instance_uid == sop,
                            instances.c.job_id == job_id,
                        )
                        .values(job_id=None)
                    ).rowcount
                finding.repaired, finding.action = bool(changed), "detached"

    def check_studies(self) -> None:
        waiting: dict[str, list[InstanceRow]] = defaultdict(list)
        latest: dict[str, float] = {}
        for row in self._instance_rows():
            latest[row.study_uid] = max(latest.get(row.study_uid, 0.0), row.received_at)
            if row.job_id is None and row.skip_reason is None:
                waiting[row.study_uid].append(row)
        for study, rows in waiting.items():
            subject = f"study {hash_uid(study)}"
            quiet_for = self.now - latest[study]
            if quiet_for < self.stable_seconds:
                self.add(
                    Finding(
                        "study-without-job",
                        subject,
                        f"{len(rows)} instance(s) still arriving (quiet for {quiet_for:.0f} s "
                        f"of {self.stable_seconds:g})",
                        problem=False,
                    )
                )
                continue
            finding = self.add(
                Finding(
                    "study-without-job",
                    subject,
                    f"{len(rows)} instance(s) stored, quiet for {quiet_for:.0f} s, and no job",
                    action="make the job",
                )
            )
            if self.repair:
                job_id = self.queue.enqueue_study(study, stable_seconds=self.stable_seconds)
                left = [
                    r
                    for r in self.store.by_study(study)
                    if r.job_id is None and r.skip_reason is None
                ]
                finding.repaired = not left
                finding.action = (
                    f"job {job_id} queued" if job_id else "nothing to score: instances skipped"
                )

    def check_done_jobs(self) -> None:
        with self.db.read() as conn:
            done = [
                _to_job_facts(r) for r in conn.execute(select(jobs).where(jobs.c.state == "done"))
            ]
            stored = {str(i) for i in conn.execute(select(results.c.id)).scalars()}
            srs = conn.execute(
                select(
                    job_srs.c.sop_instance_uid,
                    job_srs.c.job_id,
                    job_srs.c.result_id,
                    job_srs.c.pushed_at,
                )
            ).all()
            job_ids = {str(i) for i in conn.execute(select(jobs.c.id)).scalars()}
        self.report.checked["srs"] = len(srs)
        by_job: dict[str, list[Any]] = defaultdict(list)
        for sr in srs:
            by_job[sr.job_id].append(sr)
            if sr.job_id not in job_ids:
                self.add(
                    Finding(
                        "sr-without-job",
                        f"SR of result {sr.result_id}",
                        f"its job {sr.job_id} does not exist",
                    )
                )
        for job in done:
            ids: tuple[str, ...] = job["result_ids"]
            kept = by_job.get(job["id"], [])
            reported = {sr.result_id for sr in kept}
            missing = [rid for rid in ids if rid not in stored]
            unpushed = any(sr.pushed_at is None for sr in kept)
            # A job that says it pushed must have pushed every SR; with a destination set,
            # every done job must say so (the worker only completes after the push).
            push_broken = (
                unpushed if job["sr_pushed_at"] is not None else self.destination_configured
            )
            clear: tuple[str, ...]
            if not ids or missing:
                check = "job-results-missing"
                detail = (
                    "done without results"
                    if not ids
                    else f"{len(missing)} of its {len(ids)} result(s) are not stored"
                )
                clear = ("result_id", "result_ids", "sr_sop_instance_uid", "sr_pushed_at")
            elif job["sr_sop_instance_uid"] is None or any(rid not in reported for rid in ids):
                check, detail = "job-sr-missing", "done without an SR per result"
                clear = ("sr_sop_instance_uid", "sr_pushed_at")
            elif push_broken:
                check = "job-push-incomplete"
                detail = "done, but not every SR is recorded as accepted by the destination"
                clear = ("sr_pushed_at",)
            else:
                continue
            finding = self.add(
                Finding(check, f"job {job['id']}", detail, action="back to the queue to redo it")
            )
            if self.repair and self._requeue(job["id"], clear):
                finding.repaired, finding.action = True, "queued to redo the missing steps"

    def _requeue(self, job_id: str, clear: Iterable[str]) -> bool:
        """A done job back to ``queued`` with the checkpoints in ``clear`` unset: the worker
        redoes those steps and skips the others (see :mod:`service.jobs`)."""
        values: dict[str, Any] = dict.fromkeys(clear)
        with self.db.write() as conn:
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == "done")
                .values(
                    state="queued",
                    next_attempt_at=self.now,
                    owner=None,
                    lease_until=None,
                    last_error="requeued by kgdx doctor to redo missing steps",
                    updated_at=utcnow(),
                    **values,
                )
            ).rowcount
        return bool(changed)


def _to_job_facts(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "id": m["id"],
        "result_ids": tuple(json.loads(m["result_ids"])) if m["result_ids"] else (),
        "sr_sop_instance_uid": m["sr_sop_instance_uid"],
        "sr_pushed_at": m["sr_pushed_at"],
    }


def _expected_path(row: InstanceRow) -> str | None:
    uids = (row.sop_instance_uid, row.sop_class_uid, row.study_uid, row.series_uid)
    if not all(is_valid_uid(u) for u in uids):
        return None
    return InstanceIdentity(*uids).relative_path


def _redact(rel: str) -> str:
    """A path under ``instances/`` with every UID in it replaced by its hash."""
    parts = []
    for part in rel.split("/"):
        stem, dot, ext = part.partition(".dcm") if part.endswith(".dcm") else (part, "", "")
        parts.append(f"{hash_uid(stem)}{dot}{ext}" if is_valid_uid(stem) else part)
    return "instances/" + "/".join(parts)


def _prune_dirs(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents up to ``root`` while they are empty."""
    current = folder
    while current != root and current.is_relative_to(root):
        with contextlib.suppress(OSError):  # not empty, or gone
            current.rmdir()
        if current.exists():
            return
        current = current.parent
