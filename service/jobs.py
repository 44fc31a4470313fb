"""Durable study jobs: the ``svc_jobs`` table and :class:`JobQueue`.

A job is one pass over a set of new image instances of one study: select, score, store the
results, build the DICOM SR, push it to the PACS. It lives in the database, so it survives a
crash and several kgdx processes sharing PostgreSQL can work through one queue.

State machine (``state`` column)::

    (study quiet) --> queued --claim--> running --complete--> done
                        ^                  |
                        |   transient error, attempts left (backoff: next_attempt_at)
                        +------------------+
                        |   lease expired (the worker died), or released on shutdown
                        +------------------+
                                           |--permanent error, or no attempts left--> failed

``received`` is the state of a *study* whose instances have arrived but are not yet quiet
for ``stable_seconds`` (reported by ``GET /v1/studies/{uid}``); a job row is born ``queued``.

- **Idempotence.** A job takes the study's instances that have no job yet
  (``svc_instances.job_id`` NULL and not skipped), in the same transaction as its insert, so
  a re-sent instance (same SOPInstanceUID, already attached) makes no second job. When the
  only new instances of a study that already has a job cannot be scored (our own SR coming
  back from the PACS, a presentation state), they are marked skipped and no job is made.
- **Claiming.** :meth:`JobQueue.claim` picks the oldest due ``queued`` job and marks it
  ``running`` with an owner and a lease in one transaction: ``SELECT ... FOR UPDATE SKIP
  LOCKED`` on PostgreSQL (replicas never take the same job), ``BEGIN IMMEDIATE`` on SQLite.
- **Leases.** The owner renews the lease while it works (:meth:`JobQueue.renew`); a job
  ``running`` past its lease goes back to ``queued`` (:meth:`JobQueue.recover_expired`), so
  a SIGKILLed worker's job resumes elsewhere or after a restart. Every later write of the
  worker is conditioned on still owning the job (:class:`LeaseLostError` otherwise).
- **Checkpoints.** Results, the SR and the push are recorded as they complete
  (:meth:`JobQueue.record_results`, :meth:`JobQueue.record_sr`, :meth:`JobQueue.record_pushed`);
  a resumed job skips what is recorded. Result ids and the SR's SOPInstanceUID are derived
  from the job id, so redoing a step after a crash makes the same objects, never new ones.
- **Attempts.** ``attempts`` counts processing tries (incremented by the claim while the
  results are not recorded yet); ``sr_push_attempts`` counts pushes of the SR, which have
  their own, larger budget. Backoff is ``backoff_s * 2**(n - 1)``, capped at
  ``backoff_max_s``.

``last_error`` holds a short reason without patient data or clear UIDs (callers pass
messages built from error types and codes).

Example::

    queue = JobQueue(db, max_attempts=5, backoff_s=2.0)
    for study in instances.quiet_studies(5.0, time.time()):
        queue.enqueue_study(study, stable_seconds=5.0)
    job = queue.claim(owner_id(), lease_s=60.0)
    ...
    queue.complete(job.id, owner)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    Integer,
    LargeBinary,
    Row,
    String,
    Table,
    Text,
    and_,
    case,
    func,
    select,
    update,
)

from service.db import ServiceDatabase, metadata, utcnow
from service.instances import instances
from service.selection import classify

__all__ = [
    "JOB_STATES",
    "Job",
    "JobQueue",
    "LeaseLostError",
    "StoredSr",
    "job_srs",
    "jobs",
    "owner_gone",
    "owner_id",
]

#: States a job row can be in (``received`` is only ever a study's state; see the module doc).
JOB_STATES = ("received", "queued", "running", "done", "failed")
#: Longest ``last_error`` kept.
ERROR_MAX = 500

jobs = Table(
    "svc_jobs",
    metadata,
    #: uuid4, 32 lowercase hex digits.
    Column("id", String(32), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    #: Processing tries so far (a claim before the results are recorded counts one).
    Column("attempts", Integer, nullable=False, default=0),
    #: Epoch seconds; a ``queued`` job is not claimed before.
    Column("next_attempt_at", Float, nullable=False),
    #: Why the last try failed (no PHI, no clear UIDs).
    Column("last_error", Text, nullable=True),
    #: The first result (``svc_results.id``); all of them in ``result_ids``.
    Column("result_id", String(32), nullable=True),
    #: JSON list of result ids, one per scored image.
    Column("result_ids", Text, nullable=True),
    #: The first SR of the job, once all of them are built (every one in ``svc_job_srs``).
    Column("sr_sop_instance_uid", String(64), nullable=True),
    #: ISO 8601 UTC; when the destination had accepted every SR of the job.
    Column("sr_pushed_at", String(40), nullable=True),
    Column("sr_push_attempts", Integer, nullable=False, default=0),
    Column("created_at", String(40), nullable=False),
    Column("updated_at", String(40), nullable=False),
    #: ``host:pid:token`` of the process that holds it (see :func:`owner_id`).
    Column("owner", String(200), nullable=True),
    #: Epoch seconds; a ``running`` job whose lease has passed is taken back.
    Column("lease_until", Float, nullable=True),
    Index("ix_svc_jobs_claim", "state", "next_attempt_at"),
    Index("ix_svc_jobs_study", "study_uid"),
)

#: The SRs a job made: one per scored image (``build_sr`` reports one source image), kept as
#: Part 10 bytes so a retried push (or ``GET /v1/results/{id}/sr``) sends the same object.
job_srs = Table(
    "svc_job_srs",
    metadata,
    #: Derived from the job id and the image (see ``service.study_worker.sr_uid_for``).
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("job_id", String(32), nullable=False, index=True),
    Column("result_id", String(32), nullable=False, unique=True),
    Column("created_at", String(40), nullable=False),
    Column("data", LargeBinary, nullable=False),
    #: ISO 8601 UTC; when the destination accepted it.
    Column("pushed_at", String(40), nullable=True),
)

_COLUMNS = list(jobs.c)
_SR_COLUMNS = [c for c in job_srs.c if c.name != "data"]

_TOKEN = secrets.token_hex(4)


def owner_id() -> str:
    """This process as a job owner: ``host:pid:token`` (the token tells a restarted process
    with the same pid, as in a container, from its previous life)."""
    return f"{socket.gethostname()[:150]}:{os.getpid()}:{_TOKEN}"


def owner_gone(owner: str | None, me: str) -> bool:
    """Whether ``owner`` (``host:pid:token``) is a process of ``me``'s host that is gone: a
    dead pid, or ``me``'s own pid in an earlier life. Owners on other hosts are never judged:
    a pid means nothing there."""
    host = me.rsplit(":", 2)[0]
    if not owner or owner == me or not owner.startswith(f"{host}:"):
        return False
    return _owner_dead(owner, host)


class LeaseLostError(RuntimeError):
    """The job is no longer this owner's (its lease expired and it was taken back)."""


