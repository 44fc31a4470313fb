"""API keys: shown once, hashed at rest, compared in constant time, scoped, revocable."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from service import apikeys as apikeys_module
from service.apikeys import (
    SCOPES,
    ApiKey,
    ApiKeyNotFoundError,
    ApiKeyStore,
    has_scope,
    parse_key,
)
from service.db import ServiceDatabase, api_keys


@pytest.fixture
def keys(db: ServiceDatabase) -> ApiKeyStore:
    return ApiKeyStore(db)


def test_create_then_verify(keys: ApiKeyStore) -> None:
    record, plaintext = keys.create("orthanc", ["ingest", "predict"])
    assert parse_key(plaintext) == (record.key_id, plaintext.split("_", 2)[2])
    assert plaintext.startswith(f"kgdx_{record.key_id}_")
    assert len(plaintext.split("_", 2)[2]) >= 43  # 32 random bytes
    assert record.scopes == ("predict", "ingest")  # canonical order
    assert record.revoked is False and record.last_used_at is None
    got = keys.verify(plaintext)
    assert got is not None
    assert (got.key_id, got.name, got.scopes) == (record.key_id, "orthanc", record.scopes)
    assert got.last_used_at is not None


def test_secret_is_hashed_at_rest(keys: ApiKeyStore, db: ServiceDatabase) -> None:
    _, plaintext = keys.create("viewer", ["predict"])
    secret = plaintext.split("_", 2)[2]
    with db.read() as conn:
        rows = conn.execute(select(api_keys)).all()
    assert secret not in repr(rows)
    assert plaintext not in repr(rows)
    if db.dialect == "sqlite":
        path = Path(str(db.engine.url.database))
        data = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert data and secret.encode() not in data


def test_verify_compares_in_constant_time(
    keys: ApiKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, plaintext = keys.create("a", ["predict"])
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(apikeys_module.hmac, "compare_digest", spy)
    assert keys.verify(plaintext) is not None
    assert len(calls) == 1
    wrong = plaintext[:-4] + ("AAAA" if not plaintext.endswith("AAAA") else "BBBB")
    assert keys.verify(wrong) is None
    assert len(calls) == 2
    # An unknown key id costs the same comparison.
    assert keys.verify("kgdx_" + "f" * 12 + "_" + "A" * 43) is None
    assert len(calls) == 3


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "kgdx_",
        "Bearer kgdx_0123456789ab_" + "A" * 43,
        "kgdx_0123456789ab_short",
        "kgdx_XYZ_" + "A" * 43,
        "kgdx_0123456789ab_" + "A" * 43 + "!",
        "x" * 100_000,
        "kgdx_0123456789ab_" + "A" * 43 + "\x00",
        None,
        123,
        b"kgdx_0123456789ab_" + b"A" * 43,
    ],
)
def test_malformed_keys_are_none(keys: ApiKeyStore, presented: Any) -> None:
    keys.create("a", ["predict"])
    assert keys.verify(presented) is None


def test_another_keys_secret_does_not_verify(keys: ApiKeyStore) -> None:
    a, _ = keys.create("a", ["predict"])
    _, key_b = keys.create("b", ["predict"])
    crossed = f"kgdx_{a.key_id}_{key_b.split('_', 2)[2]}"
    assert keys.verify(crossed) is None


def test_revoke_by_name_and_by_id(keys: ApiKeyStore) -> None:
    a, key_a = keys.create("a", ["predict"])
    b, key_b = keys.create("b", ["admin"])
    revoked = keys.revoke("a")
    assert revoked.key_id == a.key_id and revoked.revoked
    assert keys.verify(key_a) is None
    assert keys.revoke(b.key_id).revoked
    assert keys.verify(key_b) is None
    assert keys.revoke(b.key_id).revoked  # again: a no-op
    assert [k.revoked for k in keys.list()] == [True, True]


def test_revoke_unknown_names_the_problem_without_the_secret(keys: ApiKeyStore) -> None:
    with pytest.raises(ApiKeyNotFoundError, match="no API key with id 'nobody'"):
        keys.revoke("nobody")
    with pytest.raises(ValueError):
        keys.revoke("")
    # A whole key pasted by mistake: the id is used, the secret never echoed.
    record, plaintext = keys.create("c", ["predict"])
    assert keys.revoke(plaintext).key_id == record.key_id
    secret = plaintext.split("_", 2)[2]
    with pytest.raises(ApiKeyNotFoundError) as info:
        keys.revoke(plaintext[:-1])
    assert secret[:-1] not in str(info.value)


def test_names_and_scopes_are_checked(keys: ApiKeyStore) -> None:
    with pytest.raises(ValueError, match=r"unknown scope 'write'.*predict, ingest, admin"):
        keys.create("a", ["predict", "write"])
    with pytest.raises(ValueError, match="at least one scope"):
        keys.create("a", [])
    for bad in ["", "   ", "a\nb", "x" * 101]:
        with pytest.raises(ValueError, match="name"):
            keys.create(bad, ["predict"])
    keys.create("dup", ["predict"])
    with pytest.raises(ValueError, match="already exists"):
        keys.create("dup", ["ingest"])
    keys.revoke("dup")
    keys.create("dup", ["ingest"])  # a revoked key's name is free again
    assert [k.name for k in keys.list()] == ["dup", "dup"]


def test_last_used_is_written_at_most_once_a_minute(keys: ApiKeyStore, db: ServiceDatabase) -> None:
    record, plaintext = keys.create("a", ["predict"])
    first = keys.verify(plaintext)
    assert first is not None and first.last_used_at is not None
    again = keys.verify(plaintext)
    assert again is not None and again.last_used_at == first.last_used_at
    with db.write() as conn:
        conn.execute(
            update(api_keys)
            .where(api_keys.c.key_id == record.key_id)
            .values(last_used_at="2000-01-01T00:00:00.000000+00:00")
        )
    later = keys.verify(plaintext)
    assert later is not None and later.last_used_at is not None
    assert later.last_used_at > "2000-01-02"
    [listed] = keys.list()
    assert listed.last_used_at == later.last_used_at


def test_find_reads_without_stamping_and_touch_stamps_when_due(keys: ApiKeyStore) -> None:
    """The server checks keys with ``find`` (a read) and stamps with ``touch`` only when due."""
    record, plaintext = keys.create("a", ["predict"])
    found = keys.find(plaintext)
    assert found is not None and found.key_id == record.key_id and found.last_used_at is None
    assert keys.stamp_due(found)
    stamped = keys.touch(found)
    assert stamped.last_used_at is not None and not keys.stamp_due(stamped)
    assert keys.touch(stamped) is stamped  # not due: no write
    keys.revoke("a")
    assert keys.find(plaintext) is None  # revocation is seen at once
    assert keys.find("kgdx_nope") is None


def test_has_scope() -> None:
    def key(*scopes: str, revoked: bool = False) -> ApiKey:
        return ApiKey("0123456789ab", "k", scopes, "2024-01-01", revoked, None)

    assert has_scope(key("predict"), "predict")
    assert not has_scope(key("predict"), "ingest")
    assert all(has_scope(key("admin"), s) for s in SCOPES)
    assert not has_scope(key("admin", revoked=True), "predict")
    with pytest.raises(ValueError, match="unknown scope"):
        has_scope(key("admin"), "root")


def test_keys_stay_out_of_logs(keys: ApiKeyStore, caplog: pytest.LogCaptureFixture) -> None:
    _, plaintext = keys.create("a", ["predict"])
    secret = plaintext.split("_", 2)[2]
    with caplog.at_level(logging.DEBUG):
        keys.verify(plaintext)
        keys.verify(plaintext[:-2] + "zz")
    assert secret not in caplog.text
