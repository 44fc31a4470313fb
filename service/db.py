"""The service's own tables (results, audit trail, API keys) and the engine they live on.

They sit in the same database as the ontology store (:class:`kg.store.GraphStore`): a SQLite
file under ``$KGDX_HOME`` by default, PostgreSQL by ``$KGDX_DB_URL`` when several replicas
share one. Every service table is named ``svc_*`` so it never meets the store's tables.

Adding a table (the durable ``svc_jobs`` and ``svc_instances`` of the DICOMweb ingest, say):
define it on :data:`metadata` below; :meth:`ServiceDatabase.create_all` creates any missing
table of :data:`metadata` when a process starts, so existing databases gain it on upgrade.
A change to an existing table needs a migration step keyed on :data:`SCHEMA_VERSION`, which
is recorded in ``svc_meta``; a process refuses a database written by a newer schema.

Writes go through :meth:`ServiceDatabase.write`: on SQLite it begins with ``BEGIN IMMEDIATE``
so a read-then-write transaction (claim a job, check a name then insert) cannot fail halfway
with ``SQLITE_BUSY``; on PostgreSQL it is a plain transaction (use ``FOR UPDATE SKIP LOCKED``
there to share work between replicas). Writers of one process take turns on a lock before
``BEGIN IMMEDIATE``, so they queue in order instead of polling SQLite's busy handler, which
sleeps up to 100 ms between tries.

Durability: ``write()`` flushes to disk before it returns (SQLite ``synchronous=FULL``,
PostgreSQL ``synchronous_commit=on``): what STOW-RS acknowledges to a PACS and the job queue
need that. ``write(durable=False)`` skips the flush (SQLite ``synchronous=NORMAL`` under WAL,
PostgreSQL ``synchronous_commit=off``): the transaction still survives a crash of the process
(SIGKILL), and the database is never corrupted, but a power cut or kernel crash may lose the
last such commits. That costs microseconds instead of a few milliseconds of fsync per
request, so the per-request result and audit writes of ``/v1/predict`` use it unless the
operator sets ``KGDX_DURABLE_RESULTS=true``.

Example::

    db = ServiceDatabase()          # $KGDX_DB_URL, else SQLite under $KGDX_HOME
    db.create_all()
    with db.write() as conn:
        conn.execute(results.insert().values(...))
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    inspect,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from kg.home import default_db_url
from kg.store import _normalize_url
from service.sqlite_reader import SqliteReader

__all__ = [
    "SCHEMA_VERSION",
    "ServiceDatabase",
    "api_keys",
    "audit",
    "make_engine",
    "metadata",
    "normalize_url",
    "results",
    "svc_meta",
    "utcnow",
]

#: Version of the service tables' layout; bump it with a migration when a column changes.
SCHEMA_VERSION = 1
#: How long a SQLite connection waits for another writer (an ontology load, say).
BUSY_TIMEOUT_S = 15.0
#: PostgreSQL advisory lock serializing table creation between replicas (``b"kgdxsvc"``).
PG_DDL_LOCK_KEY = int.from_bytes(b"kgdxsvc", "big")
#: Longest API key name.
NAME_MAX = 100

metadata = MetaData()

# 64-bit on PostgreSQL; SQLite only auto-increments a column declared plain INTEGER.
_BigId = BigInteger().with_variant(Integer, "sqlite")

#: Facts about the service tables themselves (``schema_version``, ``uid_salt_check``).
svc_meta = Table(
    "svc_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: One row per stored prediction. The study UID is kept only as :func:`service.logs.hash_uid`.
results = Table(
    "svc_results",
    metadata,
    #: uuid4, 32 lowercase hex digits.
    Column("id", String(32), primary_key=True),
    #: ISO 8601, UTC, microseconds.
    Column("created_at", String(40), nullable=False),
    Column("study_uid_hash", String(16), nullable=True),
    Column("model_version", String(200), nullable=False, default=""),
    Column("ontology_version", String(200), nullable=False, default=""),
    #: The response JSON.
    Column("payload", Text, nullable=False),
    #: A downsized PNG of the input, for the overlay endpoint.
    Column("image_png", LargeBinary, nullable=True),
    Index("ix_svc_results_study", "study_uid_hash", "created_at"),
)

#: Append-only: database triggers refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL).
audit = Table(
    "svc_audit",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("created_at", String(40), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("key_id", String(32), nullable=True),
    #: The route template (``/v1/studies/{uid}``), never the path with its UIDs.
    Column("route", String(200), nullable=False),
    Column("method", String(10), nullable=False),
    Column("status", Integer, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("study_uid_hash", String(16), nullable=True),
    Column("instance_uid_hash", String(16), nullable=True),
    Column("model_version", String(200), nullable=True),
    Column("ontology_version", String(200), nullable=True),
    #: JSON object of stage name -> milliseconds.
    Column("timings", Text, nullable=False, default="{}"),
    Index("ix_svc_audit_created", "created_at"),
)

#: API keys: only a salted HMAC of each secret is stored (see :mod:`service.apikeys`).
api_keys = Table(
    "svc_api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("name", String(NAME_MAX), nullable=False),
    #: Space-separated, in :data:`service.apikeys.SCOPES` order.
    Column("scopes", String(100), nullable=False),
    Column("salt", String(64), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("revoked_at", String(40), nullable=True),
    Column("last_used_at", String(40), nullable=True),
    # At most one active key per name, enforced by the database itself.
    Index(
        "uq_svc_api_keys_active_name",
        "name",
        unique=True,
        sqlite_where=literal_column("revoked_at IS NULL"),
        postgresql_where=literal_column("revoked_at IS NULL"),
    ),
)

_APPEND_ONLY = "audit log is append-only"
_SQLITE_TRIGGERS = {
    "svc_audit_no_update": (
        "CREATE TRIGGER IF NOT EXISTS svc_audit_no_update BEFORE UPDATE ON svc_audit "
        f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
    ),
    "svc_audit_no_delete": (
        "CREATE TRIGGER IF NOT EXISTS svc_audit_no_delete BEFORE DELETE ON svc_audit "
        f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
    ),
}
_PG_FUNCTION = (
    "CREATE OR REPLACE FUNCTION svc_audit_append_only() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN "
    f"RAISE EXCEPTION '{_APPEND_ONLY}' USING ERRCODE = 'insufficient_privilege'; "
    "END $$"
)
_PG_TRIGGERS = {
    "svc_audit_no_change": (
        "CREATE TRIGGER svc_audit_no_change BEFORE UPDATE OR DELETE ON svc_audit "
        "FOR EACH ROW EXECUTE FUNCTION svc_audit_append_only()"
    ),
    "svc_audit_no_truncate": (
        "CREATE TRIGGER svc_audit_no_truncate BEFORE TRUNCATE ON svc_audit "
        "FOR EACH STATEMENT EXECUTE FUNCTION svc_audit_append_only()"
    ),
}


def utcnow() -> str:
    """Now as ISO 8601 in UTC with microseconds: sorts as text in time order."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def normalize_url(url: str) -> URL:
    """Parse a database URL the way the ontology store does (``postgresql://`` -> psycopg 3).

    Raises :class:`kg.errors.StoreError` for an empty URL or a database other than SQLite
    and PostgreSQL.
    """
    return _normalize_url(url)


