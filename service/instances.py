"""Received DICOM instances: a file per instance under ``$KGDX_HOME/instances`` and a row each.

The STOW-RS endpoint hands every accepted part to :meth:`InstanceStore.store`, which makes
it durable before the answer goes out: the spooled file is fsynced, the row is inserted in
a write transaction, the file is moved into place (``<root>/<study>/<series>/<sop>.dcm``,
an atomic rename, then the folder is fsynced) and only then the transaction commits. A
committed row therefore always has its file; when the insert or the commit fails, the moved
file is removed again, so nothing is left half-written. The row insert also serialises two
writers of the same SOP Instance UID (the primary key): the second one sees a duplicate.

Re-sending an instance is idempotent: the first copy is kept, no row or file is added, and
the outcome says whether the bytes were the same (see :class:`StoreOutcome`). A faithful
re-send (same SHA-256) of an instance whose file was lost or truncated puts the file back,
which is how ``kgdx doctor`` tells an operator to repair it (:mod:`service.doctor`).

The study worker reads the table: :meth:`InstanceStore.quiet_studies` names studies where
nothing arrived for a while and some instance still waits for a job,
:meth:`InstanceStore.set_job` and :meth:`InstanceStore.set_skipped` record what became of
each instance.

Unlike ``svc_results``, this table keeps the UIDs in clear: the files themselves carry them
(and the patient data), and the QIDO-RS search answers with them. Logs still only show
:func:`service.logs.hash_uid` of them.

Example::

    store = InstanceStore(db, kgdx_home() / "instances")
    outcome = store.store(spooled_path, pydicom.dcmread(spooled_path, stop_before_pixels=True))
    outcome.created, store.path_of(outcome.row)
    for study in store.quiet_studies(stable_seconds=5):
        rows = [r for r in store.by_study(study) if r.job_id is None and r.skip_reason is None]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydicom.dataset import Dataset
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    Index,
    Row,
    String,
    Table,
    and_,
    case,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from kg.home import kgdx_home
from service.db import ServiceDatabase, metadata

__all__ = [
    "InstanceIdentity",
    "InstanceRow",
    "InstanceStore",
    "StoreOutcome",
    "StudySummary",
    "file_digest",
    "instances",
    "is_valid_uid",
]

#: Longest value of a DICOM UI element.
UID_MAX = 64
#: Longest Modality / View Position kept (VR CS).
CS_MAX = 16
#: Longest skip reason kept.
REASON_MAX = 500
#: Spool files older than this are leftovers of a crash and removed at start.
SPOOL_MAX_AGE_S = 3600.0

_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_CHUNK = 500  # SQL IN-list size for bulk updates
_READ_BLOCK = 2**20

#: One row per received SOP Instance.
instances = Table(
    "svc_instances",
    metadata,
    Column("sop_instance_uid", String(UID_MAX), primary_key=True),
    Column("study_uid", String(UID_MAX), nullable=False),
    Column("series_uid", String(UID_MAX), nullable=False),
    Column("sop_class_uid", String(UID_MAX), nullable=False),
    Column("modality", String(CS_MAX), nullable=True),
    Column("view_position", String(CS_MAX), nullable=True),
    #: Relative to the store root, ``/``-separated: ``<study>/<series>/<sop>.dcm``.
    Column("path", String(3 * UID_MAX + 8), nullable=False),
    Column("size", BigInteger, nullable=False),
    #: Hex SHA-256 of the file, to tell a faithful re-send from a changed one.
    Column("sha256", String(64), nullable=False),
    #: UTC seconds since the epoch; the latest one per study tells when it went quiet.
    Column("received_at", Double, nullable=False),
    #: The job that processes the instance (set by the study worker).
    Column("job_id", String(64), nullable=True),
    #: Why the instance will not be processed (non-image SOP class, lateral view, ...).
    Column("skip_reason", String(REASON_MAX), nullable=True),
    Index("ix_svc_instances_study", "study_uid", "received_at"),
    Index("ix_svc_instances_job", "job_id"),
)


def is_valid_uid(value: object) -> bool:
    """Whether ``value`` is a DICOM UID: digits and dots, at most 64 characters."""
    return isinstance(value, str) and len(value) <= UID_MAX and bool(_UID.fullmatch(value))


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None


@dataclass(frozen=True)
class InstanceIdentity:
    """What identifies an instance and what series selection needs, read from its header.

    Args:
        sop_instance_uid, sop_class_uid, study_uid, series_uid: the UIDs.
        modality: Modality (0008,0060), if present.
        view_position: View Position (0018,5101), if present.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str | None = None
    view_position: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceIdentity:
        """Read the identity from a dataset (the header is enough).

        Raises:
            ValueError: a UID is missing or is not a valid UID; the message names the
                attribute, never its value.
        """
        uids: dict[str, str] = {}
        for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"):
            value = _text(ds, keyword)
            if value is None:
                raise ValueError(f"the instance has no {keyword}")
            if not is_valid_uid(value):
                raise ValueError(f"the instance's {keyword} is not a valid DICOM UID")
            uids[keyword] = value
        modality, view = _text(ds, "Modality"), _text(ds, "ViewPosition")
        return cls(
            sop_instance_uid=uids["SOPInstanceUID"],
            sop_class_uid=uids["SOPClassUID"],
            study_uid=uids["StudyInstanceUID"],
            series_uid=uids["SeriesInstanceUID"],
            modality=modality.upper()[:CS_MAX] if modality else None,
            view_position=view.upper()[:CS_MAX] if view else None,
        )

    @property
    def relative_path(self) -> str:
        """``<study>/<series>/<sop>.dcm``."""
        return f"{self.study_uid}/{self.series_uid}/{self.sop_instance_uid}.dcm"