@dataclass(frozen=True)
class Job:
    """One ``svc_jobs`` row (without the SR bytes).

    Attributes:
        id: 32 hex digits.
        study_uid: StudyInstanceUID (never logged in clear; use :func:`service.logs.hash_uid`).
        state: one of :data:`JOB_STATES`.
        attempts: processing tries so far.
        next_attempt_at: epoch seconds before which a ``queued`` job waits.
        last_error: why the last try failed.
        result_ids: one stored result per scored image (empty until recorded).
        sr_sop_instance_uid: the SR's SOPInstanceUID once built.
        sr_pushed_at: ISO time the destination accepted the SR.
        sr_push_attempts: pushes tried.
        created_at, updated_at: ISO 8601 UTC.
        owner: the process running it.
        lease_until: epoch seconds.
    """

    id: str
    study_uid: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    result_ids: tuple[str, ...]
    sr_sop_instance_uid: str | None
    sr_pushed_at: str | None
    sr_push_attempts: int
    created_at: str
    updated_at: str
    owner: str | None
    lease_until: float | None

    @property
    def result_id(self) -> str | None:
        """The first result, if any."""
        return self.result_ids[0] if self.result_ids else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "result_ids": list(self.result_ids),
            "sr_sop_instance_uid": self.sr_sop_instance_uid,
            "sr_pushed_at": self.sr_pushed_at,
            "sr_push_attempts": self.sr_push_attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class StoredSr:
    """One SR a job made (``svc_job_srs`` without the bytes; :meth:`JobQueue.sr_data`)."""

    sop_instance_uid: str
    job_id: str
    result_id: str
    created_at: str
    pushed_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "result_id": self.result_id,
            "created_at": self.created_at,
            "pushed_at": self.pushed_at,
        }


