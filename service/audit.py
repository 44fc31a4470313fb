"""The append-only audit trail: one row per request, who called what and how it ended.

A row holds the API key id (never the key), the route template, method, status, an outcome,
the hashed study and instance UIDs, the model and ontology versions and the stage timings.
The database refuses to change or delete rows (triggers on ``svc_audit``, see
:mod:`service.db`), so the trail cannot be rewritten through the application. Recording
never fails a request: a database error becomes a warning in the log.

The service records with :meth:`AuditLog.record_later`: the row is stamped when the request
ends and committed a moment later by a writer thread, together with whatever else has
queued up (group commit, :mod:`service.write_behind`), so a request pays neither a thread
hop nor a transaction for its audit row. A row is exposed to a crash for that moment only,
as before (it was always written after the answer); shutdown writes what is queued, and
:meth:`AuditLog.recent` reads this process's queued rows too.

Example::

    log = AuditLog(db)
    log.record(AuditRecord(key_id=key.key_id, route="/v1/predict", method="POST", status=200,
                           outcome=outcome_for_status(200), study_uid_hash=None,
                           instance_uid_hash=None, model_version="a1b2",
                           ontology_version="chest@3f2a", timings={"inference_ms": 12.5},
                           request_id=request_id))
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from service.db import ServiceDatabase, audit, utcnow
from service.write_behind import LINGER_S, WriteBehind

__all__ = ["MAX_PENDING", "MAX_RECENT", "OUTCOMES", "AuditLog", "AuditRecord", "outcome_for_status"]

log = logging.getLogger(__name__)

#: How a request ended. ``rejected``: refused before any work (auth, scope, backpressure).
OUTCOMES = ("ok", "client_error", "server_error", "rejected")
#: Rows queued by :meth:`AuditLog.record_later` before it refuses (the caller then writes).
MAX_PENDING = 4096
#: Most rows :meth:`AuditLog.recent` returns at once.
MAX_RECENT = 10_000

_REJECTED_STATUSES = frozenset({401, 403, 429, 503})


def outcome_for_status(status: int) -> str:
    """The outcome of a response status: 401/403/429/503 are ``rejected``, then by class."""
    if status in _REJECTED_STATUSES:
        return "rejected"
    if status >= 500:
        return "server_error"
    if status >= 400:
        return "client_error"
    return "ok"


@dataclass(frozen=True)
class AuditRecord:
    """What the audit trail keeps about one request.

    Args:
        key_id: the public id of the API key used, ``None`` without one.
        route: the route template (``/v1/results/{id}``), never a path holding UIDs.
        method: HTTP method.
        status: response status code.
        outcome: one of :data:`OUTCOMES` (see :func:`outcome_for_status`).
        study_uid_hash: :func:`service.logs.hash_uid` of the StudyInstanceUID, if any.
        instance_uid_hash: the same for the SOPInstanceUID.
        model_version: version of the model that answered, if one did.
        ontology_version: ``name@version`` of the ontology used, if any.
        timings: stage name -> milliseconds (``decode_ms``, ``queue_ms``, ...).
        request_id: the request id also found in the logs.
    """

    key_id: str | None
    route: str
    method: str
    status: int
    outcome: str
    study_uid_hash: str | None
    instance_uid_hash: str | None
    model_version: str | None
    ontology_version: str | None
    timings: dict[str, float] = field(default_factory=dict)
    request_id: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}; got {self.outcome!r}")


class AuditLog:
    """Append-only audit rows in ``svc_audit`` of a :class:`~service.db.ServiceDatabase`."""

    def __init__(self, db: ServiceDatabase, *, durable: bool = True):
        self.db = db
        self.durable = durable  # flush each row to disk (see ServiceDatabase.write)
        self._writer: WriteBehind[dict[str, Any]] = WriteBehind(
            self._insert, name="kgdx-audit", max_pending=MAX_PENDING, linger_s=LINGER_S
        )

    def record(self, rec: AuditRecord) -> None:
        """Append one row now, stamped with the current time; never raises (logs a
        warning)."""
        try:
            self._insert([_row(rec)])
        except Exception as exc:
            # The engine hides bound parameters, so the message names no values.
            log.warning(
                "audit record not written: %s: %s",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                extra={"route": rec.route, "status": rec.status},
            )

    def record_later(self, rec: AuditRecord) -> bool:
        """Stamp the row now and queue it for the writer thread, which commits what has
        queued up in one transaction; never raises. ``False`` (nothing queued) when
        :data:`MAX_PENDING` rows wait or the log is closed: then call :meth:`record`."""
        try:
            row = _row(rec)
        except Exception as exc:
            log.warning("audit record not written: %s", type(exc).__name__)
            return True
        return self._writer.submit(row)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued row is committed (or given up); ``False`` on timeout."""
        return self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued and stop the writer thread."""
        self._writer.close(timeout_s)

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        with self.db.write(durable=self.durable) as conn:
            conn.execute(audit.insert(), rows)

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` rows, newest first, as dicts (``timings`` decoded)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_RECENT:
            raise ValueError(f"limit must be an integer from 1 to {MAX_RECENT}, got {limit!r}")
        self.flush()  # rows this process queued come first
        with self.db.read() as conn:
            rows = conn.execute(select(audit).order_by(audit.c.id.desc()).limit(limit)).all()
        out = []
        for row in rows:
            d = dict(row._mapping)
            d["timings"] = json.loads(d["timings"])
            out.append(d)
        return out


def _row(rec: AuditRecord) -> dict[str, Any]:
    """The ``svc_audit`` row of ``rec``, stamped now; non-finite timings are left out."""
    timings = {
        str(k): float(v)
        for k, v in rec.timings.items()
        if isinstance(v, int | float) and math.isfinite(v)
    }
    return {
        "created_at": utcnow(),
        "request_id": str(rec.request_id)[:64],
        "key_id": rec.key_id,
        "route": str(rec.route)[:200],
        "method": str(rec.method).upper()[:10],
        "status": int(rec.status),
        "outcome": rec.outcome,
        "study_uid_hash": rec.study_uid_hash,
        "instance_uid_hash": rec.instance_uid_hash,
        "model_version": rec.model_version,
        "ontology_version": rec.ontology_version,
        "timings": json.dumps(timings, sort_keys=True),
    }