@dataclass(frozen=True)
class InstanceRow:
    """One row of ``svc_instances`` (see the table for the meaning of each field)."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str | None
    view_position: str | None
    path: str
    size: int
    sha256: str
    received_at: float
    job_id: str | None
    skip_reason: str | None


@dataclass(frozen=True)
class StoreOutcome:
    """What :meth:`InstanceStore.store` did.

    Args:
        status: ``"created"`` (new row and file) or ``"duplicate"`` (the SOP Instance UID
            was already stored; no row was added).
        row: the stored row (for a duplicate: the first copy's).
        same_content: for a duplicate, whether the re-sent bytes equal the stored ones.
        restored: for a faithful duplicate, whether it put back a lost or truncated file.
    """

    status: Literal["created", "duplicate"]
    row: InstanceRow
    same_content: bool = True
    restored: bool = False

    @property
    def created(self) -> bool:
        return self.status == "created"


@dataclass(frozen=True)
class StudySummary:
    """A study kgdx holds instances of.

    Args:
        study_uid: StudyInstanceUID.
        modalities: distinct modalities of its instances, sorted.
        instances: number of instances held.
        first_received_at, last_received_at: UTC epoch seconds.
    """

    study_uid: str
    modalities: tuple[str, ...]
    instances: int
    first_received_at: float
    last_received_at: float


class InstanceStore:
    """Instance files under ``root`` and their rows in ``svc_instances``.

    Args:
        db: the service database, with its tables created.
        root: folder of the instance files (``$KGDX_HOME/instances`` in the service).
        spool: folder for incoming parts; it must be on the same filesystem as ``root`` so
            that storing is a rename. Default: ``spool`` next to ``root``.
    """

    def __init__(self, db: ServiceDatabase, root: Path | str, spool: Path | str | None = None):
        self.db = db
        self.root = Path(root)
        self.spool = Path(spool) if spool is not None else self.root.parent / "spool"
        self.root.mkdir(parents=True, exist_ok=True)
        self.spool.mkdir(parents=True, exist_ok=True)

    @classmethod
    def default(cls, db: ServiceDatabase) -> InstanceStore:
        """The store under ``$KGDX_HOME`` (``instances/``, ``spool/``), spool leftovers removed."""
        store = cls(db, kgdx_home() / "instances")
        store.clean_spool()
        return store

    def __repr__(self) -> str:
        return f"InstanceStore({str(self.root)!r})"

    # -- writing -----------------------------------------------------------------------------

    def store(
        self,
        temp_path: Path | str,
        header: Dataset,
        *,
        sha256: str | None = None,
        size: int | None = None,
        skip_reason: str | None = None,
        now: float | None = None,
    ) -> StoreOutcome:
        """Make the instance in ``temp_path`` durable; idempotent by SOP Instance UID.

        A new instance's file is moved (renamed) into place, so ``temp_path`` should be on
        the store's filesystem (:attr:`spool`); a duplicate's ``temp_path`` is removed.

        Args:
            temp_path: the received file.
            header: its dataset (``dcmread(..., stop_before_pixels=True)`` is enough).
            sha256, size: of the file, when the caller computed them while receiving it.
            skip_reason: recorded at once (a non-image SOP class, say).
            now: receive time, UTC epoch seconds (default: now).

        Raises:
            ValueError: the header lacks a UID or has an invalid one.
            OSError: the file could not be moved or synced (``errno.ENOSPC`` on a full
                disk); nothing was stored and ``temp_path`` is left for the caller.
            sqlalchemy.exc.SQLAlchemyError: the database failed; nothing was stored.
        """
        ident = InstanceIdentity.from_dataset(header)
        temp = Path(temp_path)
        if sha256 is None or size is None:
            size, sha256 = file_digest(temp)
        _fsync_file(temp)
        final = self.root / ident.relative_path
        inode = temp.stat().st_ino
        values: dict[str, Any] = {
            "sop_instance_uid": ident.sop_instance_uid,
            "study_uid": ident.study_uid,
            "series_uid": ident.series_uid,
            "sop_class_uid": ident.sop_class_uid,
            "modality": ident.modality,
            "view_position": ident.view_position,
            "path": ident.relative_path,
            "size": int(size),
            "sha256": sha256,
            "received_at": time.time() if now is None else float(now),
            "job_id": None,
            "skip_reason": _reason(skip_reason),
        }
        for _ in range(3):
            placed: int | None = None  # inode of the file we moved into place
            try:
                with self.db.write() as conn:
                    existing = conn.execute(
                        select(instances).where(
                            instances.c.sop_instance_uid == ident.sop_instance_uid
                        )
                    ).first()
                    if existing is None:
                        conn.execute(instances.insert().values(**values))
                        self._make_dirs(final.parent)
                        placed = inode  # from here on a failure must take the file back out
                        os.replace(temp, final)
                        _fsync_dir(final.parent)
            except BaseException as exc:
                if placed is not None:
                    _remove_if_same(final, placed)
                if isinstance(exc, IntegrityError):
                    continue  # another writer stored this instance first
                raise
            if existing is None:
                return StoreOutcome("created", InstanceRow(**values))
            row = _to_row(existing)
            if row.sha256 == sha256 and self._restore(temp, row):
                return StoreOutcome("duplicate", row, restored=True)
            temp.unlink(missing_ok=True)
            return StoreOutcome("duplicate", row, same_content=row.sha256 == sha256)
        raise RuntimeError("the instance row could neither be inserted nor read back")

    def _restore(self, temp: Path, row: InstanceRow) -> bool:
        """Put a faithful copy in place of a stored file that is gone or has the wrong size."""
        try:
            final = self.path_of(row)
        except ValueError:
            return False
        try:
            if final.stat().st_size == row.size:
                return False
        except FileNotFoundError:
            pass
        self._make_dirs(final.parent)
        os.replace(temp, final)
        _fsync_dir(final.parent)
        return True

    def _make_dirs(self, folder: Path) -> None:
        missing: list[Path] = []
        current = folder
        while not current.exists() and current != self.root:
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            _fsync_dir(path.parent)

    def set_job(
        self,
        sop_uids: Iterable[str],
        job_id: str | int | None,
        *,
        only_unassigned: bool = True,
        conn: Connection | None = None,
    ) -> int:
        """Record the job of these instances; returns how many rows changed.

        Args:
            sop_uids: SOP Instance UIDs.
            job_id: the job (``None`` clears it).
            only_unassigned: leave instances that already have a job alone, so two workers
                cannot both claim one.
            conn: run in this transaction (with the job's own insert, say) instead of a new one.
        """
        uids = list(dict.fromkeys(str(u) for u in sop_uids))
        value = None if job_id is None else str(job_id)

        def run(c: Connection) -> int:
            changed = 0
            for chunk in _chunks(uids, _CHUNK):
                stmt = update(instances).where(instances.c.sop_instance_uid.in_(chunk))
                if only_unassigned:
                    stmt = stmt.where(instances.c.job_id.is_(None))
                changed += c.execute(stmt.values(job_id=value)).rowcount
            return changed

        if conn is not None:
            return run(conn)
        with self.db.write() as c:
            return run(c)

    def set_skipped(
        self, sop_uid: str, reason: str | None, *, conn: Connection | None = None
    ) -> bool:
        """Record why an instance is not processed (``None`` clears it); ``False`` if unknown."""
        stmt = (
            update(instances)
            .where(instances.c.sop_instance_uid == sop_uid)
            .values(skip_reason=_reason(reason))
        )
        if conn is not None:
            return bool(conn.execute(stmt).rowcount)
        with self.db.write() as c:
            return bool(c.execute(stmt).rowcount)

    def clean_spool(self, max_age_s: float = SPOOL_MAX_AGE_S) -> int:
        """Remove spool files older than ``max_age_s`` (a crash's leftovers); returns how many."""
        cutoff = time.time() - max_age_s
        removed = 0
        for path in self.spool.glob("stow-*.part"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    # -- reading -----------------------------------------------------------------------------

    def get(self, sop_uid: str) -> InstanceRow | None:
        """The row of this SOP Instance UID, if stored."""
        with self.db.read() as conn:
            row = conn.execute(
                select(instances).where(instances.c.sop_instance_uid == sop_uid)
            ).first()
        return None if row is None else _to_row(row)

    def by_study(self, study_uid: str) -> list[InstanceRow]:
        """The instances of a study, in the order they arrived."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(instances)
                .where(instances.c.study_uid == study_uid)
                .order_by(instances.c.received_at, instances.c.sop_instance_uid)
            ).all()
        return [_to_row(r) for r in rows]

    def path_of(self, row: InstanceRow) -> Path:
        """The file of a row.

        Raises:
            ValueError: the row's path leaves the store (a tampered database).
        """
        path = (self.root / row.path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError("the instance path lies outside the instance store")
        return path

    def studies(
        self,
        *,
        study_uids: Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[StudySummary]:
        """The studies held, oldest first, optionally filtered and paged.

        Args:
            study_uids: only these studies.
            modalities: only studies with an instance of one of these modalities.
            limit, offset: paging.
        """
        c = instances.c
        first = func.min(c.received_at).label("first")
        query = select(
            c.study_uid, func.count().label("n"), first, func.max(c.received_at).label("last")
        ).group_by(c.study_uid)
        if study_uids is not None:
            query = query.where(c.study_uid.in_(list(study_uids)))
        if modalities is not None:
            wanted = [m.upper() for m in modalities]
            query = query.where(c.study_uid.in_(select(c.study_uid).where(c.modality.in_(wanted))))
        query = query.order_by(first, c.study_uid).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            page = conn.execute(query).all()
            found: dict[str, set[str]] = {r.study_uid: set() for r in page}
            for chunk in _chunks(list(found), _CHUNK):
                for study, modality in conn.execute(
                    select(c.study_uid, c.modality)
                    .where(c.study_uid.in_(chunk), c.modality.is_not(None))
                    .distinct()
                ):
                    found[study].add(modality)
        return [
            StudySummary(
                study_uid=r.study_uid,
                modalities=tuple(sorted(found[r.study_uid])),
                instances=int(r.n),
                first_received_at=float(r.first),
                last_received_at=float(r.last),
            )
            for r in page
        ]

    def quiet_studies(self, stable_seconds: float, now: float | None = None) -> list[str]:
        """Studies that went quiet and still have work: ready for a job.

        A study qualifies when it has instances, none arrived in the last
        ``stable_seconds``, and at least one has neither a job nor a skip reason. Oldest
        quiet study first.
        """
        if stable_seconds < 0:
            raise ValueError(f"stable_seconds must be >= 0, got {stable_seconds!r}")
        c = instances.c
        now = time.time() if now is None else now
        waiting = func.sum(case((and_(c.job_id.is_(None), c.skip_reason.is_(None)), 1), else_=0))
        last = func.max(c.received_at)
        query = (
            select(c.study_uid)
            .group_by(c.study_uid)
            .having(last <= now - stable_seconds)
            .having(waiting > 0)
            .order_by(last, c.study_uid)
        )
        with self.db.read() as conn:
            return [str(r[0]) for r in conn.execute(query)]


def _to_row(row: Row[Any]) -> InstanceRow:
    m = row._mapping
    return InstanceRow(
        sop_instance_uid=m["sop_instance_uid"],
        study_uid=m["study_uid"],
        series_uid=m["series_uid"],
        sop_class_uid=m["sop_class_uid"],
        modality=m["modality"],
        view_position=m["view_position"],
        path=m["path"],
        size=int(m["size"]),
        sha256=m["sha256"],
        received_at=float(m["received_at"]),
        job_id=m["job_id"],
        skip_reason=m["skip_reason"],
    )


def _reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    text = str(reason).strip()
    return text[:REASON_MAX] or None


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def file_digest(path: Path) -> tuple[int, str]:
    """Size in bytes and hex SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(_READ_BLOCK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove ``path`` if it is still the file we put there (not a later writer's)."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_ino == inode:
            path.unlink()
