"""Stored predictions: the response JSON, a small PNG of the input, and the versions used.

A result is found by its id (``GET /v1/results/{id}``) or by its study
(``GET /v1/studies/{StudyInstanceUID}``).

Two ways in. :meth:`ResultStore.put` writes before it returns (study jobs, and predict when
results must be durable). :meth:`ResultStore.put_later` hands the row to one writer thread
and returns at once, so ``POST /v1/predict`` answers without waiting for the database: the
thread commits whatever has queued up in one transaction (group commit), and until then the
row is served from memory, so a ``GET`` right after the answer finds it. What that costs: a
process killed in the millisecond between answer and commit loses the stored copy (not the
answer, which the client holds), the same exposure as SQLite's ``synchronous=NORMAL`` to a
power cut; ``KGDX_DURABLE_RESULTS=1`` writes (and flushes) every result before answering.

The study UID is never stored in clear: the row keeps :func:`service.logs.hash_uid` of it
and :meth:`ResultStore.by_study` hashes the UID it is asked about, so a replica must hash
with the same salt (checked when the store opens).

Example::

    store = ResultStore(db)
    rid = store.put(response, study_uid=uid, image_png=png, model_version="a1b2")
    store.get(rid).payload["findings"]
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.exc import IntegrityError

from service.db import ServiceDatabase, results, utcnow
from service.logs import hash_uid
from service.write_behind import LINGER_S, WriteBehind, with_retries

__all__ = ["MAX_IMAGE_BYTES", "ResultStore", "StoredResult", "normalize_result_id"]

#: Largest stored input PNG; the overlay needs a downsized copy, not the original.
MAX_IMAGE_BYTES = 8 * 1024 * 1024

#: Rows waiting for the writer thread; past this, :meth:`ResultStore.put_later` writes itself
#: (back-pressure when the database is slower than the answers).
MAX_PENDING = 1024
#: How often the writer retries a failed transaction before it gives the rows up.
WRITE_TRIES = 5

log = logging.getLogger("kgdx.results")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_DASHED_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class StoredResult:
    """One stored result.

    Args:
        id: 32 lowercase hex digits.
        created_at: ISO 8601, UTC.
        payload: the response JSON as stored.
        study_uid_hash: :func:`service.logs.hash_uid` of the StudyInstanceUID, if any.
        model_version: version of the model that produced it.
        ontology_version: ``name@version`` of the ontology used.
        has_image: whether :meth:`ResultStore.image` has a PNG for it.
    """

    id: str
    created_at: str
    payload: dict[str, Any]
    study_uid_hash: str | None
    model_version: str
    ontology_version: str
    has_image: bool


def normalize_result_id(result_id: object) -> str | None:
    """The canonical form (32 lowercase hex) of a result id, ``None`` if it is not one.

    Accepts the dashed UUID form too. Anything else (paths, SQL, empty, non-strings) is
    ``None``, so untrusted ids from URLs can be checked before they reach a query.
    """
    if not isinstance(result_id, str) or len(result_id) > 36:
        return None
    rid = result_id.strip().lower()
    if _DASHED_ID.fullmatch(rid):
        rid = rid.replace("-", "")
    return rid if _HEX_ID.fullmatch(rid) else None


class ResultStore:
    """Results in the ``svc_results`` table of a :class:`~service.db.ServiceDatabase`.

    Args:
        db: the service database, with its tables created
            (:meth:`~service.db.ServiceDatabase.create_all`).

    Raises:
        ValueError: when this process hashes UIDs with another salt than the stored data.
    """

    def __init__(self, db: ServiceDatabase, *, durable: bool = True):
        self.db = db
        self.durable = durable  # flush each result to disk (see ServiceDatabase.write)
        db.check_uid_salt()
        self._pending: dict[str, dict[str, Any]] = {}  # id -> row, until committed
        self._lock = threading.Lock()
        self._writer: WriteBehind[dict[str, Any]] = WriteBehind(
            lambda batch: self._write(batch),  # looked up per call: tests replace _write
            name="kgdx-results",
            max_pending=MAX_PENDING,
            tries=WRITE_TRIES,
            linger_s=LINGER_S,
            written=self._forget,
        )

    def put(
        self,
        payload: dict[str, Any] | bytes,
        *,
        result_id: str | None = None,
        study_uid: str | None = None,
        image_png: bytes | None = None,
        model_version: str = "",
        ontology_version: str = "",
    ) -> str:
        """Store a result now; returns its id (a new uuid4 hex unless ``result_id`` is given).

        ``payload`` is the response as a dict, or already encoded as UTF-8 JSON bytes.

        Raises:
            ValueError: ``payload`` is not a JSON-serializable dict, ``result_id`` is not a
                uuid or is taken, or ``image_png`` is not a PNG of at most
                :data:`MAX_IMAGE_BYTES`.
        """
        return self._insert(
            _row(payload, result_id, study_uid, image_png, model_version, ontology_version)
        )

    def _insert(self, row: dict[str, Any]) -> str:
        try:
            with self.db.write(durable=self.durable) as conn:
                conn.execute(results.insert().values(**row))
        except IntegrityError:
            raise ValueError(f"result id {row['id']} already exists") from None
        return str(row["id"])

    def put_later(
        self,
        payload: dict[str, Any] | bytes,
        *,
        result_id: str | None = None,
        study_uid: str | None = None,
        image_png: bytes | None = None,
        model_version: str = "",
        ontology_version: str = "",
    ) -> str:
        """Queue a result for the writer thread and return its id at once; reads see it
        from now on (see the module docstring). Writes it now, like :meth:`put`, when
        :data:`MAX_PENDING` rows are waiting or the store is closed.

        Raises:
            ValueError: as :meth:`put` (a taken id only when it is still pending).
        """
        row = _row(payload, result_id, study_uid, image_png, model_version, ontology_version)
        rid = str(row["id"])
        with self._lock:
            if rid in self._pending:
                raise ValueError(f"result id {rid} already exists")
            self._pending[rid] = row  # before the writer can have committed (and forgotten) it
            if self._writer.submit(row):
                return rid
            del self._pending[rid]
        return self._insert(row)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued result is committed (or given up); ``False`` on timeout."""
        return self._writer.flush(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, then stop the writer thread; later ``put_later`` calls
        write at once."""
        self._writer.close(timeout_s)

    def _forget(self, batch: list[dict[str, Any]]) -> None:
        """Rows committed (or given up) are no longer served from memory."""
        with self._lock:
            for row in batch:
                self._pending.pop(row["id"], None)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        """Commit ``batch`` in one transaction (the writer retries a failing database); a
        row whose id is taken is logged and dropped without failing the others."""
        try:
            with self.db.write(durable=self.durable) as conn:
                conn.execute(results.insert(), batch)
        except IntegrityError:
            if len(batch) == 1:
                log.error("result %s not stored: its id already exists", batch[0]["id"])
                return
            for row in batch:  # find the clashing row: one transaction each
                self._write_alone(row)

    def _write_alone(self, row: dict[str, Any]) -> None:
        """One row in its own transaction, retried here: once rows of the batch are
        committed one by one, retrying the whole batch would report them as clashing."""
        with_retries(lambda: self._write([row]), self._writer.tries, f"result {row['id']}")

    def get(self, result_id: str) -> StoredResult | None:
        """The result with this id; ``None`` when there is none or the id is malformed."""
        rid = normalize_result_id(result_id)
        if rid is None:
            return None
        with self._lock:
            pending = self._pending.get(rid)
        if pending is not None:
            return _pending_result(pending)
        with self.db.read() as conn:
            row = conn.execute(_SUMMARY.where(results.c.id == rid)).first()
        return None if row is None else _to_result(row)

    def image(self, result_id: str) -> bytes | None:
        """The stored input PNG; ``None`` when there is none or the id is malformed."""
        rid = normalize_result_id(result_id)
        if rid is None:
            return None
        with self._lock:
            pending = self._pending.get(rid)
        if pending is not None:
            return pending["image_png"]
        with self.db.read() as conn:
            data = conn.execute(select(results.c.image_png).where(results.c.id == rid)).scalar()
        return None if data is None else bytes(data)

    def by_study(self, study_uid: str) -> list[StoredResult]:
        """Results of the study with this StudyInstanceUID, oldest first (latest is ``[-1]``)."""
        if not isinstance(study_uid, str):
            return []
        hashed = hash_uid(study_uid)
        if hashed is None:
            return []
        with self._lock:
            pending = [r for r in self._pending.values() if r["study_uid_hash"] == hashed]
        with self.db.read() as conn:
            rows = conn.execute(
                _SUMMARY.where(results.c.study_uid_hash == hashed).order_by(
                    results.c.created_at, results.c.id
                )
            ).all()
        found = {r.id: _to_result(r) for r in rows}  # a row committed while we read is in both
        found.update((r["id"], _pending_result(r)) for r in pending)
        return sorted(found.values(), key=lambda r: (r.created_at, r.id))


# Everything but the image bytes, which only the overlay endpoint needs.
_SUMMARY = select(
    results.c.id,
    results.c.created_at,
    results.c.payload,
    results.c.study_uid_hash,
    results.c.model_version,
    results.c.ontology_version,
    results.c.image_png.is_not(None).label("has_image"),
)


def _to_result(row: Row[Any]) -> StoredResult:
    m = row._mapping
    return StoredResult(
        id=m["id"],
        created_at=m["created_at"],
        payload=json.loads(m["payload"]),
        study_uid_hash=m["study_uid_hash"],
        model_version=m["model_version"],
        ontology_version=m["ontology_version"],
        has_image=bool(m["has_image"]),
    )


def _row(
    payload: dict[str, Any] | bytes,
    result_id: str | None,
    study_uid: str | None,
    image_png: bytes | None,
    model_version: str,
    ontology_version: str,
) -> dict[str, Any]:
    """A checked ``svc_results`` row (see :meth:`ResultStore.put` for what is checked)."""
    if isinstance(payload, bytes):
        try:
            body = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"payload bytes are not UTF-8 JSON: {exc}") from exc
        if not body.startswith("{"):
            raise ValueError("payload bytes must encode a JSON object")
    elif isinstance(payload, dict):
        try:
            body = json.dumps(payload, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"payload is not JSON-serializable: {exc}") from exc
    else:
        raise ValueError(f"payload must be a dict, got {type(payload).__name__}")
    if result_id is None:
        rid = uuid.uuid4().hex
    else:
        checked = normalize_result_id(result_id)
        if checked is None:
            raise ValueError(f"result_id must be 32 hex digits (a uuid), got {result_id!r}")
        rid = checked
    if image_png is not None:
        if not isinstance(image_png, bytes | bytearray | memoryview):
            raise ValueError(f"image_png must be bytes, got {type(image_png).__name__}")
        image_png = bytes(image_png)
        if not image_png.startswith(_PNG_SIGNATURE):
            raise ValueError("image_png is not a PNG (bad signature)")
        if len(image_png) > MAX_IMAGE_BYTES:
            raise ValueError(
                f"image_png has {len(image_png)} bytes, more than {MAX_IMAGE_BYTES}; "
                "store a downsized copy"
            )
    return {
        "id": rid,
        "created_at": utcnow(),
        "study_uid_hash": hash_uid(study_uid),
        "model_version": str(model_version),
        "ontology_version": str(ontology_version),
        "payload": body,
        "image_png": image_png,
    }


def _pending_result(row: dict[str, Any]) -> StoredResult:
    return StoredResult(
        id=row["id"],
        created_at=row["created_at"],
        payload=json.loads(row["payload"]),
        study_uid_hash=row["study_uid_hash"],
        model_version=row["model_version"],
        ontology_version=row["ontology_version"],
        has_image=row["image_png"] is not None,
    )
