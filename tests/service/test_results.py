"""Stored results: round trips, lookup by hashed study UID, ids checked before any query."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.db import ServiceDatabase, results
from service.logs import hash_uid
from service.results import ResultStore, normalize_result_id

STUDY = "1.2.826.0.1.3680043.8.498.12345678901234567890"


@pytest.fixture
def store(db: ServiceDatabase) -> ResultStore:
    return ResultStore(db)


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x80"))
        + chunk(b"IEND", b"")
    )


PAYLOAD: dict[str, Any] = {
    "model": {"name": "kgdx", "version": "a1b2"},
    "findings": [{"concept": {"id": "X:1", "label": "Épanchement"}, "probability": 0.75}],
    "notes": [],
}


def test_put_get_round_trip(store: ResultStore) -> None:
    rid = store.put(PAYLOAD, model_version="a1b2", ontology_version="chest@3f2a")
    assert normalize_result_id(rid) == rid
    got = store.get(rid)
    assert got is not None
    assert got.id == rid
    assert got.payload == PAYLOAD
    assert got.model_version == "a1b2" and got.ontology_version == "chest@3f2a"
    assert got.study_uid_hash is None and got.has_image is False
    assert got.created_at.endswith("+00:00")
    assert store.image(rid) is None


def test_image_round_trip(store: ResultStore) -> None:
    png = tiny_png()
    rid = store.put(PAYLOAD, image_png=png)
    got = store.get(rid)
    assert got is not None and got.has_image
    assert store.image(rid) == png


def test_found_by_study_without_the_uid_at_rest(store: ResultStore, db: ServiceDatabase) -> None:
    first = store.put(PAYLOAD, study_uid=STUDY)
    second = store.put({**PAYLOAD, "notes": ["again"]}, study_uid=STUDY)
    store.put(PAYLOAD, study_uid="1.2.3.4")
    found = store.by_study(STUDY)
    assert [r.id for r in found] == [first, second]  # oldest first
    assert all(r.study_uid_hash == hash_uid(STUDY) for r in found)
    # DICOM pads odd-length UIDs with a NUL: the same study.
    assert [r.id for r in store.by_study(STUDY + "\x00")] == [first, second]
    assert store.by_study("1.2.3.5") == []
    assert store.by_study("") == []
    with db.read() as conn:
        rows = conn.execute(select(results)).all()
    assert STUDY not in repr(rows)
    if db.dialect == "sqlite":
        path = Path(str(db.engine.url.database))
        data = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert STUDY.encode() not in data


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "",
        "x" * 32,
        "'; DROP TABLE svc_results; --",
        "0" * 33,
        "0" * 10_000,
        None,
        123,
        ["a"],
    ],
)
def test_malformed_ids_are_none_not_errors(store: ResultStore, bad: Any) -> None:
    assert store.get(bad) is None
    assert store.image(bad) is None


def test_unknown_and_dashed_ids(store: ResultStore) -> None:
    assert store.get("0" * 32) is None
    rid = store.put(PAYLOAD)
    dashed = f"{rid[:8]}-{rid[8:12]}-{rid[12:16]}-{rid[16:20]}-{rid[20:]}".upper()
    got = store.get(dashed)
    assert got is not None and got.id == rid


def test_given_id_is_checked_and_unique(store: ResultStore) -> None:
    rid = "ab" * 16
    assert store.put(PAYLOAD, result_id=rid) == rid
    with pytest.raises(ValueError, match="already exists"):
        store.put(PAYLOAD, result_id=rid)
    with pytest.raises(ValueError, match="result_id"):
        store.put(PAYLOAD, result_id="../x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"payload": {"x": object()}}, "JSON"),
        ({"payload": {"p": float("nan")}}, "JSON"),
        ({"payload": ["not", "a", "dict"]}, "dict"),
        ({"payload": {}, "image_png": b"GIF89a..."}, "PNG"),
    ],
)
def test_bad_values_are_refused(store: ResultStore, kwargs: dict[str, Any], match: str) -> None:
    rest = dict(kwargs)  # parametrize shares the dict between backends
    payload = rest.pop("payload")
    with pytest.raises(ValueError, match=match):
        store.put(payload, **rest)


def test_oversized_image_is_refused(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.results.MAX_IMAGE_BYTES", 10)
    with pytest.raises(ValueError, match="downsized"):
        store.put(PAYLOAD, image_png=tiny_png())


# -- put_later: answered first, committed by the writer thread --------------------------------


def _committed(db: ServiceDatabase, rid: str) -> bool:
    with db.read() as conn:
        return conn.execute(select(results.c.id).where(results.c.id == rid)).first() is not None


def test_put_later_is_readable_at_once_and_committed_by_flush(
    store: ResultStore, db: ServiceDatabase
) -> None:
    import threading

    gate = threading.Event()
    original = store._write

    def held(batch: list[dict[str, Any]]) -> None:  # the writer waits until we have looked
        gate.wait(10)
        original(batch)

    store._write = held  # type: ignore[method-assign]
    png = tiny_png()
    rid = store.put_later(b'{"findings":[1]}', study_uid=STUDY, image_png=png, model_version="m1")
    assert not _committed(db, rid)  # still queued ...
    got = store.get(rid)  # ... yet served from memory
    assert got is not None and got.payload == {"findings": [1]} and got.has_image
    assert got.model_version == "m1" and got.study_uid_hash == hash_uid(STUDY)
    assert store.image(rid) == png
    assert [r.id for r in store.by_study(STUDY)] == [rid]
    gate.set()
    assert store.flush(10)
    assert _committed(db, rid)
    assert store.get(rid) == got  # the same result from the database
    assert [r.id for r in store.by_study(STUDY)] == [rid]


def test_put_later_groups_rows_and_keeps_study_order(store: ResultStore) -> None:
    ids = [store.put_later({"n": i}, study_uid=STUDY) for i in range(50)]
    early = [r.id for r in store.by_study(STUDY)]  # some committed, some pending: each once
    assert len(early) == 50 and set(early) == set(ids)
    assert store.flush(10)
    assert [r.payload["n"] for r in store.by_study(STUDY)] == list(range(50))


def test_put_later_checks_like_put(store: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="JSON"):
        store.put_later({"p": float("nan")})
    with pytest.raises(ValueError, match="JSON object"):
        store.put_later(b"[1, 2]")
    with pytest.raises(ValueError, match="PNG"):
        store.put_later(PAYLOAD, image_png=b"GIF89a")
    import threading

    gate = threading.Event()
    original = store._write
    store._write = lambda batch: (gate.wait(10), original(batch))  # type: ignore[method-assign]
    rid = store.put_later(PAYLOAD)
    with pytest.raises(ValueError, match="already exists"):
        store.put_later(PAYLOAD, result_id=rid)  # still pending
    gate.set()
    store.flush(10)
    rid = store.put_later(PAYLOAD)
    store.flush(10)
    store.put_later(PAYLOAD, result_id=rid)  # taken in the database: the writer says so
    store.flush(10)
    assert f"result {rid} not stored: its id already exists" in caplog.text


def test_put_later_writes_itself_when_the_queue_is_full_or_closed(
    store: ResultStore, db: ServiceDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store._writer, "max_pending", 0)
    rid = store.put_later(PAYLOAD)
    assert _committed(db, rid)  # back-pressure: written before returning
    assert store.get(rid) is not None
    monkeypatch.setattr(store._writer, "max_pending", 1024)
    store.close(10)
    rid = store.put_later(PAYLOAD)
    assert _committed(db, rid)


def test_close_writes_what_is_queued(db: ServiceDatabase) -> None:
    store = ResultStore(db)
    ids = [store.put_later({"n": i}) for i in range(20)]
    store.close(10)
    assert all(_committed(db, rid) for rid in ids)


def test_a_failing_database_is_retried_then_the_rows_given_up(
    store: ResultStore,
    db: ServiceDatabase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr(store._writer, "tries", 2)
    monkeypatch.setattr("service.write_behind.time.sleep", lambda s: None)
    calls = []

    @contextmanager
    def broken(**kwargs: Any) -> Any:
        calls.append(kwargs)
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))
        yield

    class Broken:  # the store's view of the database; the fixture's stays whole
        write = staticmethod(broken)
        read = staticmethod(db.read)

    store.db = Broken()  # type: ignore[assignment]
    rid = store.put_later(PAYLOAD)
    assert store.flush(10)
    assert len(calls) == 2
    assert store.get(rid) is None  # given up: gone from memory, never in the database
    assert "not stored after 2 tries: OperationalError" in caplog.text


def test_the_writer_survives_an_unexpected_error(
    store: ResultStore, db: ServiceDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    original = store._write
    calls = []

    def flaky(batch: list[dict[str, Any]]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")
        original(batch)

    store._write = flaky  # type: ignore[method-assign]
    lost = store.put_later(PAYLOAD)
    assert store.flush(10)
    kept = store.put_later(PAYLOAD)  # the thread is still there to write it
    assert store.flush(10)
    assert store.get(lost) is None and _committed(db, kept)
    assert "kgdx-results: 1 row(s) not stored" in caplog.text


def test_rows_retried_one_by_one_after_a_clash_are_not_reported_as_clashing(
    store: ResultStore,
    db: ServiceDatabase,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    monkeypatch.setattr("service.write_behind.time.sleep", lambda s: None)
    taken = store.put(PAYLOAD)
    real_write = db.write
    calls = {"n": 0}

    @contextmanager
    def flaky(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # the batch, the first single row, then a transient failure
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        with real_write(**kwargs) as conn:
            yield conn

    class Flaky:
        write = staticmethod(flaky)
        read = staticmethod(db.read)

    store.db = Flaky()  # type: ignore[assignment]
    gate_ids = [store.put_later(PAYLOAD), store.put_later(PAYLOAD, result_id=taken)]
    gate_ids.append(store.put_later(PAYLOAD))
    assert store.flush(10)
    store.db = db
    assert _committed(db, gate_ids[0]) and _committed(db, gate_ids[2])
    assert f"result {taken} not stored: its id already exists" in caplog.text
    for rid in (gate_ids[0], gate_ids[2]):
        assert f"result {rid} not stored" not in caplog.text