def _to_sr(row: Row[Any]) -> StoredSr:
    m = row._mapping
    return StoredSr(
        sop_instance_uid=m["sop_instance_uid"],
        job_id=m["job_id"],
        result_id=m["result_id"],
        created_at=m["created_at"],
        pushed_at=m["pushed_at"],
    )


def _to_job(row: Row[Any]) -> Job:
    m = row._mapping
    ids = tuple(json.loads(m["result_ids"])) if m["result_ids"] else ()
    return Job(
        id=m["id"],
        study_uid=m["study_uid"],
        state=m["state"],
        attempts=int(m["attempts"]),
        next_attempt_at=float(m["next_attempt_at"]),
        last_error=m["last_error"],
        result_ids=ids,
        sr_sop_instance_uid=m["sr_sop_instance_uid"],
        sr_pushed_at=m["sr_pushed_at"],
        sr_push_attempts=int(m["sr_push_attempts"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        owner=m["owner"],
        lease_until=None if m["lease_until"] is None else float(m["lease_until"]),
    )


class _Raced(Exception):
    """Another process attached the instances first; roll back."""


class JobQueue:
    """Jobs in the ``svc_jobs`` table of a :class:`~service.db.ServiceDatabase`.

    Args:
        db: the service database, tables created.
        max_attempts: processing tries before a job fails (default 5).
        backoff_s: delay before the first retry; doubled per try (default 2 s).
        backoff_max_s: longest delay between tries (default 300 s).
        push_max_attempts: SR pushes before a job fails (default 50).
        clock: epoch seconds (tests pass a fake).
    """

    def __init__(
        self,
        db: ServiceDatabase,
        *,
        max_attempts: int = 5,
        backoff_s: float = 2.0,
        backoff_max_s: float = 300.0,
        push_max_attempts: int = 50,
        clock: Callable[[], float] = time.time,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts!r}")
        if push_max_attempts < 1:
            raise ValueError(f"push_max_attempts must be >= 1, got {push_max_attempts!r}")
        if not backoff_s >= 0 or not backoff_max_s >= 0:
            raise ValueError(
                f"backoff_s and backoff_max_s must be >= 0, got {backoff_s!r}, {backoff_max_s!r}"
            )
        self.db = db
        self.max_attempts = max_attempts
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.push_max_attempts = push_max_attempts
        self.clock = clock

    def backoff(self, tries: int) -> float:
        """Seconds to wait after the ``tries``-th failed try (1-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2.0 ** max(0, tries - 1))

    # -- creating ------------------------------------------------------------------------

    def enqueue_study(self, study_uid: str, *, stable_seconds: float = 0.0) -> str | None:
        """Turn a quiet study's new instances into a ``queued`` job; returns its id.

        ``None`` when there is nothing to do: an instance arrived in the last
        ``stable_seconds``, no instance is new, the only new ones cannot be scored and the
        study already has a job (they are marked skipped), or another process took them.
        New instances that cannot be scored are attached to the job skipped, with the reason.
        """
        inst = instances
        try:
            with self.db.write() as conn:
                now = self.clock()
                latest = conn.execute(
                    select(func.max(inst.c.received_at)).where(inst.c.study_uid == study_uid)
                ).scalar()
                if latest is None or float(latest) > now - stable_seconds:
                    return None
                fresh = conn.execute(
                    select(
                        inst.c.sop_instance_uid,
                        inst.c.sop_class_uid,
                        inst.c.modality,
                        inst.c.view_position,
                    ).where(
                        inst.c.study_uid == study_uid,
                        inst.c.job_id.is_(None),
                        inst.c.skip_reason.is_(None),
                    )
                ).all()
                if not fresh:
                    return None
                reasons = {r.sop_instance_uid: classify(r).reason for r in fresh}
                scorable = [sop for sop, reason in reasons.items() if reason is None]
                has_job = conn.execute(
                    select(jobs.c.id).where(jobs.c.study_uid == study_uid).limit(1)
                ).first()
                job_id = None
                if scorable or has_job is None:
                    # A study with nothing to score still gets a job the first time, which
                    # fails with the reasons: the integrator sees why nothing came back.
                    job_id = uuid.uuid4().hex
                    stamp = utcnow()
                    conn.execute(
                        jobs.insert().values(
                            id=job_id,
                            study_uid=study_uid,
                            state="queued",
                            attempts=0,
                            next_attempt_at=now,
                            sr_push_attempts=0,
                            created_at=stamp,
                            updated_at=stamp,
                        )
                    )
                for sop, reason in reasons.items():
                    values: dict[str, Any] = {}
                    if job_id is not None:
                        values["job_id"] = job_id
                    if reason is not None:
                        values["skip_reason"] = reason[:ERROR_MAX]
                    if not values:
                        continue
                    changed = conn.execute(
                        update(inst)
                        .where(
                            inst.c.sop_instance_uid == sop,
                            inst.c.job_id.is_(None),
                            inst.c.skip_reason.is_(None),
                        )
                        .values(**values)
                    ).rowcount
                    if changed != 1:
                        raise _Raced
                return job_id
        except _Raced:
            return None

    # -- claiming ------------------------------------------------------------------------

    def claim(self, owner: str, lease_s: float) -> Job | None:
        """Take the oldest due ``queued`` job: ``running``, owned by ``owner`` until the lease.

        One transaction; on PostgreSQL the row is locked with ``FOR UPDATE SKIP LOCKED`` so
        concurrent claimers pass over it, on SQLite the write transaction is exclusive.
        """
        with self.db.write() as conn:
            now = self.clock()
            found = conn.execute(
                select(jobs.c.id)
                .where(jobs.c.state == "queued", jobs.c.next_attempt_at <= now)
                .order_by(jobs.c.next_attempt_at, jobs.c.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).scalar()
            if found is None:
                return None
            conn.execute(
                update(jobs)
                .where(jobs.c.id == found)
                .values(
                    state="running",
                    owner=owner,
                    lease_until=now + lease_s,
                    attempts=jobs.c.attempts + case((jobs.c.result_ids.is_(None), 1), else_=0),
                    updated_at=utcnow(),
                )
            )
            row = conn.execute(select(*_COLUMNS).where(jobs.c.id == found)).one()
        return _to_job(row)

    def renew(self, job_id: str, owner: str, lease_s: float) -> None:
        """Extend the lease of a job this owner runs.

        Raises:
            LeaseLostError: the job is not ``running`` under ``owner`` any more.
        """
        self._owned_update(job_id, owner, lease_until=self.clock() + lease_s)

    # -- checkpoints ---------------------------------------------------------------------

    def record_results(self, job_id: str, owner: str, result_ids: Sequence[str]) -> None:
        """The job's results are stored (one per scored image, at least one)."""
        if not result_ids:
            raise ValueError("record_results needs at least one result id")
        self._owned_update(
            job_id, owner, result_id=result_ids[0], result_ids=json.dumps(list(result_ids))
        )

    def add_sr(
        self, job_id: str, owner: str, result_id: str, sop_instance_uid: str, data: bytes
    ) -> None:
        """Keep one built SR of a job (a second call with the same SOPInstanceUID, after a
        crash, keeps the first)."""
        with self.db.write() as conn:
            owned = conn.execute(
                select(jobs.c.id).where(
                    jobs.c.id == job_id, jobs.c.owner == owner, jobs.c.state == "running"
                )
            ).first()
            if owned is None:
                raise LeaseLostError(f"job {job_id} is no longer running under this worker")
            exists = conn.execute(
                select(job_srs.c.sop_instance_uid).where(
                    job_srs.c.sop_instance_uid == sop_instance_uid
                )
            ).first()
            if exists is None:
                conn.execute(
                    job_srs.insert().values(
                        sop_instance_uid=sop_instance_uid,
                        job_id=job_id,
                        result_id=result_id,
                        created_at=utcnow(),
                        data=data,
                    )
                )

    def record_sr(self, job_id: str, owner: str, sop_instance_uid: str) -> None:
        """Every SR of the job is built; ``sop_instance_uid`` is the first."""
        self._owned_update(job_id, owner, sr_sop_instance_uid=sop_instance_uid)

    def mark_sr_pushed(self, sop_instance_uid: str) -> None:
        """The destination accepted this SR."""
        with self.db.write() as conn:
            conn.execute(
                update(job_srs)
                .where(
                    job_srs.c.sop_instance_uid == sop_instance_uid, job_srs.c.pushed_at.is_(None)
                )
                .values(pushed_at=utcnow())
            )

    def record_pushed(self, job_id: str, owner: str) -> None:
        """The destination accepted every SR of the job."""
        self._owned_update(
            job_id,
            owner,
            sr_pushed_at=utcnow(),
            sr_push_attempts=jobs.c.sr_push_attempts + 1,
            last_error=None,
        )

    # -- ending a try --------------------------------------------------------------------

    def complete(self, job_id: str, owner: str) -> None:
        """``running`` -> ``done``."""
        self._owned_update(
            job_id, owner, state="done", owner=None, lease_until=None, last_error=None
        )

    def fail(self, job_id: str, owner: str, reason: str) -> None:
        """``running`` -> ``failed`` at once (a permanent error)."""
        self._owned_update(
            job_id,
            owner,
            state="failed",
            owner=None,
            lease_until=None,
            last_error=_short(reason),
        )

    def retry(self, job_id: str, owner: str, reason: str) -> str:
        """A transient processing error: back to ``queued`` after a backoff, or ``failed``
        when ``max_attempts`` tries are spent. Returns the new state."""
        job = self.get(job_id)
        if job is None:
            raise LeaseLostError(f"job {job_id} is gone")
        if job.attempts >= self.max_attempts:
            self.fail(job_id, owner, f"gave up after {job.attempts} attempts: {reason}")
            return "failed"
        self._owned_update(
            job_id,
            owner,
            state="queued",
            owner=None,
            lease_until=None,
            next_attempt_at=self.clock() + self.backoff(job.attempts),
            last_error=_short(reason),
        )
        return "queued"

    def retry_push(self, job_id: str, owner: str, reason: str) -> str:
        """A transient SR push error: counted in ``sr_push_attempts``; back to ``queued``
        after a backoff, or ``failed`` when ``push_max_attempts`` pushes are spent."""
        job = self.get(job_id)
        if job is None:
            raise LeaseLostError(f"job {job_id} is gone")
        tries = job.sr_push_attempts + 1
        if tries >= self.push_max_attempts:
            self._owned_update(job_id, owner, sr_push_attempts=tries)
            self.fail(job_id, owner, f"SR push gave up after {tries} attempts: {reason}")
            return "failed"
        self._owned_update(
            job_id,
            owner,
            state="queued",
            owner=None,
            lease_until=None,
            sr_push_attempts=tries,
            next_attempt_at=self.clock() + self.backoff(tries),
            last_error=_short(reason),
        )
        return "queued"

    def release(self, job_id: str, owner: str) -> None:
        """Hand a job back unfinished (shutdown): ``queued``, due now, the try not counted."""
        self._owned_update(
            job_id,
            owner,
            state="queued",
            owner=None,
            lease_until=None,
            next_attempt_at=self.clock(),
            attempts=jobs.c.attempts - case((jobs.c.result_ids.is_(None), 1), else_=0),
        )

    # -- recovery ------------------------------------------------------------------------

    def recover_expired(self) -> int:
        """Jobs ``running`` past their lease (their worker died) -> ``queued``, due now;
        those that already used every processing try -> ``failed``. Returns how many."""
        with self.db.write() as conn:
            now = self.clock()
            expired = and_(jobs.c.state == "running", jobs.c.lease_until < now)
            return self._take_back(conn, expired, now)

    def recover_dead_owners(self, me: str) -> int:
        """Jobs ``running`` under a process of this host that is gone (a previous life of
        this process, or a dead pid) -> ``queued`` at once, without waiting for the lease.

        Only jobs of this host are judged: a pid means nothing on another machine.
        """
        host = me.rsplit(":", 2)[0]
        with self.db.write() as conn:
            rows = conn.execute(
                select(jobs.c.id, jobs.c.owner).where(
                    jobs.c.state == "running", jobs.c.owner.like(f"{_escape_like(host)}:%", "\\")
                )
            ).all()
            dead = [r.id for r in rows if owner_gone(r.owner, me)]
            if not dead:
                return 0
            return self._take_back(conn, jobs.c.id.in_(dead), self.clock())

    def _take_back(self, conn: Connection, where: Any, now: float) -> int:
        spent = and_(where, jobs.c.result_ids.is_(None), jobs.c.attempts >= self.max_attempts)
        failed = conn.execute(
            update(jobs)
            .where(spent)
            .values(
                state="failed",
                owner=None,
                lease_until=None,
                last_error="worker stopped during processing on every attempt",
                updated_at=utcnow(),
            )
        ).rowcount
        queued = conn.execute(
            update(jobs)
            .where(where)
            .values(
                state="queued",
                owner=None,
                lease_until=None,
                next_attempt_at=now,
                last_error="worker stopped before finishing; resumed",
                updated_at=utcnow(),
            )
        ).rowcount
        return int(failed or 0) + int(queued or 0)

    # -- reading -------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self.db.read() as conn:
            row = conn.execute(select(*_COLUMNS).where(jobs.c.id == job_id)).first()
        return None if row is None else _to_job(row)

    def by_study(self, study_uid: str) -> list[Job]:
        """The study's jobs, oldest first."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(*_COLUMNS)
                .where(jobs.c.study_uid == study_uid)
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all()
        return [_to_job(r) for r in rows]

    def by_result(self, result_id: str) -> Job | None:
        """The job that produced a result (for serving its stored SR)."""
        pattern = f'%"{_escape_like(result_id)}"%'
        with self.db.read() as conn:
            rows = conn.execute(
                select(*_COLUMNS).where(jobs.c.result_ids.like(pattern, "\\"))
            ).all()
        found = [_to_job(r) for r in rows]
        return next((j for j in found if result_id in j.result_ids), None)

    def srs(self, job_id: str) -> list[StoredSr]:
        """The job's SRs, in the order of its results."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(*_SR_COLUMNS)
                .where(job_srs.c.job_id == job_id)
                .order_by(job_srs.c.created_at, job_srs.c.sop_instance_uid)
            ).all()
        return [_to_sr(r) for r in rows]

    def sr_for_result(self, result_id: str) -> StoredSr | None:
        """The SR made for a result, if a job made one."""
        with self.db.read() as conn:
            row = conn.execute(select(*_SR_COLUMNS).where(job_srs.c.result_id == result_id)).first()
        return None if row is None else _to_sr(row)

    def sr_data(self, sop_instance_uid: str) -> bytes | None:
        """A stored SR as DICOM Part 10 bytes."""
        with self.db.read() as conn:
            data = conn.execute(
                select(job_srs.c.data).where(job_srs.c.sop_instance_uid == sop_instance_uid)
            ).scalar()
        return None if data is None else bytes(data)

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        with self.db.read() as conn:
            rows = conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
        return {str(state): int(n) for state, n in rows}

    # -- helpers -------------------------------------------------------------------------

    def _owned_update(self, job_id: str, holder: str, /, **values: Any) -> None:
        """Update a job only while ``holder`` runs it (``values`` may set ``owner``)."""
        with self.db.write() as conn:
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.owner == holder, jobs.c.state == "running")
                .values(updated_at=utcnow(), **values)
            ).rowcount
        if changed != 1:
            raise LeaseLostError(f"job {job_id} is no longer running under this worker")


def _short(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= ERROR_MAX else reason[: ERROR_MAX - 3] + "..."


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _owner_dead(owner: str | None, host: str) -> bool:
    """Whether a ``host:pid:token`` owner on this host is no longer alive."""
    if not owner:
        return False
    rest = owner[len(host) + 1 :]
    pid_text, _, token = rest.partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return token != _TOKEN  # our pid, another life: the process restarted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False