def make_engine(url: str | None = None) -> Engine:
    """An engine for ``url`` (``None``: :func:`kg.home.default_db_url`), tuned per backend.

    SQLite: WAL journal, foreign keys on, a busy timeout, usable from any thread, and
    ``BEGIN IMMEDIATE`` for connections with the ``kgdx_write`` execution option, no
    pre-ping (a file does not go away like a server); an in-memory database is one shared
    connection. PostgreSQL: psycopg 3 with
    ``pool_pre_ping`` so a restarted server does not fail the next request. Bound parameters
    are hidden from error messages and logs on both, as they may hold hashes or names.
    """
    u = normalize_url(url if url is not None else default_db_url())
    if u.get_backend_name() == "postgresql":
        return create_engine(u, pool_pre_ping=True, hide_parameters=True)
    database = u.database or ""
    memory = database in ("", ":memory:")
    if memory:
        engine = create_engine(
            u,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
            hide_parameters=True,
        )
    else:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            u,
            connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
            hide_parameters=True,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # SQLAlchemy's "begin" below issues BEGIN itself, so DDL (triggers) is transactional
        # too; the sqlite3 module would otherwise commit it behind our back.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            cur.execute("PRAGMA journal_mode = WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # A write takes the write lock up front: under WAL a deferred transaction that read
        # first fails with SQLITE_BUSY on its first write if another writer came in between,
        # without waiting for the busy timeout.
        options = conn.get_execution_options()
        write = options.get("kgdx_write", False)
        if write and not memory:
            # Per connection, outside a transaction, and only when it changes: each write
            # says how durable it must be.
            sync = "FULL" if options.get("kgdx_durable", True) else "NORMAL"
            info = conn.connection.info
            if info.get("kgdx_synchronous") != sync:
                conn.exec_driver_sql(f"PRAGMA synchronous = {sync}")
                info["kgdx_synchronous"] = sync
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class ServiceDatabase:
    """The service tables over one SQLAlchemy engine.

    Args:
        url: database URL; ``None`` means :func:`kg.home.default_db_url` (``$KGDX_DB_URL``,
            else a SQLite file under ``$KGDX_HOME``). Ignored when ``engine`` is given.
        engine: an engine to share (from :func:`make_engine`); the caller then owns it and
            :meth:`close` leaves it open.

    Call :meth:`create_all` once at start-up (the stores do not create tables themselves).
    """

    def __init__(self, url: str | None = None, engine: Engine | None = None):
        self._owns_engine = engine is None
        self.engine: Engine = engine if engine is not None else make_engine(url)
        self.dialect: str = self.engine.dialect.name
        database = self.engine.url.database or ""
        sqlite = self.dialect == "sqlite"
        # One shared connection behind an in-memory SQLite: take turns with it.
        self._memory_lock: threading.RLock | None = (
            threading.RLock() if sqlite and database in ("", ":memory:") else None
        )
        # SQLite has one writer at a time: this process's writers queue here, in order.
        self._write_lock: threading.RLock | None = (
            threading.RLock() if sqlite and self._memory_lock is None else None
        )
        # Hot-path single-row reads of a SQLite file bypass SQLAlchemy (see read_one).
        self._reader: SqliteReader | None = (
            SqliteReader(Path(database), busy_timeout_s=BUSY_TIMEOUT_S)
            if self._write_lock is not None
            else None
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Release pooled connections (unless the engine was handed in)."""
        if self._reader is not None:
            self._reader.close()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> ServiceDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServiceDatabase({self.url!r})"

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in a read transaction."""
        with self._turn(), self.engine.connect() as conn, conn.begin():
            yield conn

    def read_one(self, table: Table, column: Column[Any], value: object) -> Any | None:
        """The row of ``table`` whose ``column`` equals ``value`` (attribute access by
        column name), or ``None``; for lookups on a request's hot path.

        On a SQLite file the read goes straight through ``sqlite3``
        (:class:`~service.sqlite_reader.SqliteReader`), about 20 microseconds instead of
        100-500; elsewhere it is a SQLAlchemy ``SELECT`` in a read transaction.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database cannot be read.
        """
        if self._reader is None:
            with self.read() as conn:
                return conn.execute(select(table).where(column == value)).first()
        sql = f'SELECT * FROM "{table.name}" WHERE "{column.name}" = ?'
        try:
            return self._reader.one(sql, (value,))
        except sqlite3.Error as exc:
            raise OperationalError(sql, None, exc) from exc

    @contextmanager
    def write(self, *, durable: bool = True) -> Iterator[Connection]:
        """A connection in a write transaction, committed on success, rolled back on error.

        Args:
            durable: flush the commit to disk before returning (see the module docstring);
                ``False`` keeps it crash-safe but may lose it to a power cut.
        """
        with self._turn(), self._writer_turn(), self.engine.connect() as conn:
            conn = conn.execution_options(kgdx_write=True, kgdx_durable=durable)
            with conn.begin():
                if not durable and self.dialect == "postgresql":
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                yield conn

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def _turn(self) -> Iterator[None]:
        if self._memory_lock is None:
            yield
            return
        with self._memory_lock:
            yield

    # -- schema ------------------------------------------------------------------------------

    def create_all(self) -> None:
        """Create missing service tables and the audit triggers; check the schema version.

        Safe to call from every process at start: it looks first and only takes a write
        transaction (and, on PostgreSQL, an advisory lock) when something is missing.
        """
        if self._missing():
            with self.write() as conn:
                if self.dialect == "postgresql":
                    # Two replicas starting at once must not both create the tables.
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PG_DDL_LOCK_KEY,))
                metadata.create_all(conn)
                self._create_triggers(conn)
                has_version = conn.execute(
                    select(svc_meta.c.key).where(svc_meta.c.key == "schema_version")
                ).first()
                if has_version is None:
                    conn.execute(
                        svc_meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                    )
        found = self.meta("schema_version")
        if found is not None and int(found) > SCHEMA_VERSION:
            raise ValueError(
                f"the service tables in {self.url} have schema version {found}, newer than "
                f"this kgdx understands ({SCHEMA_VERSION}); upgrade kgdx"
            )

    def _missing(self) -> bool:
        with self.read() as conn:
            tables = set(inspect(conn).get_table_names())
            if not all(t in tables for t in metadata.tables):
                return True
            triggers = _triggers(conn, self.dialect)
        wanted = _SQLITE_TRIGGERS if self.dialect == "sqlite" else _PG_TRIGGERS
        return not set(wanted) <= triggers

    def _create_triggers(self, conn: Connection) -> None:
        if self.dialect == "sqlite":
            for ddl in _SQLITE_TRIGGERS.values():
                conn.exec_driver_sql(ddl)
            return
        conn.exec_driver_sql(_PG_FUNCTION)
        existing = _triggers(conn, self.dialect)
        for name, ddl in _PG_TRIGGERS.items():
            if name not in existing:
                conn.exec_driver_sql(ddl)

    def meta(self, key: str) -> str | None:
        """A value from ``svc_meta``, ``None`` when absent."""
        with self.read() as conn:
            value = conn.execute(select(svc_meta.c.value).where(svc_meta.c.key == key)).scalar()
        return None if value is None else str(value)

    def set_meta_once(self, key: str, value: str) -> str:
        """Record ``value`` under ``key`` unless one is there; returns the value that is."""
        try:
            with self.write() as conn:
                found = conn.execute(select(svc_meta.c.value).where(svc_meta.c.key == key)).scalar()
                if found is not None:
                    return str(found)
                conn.execute(svc_meta.insert().values(key=key, value=value))
                return value
        except IntegrityError:  # another replica recorded it first
            existing = self.meta(key)
            assert existing is not None
            return existing

    def check_uid_salt(self) -> None:
        """Fail when this process hashes UIDs differently from the data already stored.

        Results are found by hashed StudyInstanceUID, so a replica with another salt would
        silently find nothing. A fingerprint of the salt (the hash of a fixed probe, which
        reveals nothing of the salt) is recorded on first use and compared afterwards.
        """
        from service.logs import SALT_ENV, hash_uid

        probe = hash_uid("1.2.826.0.1.3680043.10.1336.kgdx-salt-check")
        assert probe is not None
        recorded = self.set_meta_once("uid_salt_check", probe)
        if recorded != probe:
            raise ValueError(
                f"this process hashes DICOM UIDs with a different salt than the data in "
                f"{self.url}; set {SALT_ENV} to the value the other kgdx processes use"
            )

    def drop_all(self) -> None:
        """Drop every service table (tests and ``reset`` tools only; audit rows go too)."""
        with self.write() as conn:
            metadata.drop_all(conn)
            if self.dialect == "postgresql":
                conn.exec_driver_sql("DROP FUNCTION IF EXISTS svc_audit_append_only()")


def _triggers(conn: Connection, dialect: str) -> set[str]:
    if dialect == "sqlite":
        rows = conn.execute(
            text("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'svc_audit'")
        )
    else:
        rows = conn.execute(
            text(
                "SELECT tgname FROM pg_trigger "
                "WHERE tgrelid = to_regclass('svc_audit') AND NOT tgisinternal"
            )
        )
    return {str(r[0]) for r in rows}
