"""The instance store: durable files + rows, idempotent by SOP Instance UID, on both backends."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import Connection, delete, select

import service.instances as si
from service.db import ServiceDatabase
from service.instances import InstanceIdentity, InstanceStore, instances
from tests.postgres import PostgresServer
from tests.service.images import dicom_dataset, write_dicom


@pytest.fixture(scope="module")
def pg_instances_url(pg_server: PostgresServer) -> str:
    """One PostgreSQL database for the module; each test empties the table."""
    url = pg_server.fresh_database("kgdx_inst")
    with ServiceDatabase(url) as d:
        d.create_all()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(
    request: pytest.FixtureRequest, tmp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServiceDatabase]:
    monkeypatch.delenv("KGDX_UID_SALT", raising=False)
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_home / 'kgdx.db'}"
    else:
        url = request.getfixturevalue("pg_instances_url")
    with ServiceDatabase(url) as d:
        d.create_all()
        with d.write() as conn:
            conn.execute(delete(instances))
        yield d


@pytest.fixture
def store(db: ServiceDatabase, tmp_home: Path) -> InstanceStore:
    return InstanceStore(db, tmp_home / "instances")


def instance(
    store: InstanceStore, ds: Dataset | None = None, *, extra: bytes = b"", **attrs: object
) -> tuple[Path, Dataset, bytes]:
    """A DICOM file in the store's spool: (path, dataset, bytes)."""
    if ds is None:
        ds = dicom_dataset(rows=8, columns=8, bits=8, **attrs)  # type: ignore[arg-type]
    data = write_dicom(ds) + extra
    path = store.spool / f"stow-{generate_uid()}.part"
    path.write_bytes(data)
    return path, ds, data


def count(db: ServiceDatabase) -> int:
    with db.read() as conn:
        return len(conn.execute(select(instances.c.sop_instance_uid)).all())


