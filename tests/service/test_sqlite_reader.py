"""Hot-path reads straight through sqlite3, and ServiceDatabase.read_one on both backends."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from service.apikeys import ApiKeyStore
from service.db import ServiceDatabase, api_keys
from service.sqlite_reader import SqliteReader


def test_read_one_sees_every_commit_at_once(db: ServiceDatabase) -> None:
    store = ApiKeyStore(db)
    created, key = store.create("ci", ["predict"])
    key_id = created.key_id
    row = db.read_one(api_keys, api_keys.c.key_id, key_id)
    assert row is not None and row.name == "ci" and row.revoked_at is None
    assert db.read_one(api_keys, api_keys.c.key_id, "nope") is None
    assert store.find(key) is not None
    store.revoke(key_id)  # another connection commits: the next read sees it
    row = db.read_one(api_keys, api_keys.c.key_id, key_id)
    assert row is not None and row.revoked_at is not None
    assert store.find(key) is None


def test_each_thread_reads_on_its_own_connection(tmp_home: Path) -> None:
    with ServiceDatabase() as db:
        db.create_all()
        key_id = ApiKeyStore(db).create("ci", ["predict"])[0].key_id
        names: list[str] = []

        def read() -> None:
            row = db.read_one(api_keys, api_keys.c.key_id, key_id)
            assert row is not None
            names.append(row.name)

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert names == ["ci"] * 4
        assert db._reader is not None and len(db._reader._all) == 4


def test_reader_connections_are_read_only_and_closed(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "x.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (a TEXT, b INTEGER)")
        conn.execute("INSERT INTO t VALUES ('x', 1)")
    reader = SqliteReader(path)
    row = reader.one("SELECT * FROM t WHERE a = ?", ("x",))
    assert row is not None and (row.a, row.b) == ("x", 1)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.one("INSERT INTO t VALUES ('y', 2)")
    reader.close()
    assert reader.one("SELECT * FROM t WHERE a = ?", ("x",)) is not None  # opens anew
    reader.close()


def test_a_missing_table_is_a_database_error(tmp_home: Path) -> None:
    with ServiceDatabase() as db:  # tables never created
        with pytest.raises(OperationalError, match="no such table"):
            db.read_one(api_keys, api_keys.c.key_id, "k")
        assert ApiKeyStore(db).find("kgdx_0123456789ab_" + "x" * 43) is None
