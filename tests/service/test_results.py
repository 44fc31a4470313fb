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
