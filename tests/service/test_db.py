"""The service database: engines per backend, table creation, schema and salt checks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from kg.errors import StoreError
from kg.store import GraphStore
from service.db import (
    SCHEMA_VERSION,
    ServiceDatabase,
    make_engine,
    metadata,
    svc_meta,
)
from service.results import ResultStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(
    request: pytest.FixtureRequest, tmp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A database URL with no service tables, for each backend."""
    monkeypatch.delenv("KGDX_UID_SALT", raising=False)
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_home / 'kgdx.db'}"
        return
    url = request.getfixturevalue("pg_url")
    with ServiceDatabase(url) as d:
        d.drop_all()
    yield url
    with ServiceDatabase(url) as d:
        d.drop_all()


@pytest.fixture
def db(db_url: str) -> Iterator[ServiceDatabase]:
    with ServiceDatabase(db_url) as d:
        d.create_all()
        yield d


def test_default_url_is_sqlite_under_home_with_pragmas(tmp_home: Path) -> None:
    engine = make_engine()
    try:
        assert engine.url.database == str(tmp_home / "kgdx.db")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 1000
    finally:
        engine.dispose()


def test_env_url_wins(tmp_path: Path, tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KGDX_DB_URL", f"sqlite:///{tmp_path / 'other.db'}")
    with ServiceDatabase() as d:
        assert d.dialect == "sqlite"
        assert d.engine.url.database == str(tmp_path / "other.db")


@pytest.mark.parametrize("url", ["postgresql://u:p@localhost/db", "postgres://u@h/db"])
def test_postgres_urls_use_psycopg3(url: str) -> None:
    engine = make_engine(url)  # lazy: nothing connects
    try:
        assert engine.url.drivername == "postgresql+psycopg"
    finally:
        engine.dispose()


@pytest.mark.parametrize("url", ["mysql://u@h/db", "", "postgresql+asyncpg://h/db"])
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        make_engine(url)


def test_create_all_is_idempotent_and_prefixed(db: ServiceDatabase) -> None:
    db.create_all()
    db.create_all()
    with db.read() as conn:
        names = set(inspect(conn).get_table_names())
    assert set(metadata.tables) <= names
    assert all(t.startswith("svc_") for t in metadata.tables)
    assert db.meta("schema_version") == str(SCHEMA_VERSION)


def test_lives_beside_the_ontology_store(db_url: str) -> None:
    with ServiceDatabase(db_url) as d:
        d.create_all()
        with GraphStore(db_url) as store:
            assert store.versions() == []
        with d.read() as conn:
            names = set(inspect(conn).get_table_names())
    assert "ontology_versions" in names and "svc_results" in names
    if not db_url.startswith("sqlite"):
        from kg import schema

        engine = make_engine(db_url)
        schema.metadata.drop_all(engine)
        engine.dispose()


def test_newer_schema_is_refused(db: ServiceDatabase) -> None:
    with db.write() as conn:
        conn.execute(
            svc_meta.update()
            .where(svc_meta.c.key == "schema_version")
            .values(value=str(SCHEMA_VERSION + 1))
        )
    with pytest.raises(ValueError, match="upgrade kgdx"):
        db.create_all()


def test_another_uid_salt_is_refused(db: ServiceDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    ResultStore(db)  # records this installation's salt fingerprint
    ResultStore(db)  # same salt: fine
    monkeypatch.setenv("KGDX_UID_SALT", "another-replica-with-its-own-salt")
    with pytest.raises(ValueError, match="KGDX_UID_SALT"):
        ResultStore(db)


def test_errors_hide_bound_parameters(db: ServiceDatabase) -> None:
    with db.write() as conn:
        conn.execute(svc_meta.insert().values(key="k", value="v"))
    with pytest.raises(IntegrityError) as info, db.write() as conn:
        conn.execute(svc_meta.insert().values(key="k", value="Doe^Jane"))
    assert "Doe^Jane" not in str(info.value)


def test_memory_database_is_shared_across_threads() -> None:
    with ServiceDatabase("sqlite://") as d:
        d.create_all()
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(20):
                    with d.write() as conn:
                        conn.execute(svc_meta.insert().values(key=f"t{i}-{j}", value="x"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with d.read() as conn:
            n = conn.execute(text("SELECT count(*) FROM svc_meta WHERE key LIKE 't%'")).scalar()
        assert n == 80


def test_read_then_write_transactions_do_not_fail_busy(tmp_home: Path) -> None:
    """BEGIN IMMEDIATE: concurrent read-modify-write transactions on a file all succeed."""
    with ServiceDatabase() as d:
        d.create_all()
        with d.write() as conn:
            conn.execute(svc_meta.insert().values(key="counter", value="0"))
        errors: list[BaseException] = []

        def bump() -> None:
            try:
                for _ in range(15):
                    with d.write() as conn:
                        v = conn.execute(
                            select(svc_meta.c.value).where(svc_meta.c.key == "counter")
                        ).scalar_one()
                        conn.execute(
                            svc_meta.update()
                            .where(svc_meta.c.key == "counter")
                            .values(value=str(int(v) + 1))
                        )
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert d.meta("counter") == "60"


def test_handed_in_engine_stays_open(tmp_home: Path) -> None:
    engine = make_engine()
    ServiceDatabase(engine=engine).close()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    engine.dispose()


def test_writes_flush_unless_told_not_to(db: ServiceDatabase) -> None:
    """``write()`` is flushed to disk at commit; ``write(durable=False)`` is only crash-safe."""
    if db.dialect == "sqlite":
        query, flushed, relaxed = "PRAGMA synchronous", 2, 1  # FULL, NORMAL
    else:  # durable writes keep the server's setting (the test server's may be off)
        query, relaxed = "SHOW synchronous_commit", "off"
        with db.read() as conn:
            flushed = conn.exec_driver_sql(query).scalar()
    with db.write() as conn:
        assert conn.exec_driver_sql(query).scalar() == flushed
    with db.write(durable=False) as conn:
        assert conn.exec_driver_sql(query).scalar() == relaxed
    with db.write() as conn:  # the relaxed setting does not stick to a pooled connection
        assert conn.exec_driver_sql(query).scalar() == flushed


def test_writers_of_one_process_take_turns(tmp_home: Path) -> None:
    """Many threads writing at once all commit, in turn, none failing busy."""
    db = ServiceDatabase()
    db.create_all()
    store = ResultStore(db, durable=False)
    errors: list[BaseException] = []

    def put() -> None:
        try:
            for _ in range(10):
                store.put({"findings": []})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM svc_results")).scalar() == 80
    db.close()