def test_store_moves_the_file_into_place_and_records_it(
    store: InstanceStore, db: ServiceDatabase
) -> None:
    path, ds, data = instance(store, ViewPosition="AP ")
    outcome = store.store(path, ds, now=1000.0)
    assert outcome.created and outcome.status == "created" and outcome.same_content
    row = outcome.row
    assert row.path == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    assert store.path_of(row) == (store.root / row.path).resolve()
    assert store.path_of(row).read_bytes() == data
    assert not path.exists()
    assert (row.size, row.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (row.modality, row.view_position, row.received_at) == ("DX", "AP", 1000.0)
    assert row.sop_class_uid == ds.SOPClassUID and row.job_id is None and row.skip_reason is None
    assert store.get(ds.SOPInstanceUID) == row
    assert store.by_study(ds.StudyInstanceUID) == [row]
    # Another store over the same database and folder (a restart) sees it.
    again = InstanceStore(db, store.root)
    assert again.get(ds.SOPInstanceUID) == row
    assert again.path_of(row).read_bytes() == data


def test_resending_the_same_bytes_is_idempotent(store: InstanceStore, db: ServiceDatabase) -> None:
    path, ds, _ = instance(store)
    first = store.store(path, ds, now=1.0)
    again, _, _ = instance(store, ds)
    outcome = store.store(again, ds, now=2.0)
    assert outcome.status == "duplicate" and not outcome.created and outcome.same_content
    assert outcome.row == first.row  # received_at stays the first one's
    assert not again.exists()
    assert count(db) == 1
    assert list(store.spool.iterdir()) == []
    files = [p for p in store.root.rglob("*") if p.is_file()]
    assert files == [store.path_of(first.row)]


def test_resending_other_bytes_keeps_the_first_copy(store: InstanceStore) -> None:
    path, ds, data = instance(store)
    first = store.store(path, ds)
    changed, _, _ = instance(store, ds, extra=b"\x00" * 16)
    outcome = store.store(changed, ds)
    assert outcome.status == "duplicate" and not outcome.same_content
    assert outcome.row == first.row
    assert store.path_of(first.row).read_bytes() == data
    assert not changed.exists()


def test_given_hash_and_skip_reason_are_recorded(store: InstanceStore) -> None:
    path, ds, data = instance(store)
    digest = hashlib.sha256(data).hexdigest()
    row = store.store(path, ds, sha256=digest, size=len(data), skip_reason="  not an image ").row
    assert row.sha256 == digest and row.skip_reason == "not an image"


@pytest.mark.parametrize(
    "attr, value",
    [
        ("SOPInstanceUID", None),
        ("StudyInstanceUID", "../../etc"),
        ("SeriesInstanceUID", "1.2.abc"),
        ("SOPClassUID", "1." + "2" * 70),
    ],
)
def test_missing_or_invalid_uids_are_refused(
    store: InstanceStore, attr: str, value: object
) -> None:
    path, ds, _ = instance(store)
    if value is None:
        delattr(ds, attr)
    else:
        setattr(ds, attr, value)
    with pytest.raises(ValueError, match=attr):
        store.store(path, ds)
    assert path.exists()  # left for the caller
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


def test_a_failed_commit_takes_the_file_back_out(
    store: InstanceStore, db: ServiceDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = db.write

    @contextmanager
    def failing_write() -> Iterator[Connection]:
        with real() as conn:
            yield conn
            raise RuntimeError("the database went away at commit")

    monkeypatch.setattr(db, "write", failing_write)
    path, ds, _ = instance(store)
    with pytest.raises(RuntimeError, match="at commit"):
        store.store(path, ds)
    monkeypatch.setattr(db, "write", real)
    assert store.get(ds.SOPInstanceUID) is None
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("where", ["replace", "fsync_dir", "mkdir"])
def test_a_full_disk_leaves_nothing_half_written(
    store: InstanceStore, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(si.os, "replace", full)
    elif where == "fsync_dir":
        monkeypatch.setattr(si, "_fsync_dir", full)
    else:
        monkeypatch.setattr(Path, "mkdir", full)
    path, ds, _ = instance(store)
    with pytest.raises(OSError) as caught:
        store.store(path, ds)
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert store.get(ds.SOPInstanceUID) is None
    assert [p for p in store.root.rglob("*") if p.is_file()] == []
    # The disk has room again: the same instance stores fine.
    path, ds, _ = instance(store, ds)
    assert store.store(path, ds).created


def test_an_orphan_file_from_a_crash_is_replaced(store: InstanceStore) -> None:
    path, ds, data = instance(store)
    ident = InstanceIdentity.from_dataset(ds)
    orphan = store.root / ident.relative_path
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half of a file")  # moved into place, then the process died
    row = store.store(path, ds).row
    assert store.path_of(row).read_bytes() == data


def test_concurrent_stores_of_one_instance_make_one_row(
    store: InstanceStore, db: ServiceDatabase
) -> None:
    ds = dicom_dataset(rows=8, columns=8, bits=8)
    paths = [instance(store, ds, extra=bytes([i]) * i)[0] for i in range(8)]
    outcomes = []
    barrier = threading.Barrier(len(paths))

    def run(p: Path) -> None:
        barrier.wait()
        outcomes.append(store.store(p, ds))

    threads = [threading.Thread(target=run, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.status for o in outcomes) == ["created"] + ["duplicate"] * 7
    assert count(db) == 1
    row = store.get(ds.SOPInstanceUID)
    assert row is not None
    assert hashlib.sha256(store.path_of(row).read_bytes()).hexdigest() == row.sha256
    assert list(store.spool.iterdir()) == []


def test_quiet_studies_wait_for_silence_and_for_work(store: InstanceStore) -> None:
    a = dicom_dataset(rows=8, columns=8, bits=8)
    a2 = dicom_dataset(rows=8, columns=8, bits=8, StudyInstanceUID=a.StudyInstanceUID)
    b = dicom_dataset(rows=8, columns=8, bits=8)
    sr = dicom_dataset(rows=8, columns=8, bits=8)
    store.store(instance(store, a)[0], a, now=100.0)
    store.store(instance(store, a2)[0], a2, now=104.0)
    store.store(instance(store, b)[0], b, now=101.0)
    store.store(instance(store, sr)[0], sr, now=90.0, skip_reason="non-image SOP class")
    assert store.quiet_studies(5.0, now=106.5) == [b.StudyInstanceUID]
    assert store.quiet_studies(5.0, now=109.0) == [b.StudyInstanceUID, a.StudyInstanceUID]
    assert store.set_job([b.SOPInstanceUID], "job-b") == 1
    assert store.set_job([b.SOPInstanceUID], "job-other") == 0  # already claimed
    assert store.get(b.SOPInstanceUID).job_id == "job-b"  # type: ignore[union-attr]
    assert store.quiet_studies(5.0, now=109.0) == [a.StudyInstanceUID]
    assert store.set_skipped(a.SOPInstanceUID, "lateral view")
    assert store.set_skipped(a2.SOPInstanceUID, "lateral view")
    assert not store.set_skipped("1.2.3.999", "unknown")
    assert store.quiet_studies(0.0, now=1e9) == []
    with pytest.raises(ValueError, match="stable_seconds"):
        store.quiet_studies(-1.0)


def test_set_job_in_the_callers_transaction(store: InstanceStore, db: ServiceDatabase) -> None:
    sops = []
    study = generate_uid()
    for _ in range(3):
        ds = dicom_dataset(rows=8, columns=8, bits=8, StudyInstanceUID=study)
        store.store(instance(store, ds)[0], ds)
        sops.append(ds.SOPInstanceUID)
    with pytest.raises(RuntimeError), db.write() as conn:
        assert store.set_job(sops, 7, conn=conn) == 3
        raise RuntimeError("the job insert failed")
    assert all(r.job_id is None for r in store.by_study(study))  # rolled back together
    assert store.set_job([*sops, *sops], 7) == 3
    assert {r.job_id for r in store.by_study(study)} == {"7"}
    assert store.set_job(sops, None, only_unassigned=False) == 3


def test_studies_summaries_filters_and_paging(store: InstanceStore) -> None:
    study = generate_uid()
    for i, modality in enumerate(["DX", "CR", "DX"]):
        ds = dicom_dataset(rows=8, columns=8, bits=8, modality=modality, StudyInstanceUID=study)
        store.store(instance(store, ds)[0], ds, now=10.0 + i)
    other = dicom_dataset(rows=8, columns=8, bits=8, modality="OT")
    store.store(instance(store, other)[0], other, now=5.0)
    everything = store.studies()
    assert [s.study_uid for s in everything] == [other.StudyInstanceUID, study]
    first = everything[1]
    assert (first.modalities, first.instances) == (("CR", "DX"), 3)
    assert (first.first_received_at, first.last_received_at) == (10.0, 12.0)
    assert store.studies(study_uids=[study]) == [first]
    assert store.studies(modalities=["cr"]) == [first]
    assert store.studies(modalities=["MR"]) == []
    assert store.studies(limit=1) == [everything[0]]
    assert store.studies(limit=1, offset=1) == [first]
    assert store.studies(offset=2) == []


def test_path_of_refuses_a_path_outside_the_store(store: InstanceStore) -> None:
    path, ds, _ = instance(store)
    row = store.store(path, ds).row
    with pytest.raises(ValueError, match="outside"):
        store.path_of(replace(row, path="../../kgdx.db"))


def test_old_spool_leftovers_are_removed(store: InstanceStore) -> None:
    old = store.spool / "stow-old.part"
    new = store.spool / "stow-new.part"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert store.clean_spool() == 1
    assert not old.exists() and new.exists()


def test_default_store_lives_under_kgdx_home(db: ServiceDatabase, tmp_home: Path) -> None:
    store = InstanceStore.default(db)
    assert store.root == tmp_home / "instances" and store.spool == tmp_home / "spool"
    assert store.root.is_dir() and store.spool.is_dir()
