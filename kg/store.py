"""The versioned ontology store: every loaded ontology version, in SQLite or PostgreSQL.

A version is identified by ``name@version`` where ``version`` is
:meth:`Ontology.content_hash() <kg.ontology.Ontology.content_hash>`; saving the same content
under the same name again is a no-op. A stored version is immutable. Each name has at most one
*active* version, which is what ``name`` alone refers to.

Writes take a store-wide lock that fails fast, so two loads at once cannot interleave: a
non-blocking file lock next to a SQLite database, a transaction-scoped advisory lock on
PostgreSQL. A save is one transaction: either the whole version is there or nothing changed.

Example::

    store = GraphStore()                          # SQLite under $KGDX_HOME
    info, created = store.save(ontology, activate=True)
    graph = store.graph("hp")                     # cached ConceptGraph for path queries
    store.search("seizure", "hp", limit=5)
"""

from __future__ import annotations

import gc
import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import filelock
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    case,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import StaticPool

from kg import schema
from kg.errors import (
    DanglingReferenceError,
    KgError,
    NotFoundError,
    OntologyValidationError,
    StoreBusyError,
    StoreError,
)
from kg.graph import ConceptGraph
from kg.home import default_db_url
from kg.ontology import HIERARCHY_RELATIONS, Concept, Ontology, Relation
from kg.search import (
    Candidate,
    NameRow,
    PostgresSearch,
    SearchHit,
    SqliteSearch,
    fold,
    name_rows,
    query_tokens,
    rank_hits,
    sort_key,
)

__all__ = ["GraphStore", "Progress", "SearchHit", "VersionInfo"]

#: ``progress(done, total)``: rows written so far out of concepts + relations.
Progress = Callable[[int, int], None]

#: Rows per bulk insert inside a save's transaction (bounds memory for huge ontologies).
CHUNK_ROWS = 20_000
#: How long a SQLite connection waits for another writer before giving up.
BUSY_TIMEOUT_S = 30.0
#: Key of the PostgreSQL advisory lock that serializes writes (``b"kgdxont"`` as an int).
PG_LOCK_KEY = int.from_bytes(b"kgdxont", "big")
#: Most hits one search may return.
MAX_LIMIT = 1000

_BUSY = "another ontology load is in progress ({}); try again when it has finished"
_VERSION_PREFIX = re.compile(r"[0-9a-f]{6,64}")
_T = TypeVar("_T")


@dataclass(frozen=True)
class VersionInfo:
    """One stored ontology version.

    Args:
        name: the ontology's name (``hp``, ``mondo``, ``radlex`` ...).
        version: content hash of the ontology, 16 hex digits.
        active: whether ``name`` alone refers to this version.
        n_concepts: number of concepts, obsolete ones included.
        n_relations: number of relations.
        format: source format from the ontology's meta (``obo``, ``owl`` ...), may be empty.
        source: where it was loaded from (``meta["source"]``), may be empty.
        created_at: when it was saved, ISO 8601 in UTC.
        meta: the ontology's free-form ``meta`` as saved.
    """

    name: str
    version: str
    active: bool
    n_concepts: int
    n_relations: int
    format: str
    source: str
    created_at: str
    meta: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def ref(self) -> str:
        """``name@version``, the reference that always means this version."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class _Stored:
    """A version row: database id and public info."""

    id: int
    info: VersionInfo


class GraphStore:
    """Versioned ontology storage over one SQLAlchemy engine.

    Args:
        url: database URL; ``None`` means :func:`kg.home.default_db_url` (a SQLite file under
            ``$KGDX_HOME`` unless ``$KGDX_DB_URL`` says otherwise). ``sqlite:///path`` and
            ``postgresql://...`` (rewritten to the psycopg 3 driver) are supported.

    Tables are created on first use. Read methods take an optional ``ref`` resolved by
    :meth:`resolve`. Close the store (or use it as a context manager) to release connections.
    """

    def __init__(self, url: str | None = None):
        self._url = _normalize_url(url if url is not None else default_db_url())
        self.dialect = self._url.get_backend_name()
        self._graphs: dict[tuple[int, str], ConceptGraph] = {}
        self._graphs_lock = threading.Lock()
        self._lock_path: Path | None = None
        self._memory_lock = threading.Lock()
        if self.dialect == "sqlite":
            self._engine = self._sqlite_engine()
            self._search: type[SqliteSearch] | type[PostgresSearch] = SqliteSearch
            tables: tuple[Table, ...] = schema.COMMON_TABLES
        else:
            self._engine = create_engine(self._url, pool_pre_ping=True)
            self._search = PostgresSearch
            tables = schema.COMMON_TABLES + schema.POSTGRES_TABLES
        self._create_tables(tables)

    def _create_tables(self, tables: tuple[Table, ...]) -> None:
        # Look first, so that opening a store never waits for a running load's write lock.
        with self._engine.connect() as conn:
            existing = set(inspect(conn).get_table_names())
        if all(t.name in existing for t in tables):
            return
        with self._engine.connect() as conn:
            conn = conn.execution_options(kgdx_write=True)
            with conn.begin():
                if self.dialect == "postgresql":
                    # Two replicas starting at once must not both create the tables.
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (PG_LOCK_KEY + 1,))
                schema.metadata.create_all(conn, tables=list(tables))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Release pooled connections and drop cached graphs."""
        with self._graphs_lock:
            self._graphs.clear()
        self._engine.dispose()

    def __enter__(self) -> GraphStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GraphStore({self.url!r})"

    def _sqlite_engine(self) -> Engine:
        database = self._url.database or ""
        memory = database in ("", ":memory:")
        if memory:
            engine = create_engine(
                self._url, poolclass=StaticPool, connect_args={"check_same_thread": False}
            )
        else:
            path = Path(database).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_path = path.with_name(path.name + ".lock")
            engine = create_engine(
                self._url,
                connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
            )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" below issue BEGIN, so DDL (the FTS table) is
            # transactional too; the sqlite3 module would otherwise autocommit it.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA cache_size = -65536")
            if not memory:
                cur.execute("PRAGMA journal_mode = WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # A write takes SQLite's write lock up front: a deferred transaction that read
            # first could fail with SQLITE_BUSY on its first write under WAL.
            write = conn.get_execution_options().get("kgdx_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction under the store-wide lock; raises StoreBusyError if held."""
        where = self.url
        with self._process_lock(where), self._engine.connect() as conn:
            conn = conn.execution_options(kgdx_write=True)
            try:
                with conn.begin():
                    if self.dialect == "postgresql":
                        got = conn.exec_driver_sql(
                            "SELECT pg_try_advisory_xact_lock(%s)", (PG_LOCK_KEY,)
                        ).scalar()
                        if not got:
                            raise StoreBusyError(_BUSY.format(where))
                    yield conn
            except OperationalError as exc:
                if "locked" in str(exc.orig):
                    raise StoreBusyError(
                        f"the ontology store {where} is locked by another writer; try again later"
                    ) from exc
                raise

    @contextmanager
    def _process_lock(self, where: str) -> Iterator[None]:
        if self.dialect != "sqlite":
            yield
            return
        if self._lock_path is None:
            if not self._memory_lock.acquire(blocking=False):
                raise StoreBusyError(_BUSY.format(where))
            try:
                yield
            finally:
                self._memory_lock.release()
            return
        lock = filelock.FileLock(str(self._lock_path), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise StoreBusyError(_BUSY.format(where)) from None
        try:
            yield
        finally:
            lock.release()

    def save(
        self,
        ontology: Ontology,
        *,
        activate: bool = False,
        progress: Progress | None = None,
    ) -> tuple[VersionInfo, bool]:
        """Store ``ontology`` as a new version of ``ontology.name`` in one transaction.

        Args:
            ontology: what to store; every relation must join two of its concepts.
            activate: make the new (or already stored) version the active one of its name.
                The first version of a name is always activated.
            progress: called as ``progress(done, total)`` while rows are written.

        Returns:
            ``(info, created)``; ``created`` is False when the same name and content were
            already stored, in which case nothing is written (except activation).

        Raises:
            StoreBusyError: another load holds the store's lock.
            DanglingReferenceError: a relation points at an undefined concept.
        """
        name = _check_name(ontology.name)
        ids = sorted(ontology.concepts)
        index = {cid: i for i, cid in enumerate(ids)}
        for cid in ids:
            if ontology.concepts[cid].id != cid:
                raise OntologyValidationError(
                    f"concept stored under key {cid!r} has id {ontology.concepts[cid].id!r}"
                )
        missing = [
            (r.subject, r.predicate, r.object)
            for r in ontology.relations
            if r.subject not in index or r.object not in index
        ]
        if missing:
            raise DanglingReferenceError(missing)
        version = ontology.content_hash()
        meta = {str(k): str(v) for k, v in ontology.meta.items()}
        n_rel = len(ontology.relations)
        total = len(ids) + n_rel
        t = schema.ontology_versions

        with self._write() as conn:
            rows = self._stored(conn)
            for s in rows:
                if s.info.name == name and s.info.version == version:
                    if activate and not s.info.active:
                        self._set_active(conn, s)
                        return self._get(conn, s.id).info, False
                    return s.info, False
            first = not any(s.info.name == name for s in rows)
            make_active = activate or first
            if make_active:
                conn.execute(t.update().where(t.c.name == name).values(active=False))
            pk = conn.execute(
                t.insert().values(
                    name=name,
                    version=version,
                    format=meta.get("format", ""),
                    source=meta.get("source", ""),
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    n_concepts=len(ids),
                    n_relations=n_rel,
                    active=make_active,
                    meta=json.dumps(meta, ensure_ascii=False, sort_keys=True),
                )
            ).inserted_primary_key
            assert pk is not None
            vid = int(pk[0])
            done = n_names = 0
            if progress is not None:
                progress(done, total)
            if self.dialect == "sqlite":
                SqliteSearch.create(conn, vid)
            for chunk in _chunks(enumerate(ids), CHUNK_ROWS):
                n_names += self._write_concepts(
                    conn, vid, [(i, ontology.concepts[c]) for i, c in chunk], n_names
                )
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            for start, rel_chunk in _enumerated_chunks(ontology.relations, CHUNK_ROWS):
                self._bulk(
                    conn,
                    "relations",
                    (
                        "version_id",
                        "pos",
                        "subject_idx",
                        "object_idx",
                        "predicate",
                        "weight",
                        "source",
                    ),
                    [
                        (
                            vid,
                            start + k,
                            index[r.subject],
                            index[r.object],
                            r.predicate,
                            r.weight,
                            r.source,
                        )
                        for k, r in enumerate(rel_chunk)
                    ],
                )
                done += len(rel_chunk)
                if progress is not None:
                    progress(done, total)
            if self.dialect == "sqlite":
                SqliteSearch.finish(conn, vid)
            else:
                PostgresSearch.finish(conn)
            return self._get(conn, vid).info, True

    def _write_concepts(
        self, conn: Connection, vid: int, chunk: Sequence[tuple[int, Concept]], seq: int
    ) -> int:
        """Write concepts, their xrefs and searchable names; returns the number of names."""
        self._bulk(
            conn,
            "concepts",
            (
                "version_id",
                "idx",
                "concept_id",
                "label",
                "definition",
                "synonyms",
                "xrefs",
                "obsolete",
                "replaced_by",
            ),
            [
                (
                    vid,
                    i,
                    c.id,
                    c.label,
                    c.definition,
                    _dump(c.synonyms),
                    _dump(c.xrefs),
                    bool(c.obsolete),
                    _dump(c.replaced_by),
                )
                for i, c in chunk
            ],
        )
        self._bulk(
            conn,
            "xrefs",
            ("version_id", "xref", "idx"),
            [(vid, x, i) for i, c in chunk for x in dict.fromkeys(c.xrefs)],
        )
        names: list[NameRow] = list(name_rows((i, c.label, c.synonyms) for i, c in chunk))
        if self.dialect == "sqlite":
            SqliteSearch.insert(conn, vid, names, seq)
        else:
            self._bulk(
                conn,
                "concept_names",
                ("version_id", "idx", "name", "folded", "kind", "sort_key"),
                [(vid, i, n, fold(n), k, sort_key(n, k)) for i, n, k in names],
            )
        return len(names)

    def _bulk(
        self, conn: Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
    ) -> None:
        """Insert ``rows`` fast: COPY on PostgreSQL, ``executemany`` on SQLite."""
        if not rows:
            return
        cols = ", ".join(columns)
        if self.dialect == "postgresql":
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in columns)
            conn.exec_driver_sql(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)

    def activate(self, ref: str) -> VersionInfo:
        """Make the version ``ref`` names the only active version of its name."""
        with self._write() as conn:
            s = self._resolve(conn, ref)
            self._set_active(conn, s)
            return self._get(conn, s.id).info

    @staticmethod
    def _set_active(conn: Connection, s: _Stored) -> None:
        t = schema.ontology_versions
        conn.execute(t.update().where(t.c.name == s.info.name).values(active=False))
        conn.execute(t.update().where(t.c.id == s.id).values(active=True))

    def remove(self, ref: str) -> list[VersionInfo]:
        """Delete ``name@version``, or every version of ``name``; returns what was removed.

        Raises :class:`NotFoundError` when nothing matches ``ref``.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise KgError(f"remove needs an ontology name or name@version, got {ref!r}")
        with self._write() as conn:
            if "@" in ref:
                doomed = [self._resolve(conn, ref)]
            else:
                name = ref.strip()
                doomed = [s for s in self._stored(conn) if s.info.name == name]
                if not doomed:
                    self._resolve(conn, name)  # raises NotFoundError listing the names
            for s in doomed:
                if self.dialect == "sqlite":
                    SqliteSearch.drop(conn, s.id)
                tables = [schema.concept_names] if self.dialect == "postgresql" else []
                for tbl in [*tables, schema.relations, schema.xrefs, schema.concepts]:
                    conn.execute(tbl.delete().where(tbl.c.version_id == s.id))
                t = schema.ontology_versions
                conn.execute(t.delete().where(t.c.id == s.id))
        with self._graphs_lock:
            for s in doomed:
                self._graphs.pop((s.id, s.info.version), None)
        return [s.info for s in doomed]

    # -- resolving ---------------------------------------------------------------------------

    def versions(self, name: str | None = None) -> list[VersionInfo]:
        """Stored versions, of one name or of all, by name and then oldest first."""
        with self._engine.connect() as conn:
            return [s.info for s in self._stored(conn) if name is None or s.info.name == name]

    def resolve(self, ref: str | None = None) -> VersionInfo:
        """The version a reference means.

        ``name`` is the active version of ``name`` (the newest if none is active);
        ``name@version`` a version whose hash starts with ``version`` (6 hex digits or
        more); ``None`` the ontology named by ``$KGDX_ONTOLOGY`` or else the only stored one.
        """
        with self._engine.connect() as conn:
            return self._resolve(conn, ref).info

    def _stored(self, conn: Connection) -> list[_Stored]:
        t = schema.ontology_versions
        rows = conn.execute(select(t).order_by(t.c.name, t.c.id)).all()
        return [_row_to_stored(r._mapping) for r in rows]

    def _get(self, conn: Connection, vid: int) -> _Stored:
        t = schema.ontology_versions
        return _row_to_stored(conn.execute(select(t).where(t.c.id == vid)).one()._mapping)

    def _resolve(self, conn: Connection, ref: str | None) -> _Stored:
        stored = self._stored(conn)
        names = sorted({s.info.name for s in stored})
        if ref is None:
            ref = os.environ.get("KGDX_ONTOLOGY", "").strip() or None
        if ref is None:
            if len(names) == 1:
                ref = names[0]
            elif not names:
                raise NotFoundError(
                    "no ontology is stored yet; load one with `kgdx ontology load FILE`"
                )
            else:
                raise NotFoundError(
                    f"several ontologies are stored ({', '.join(names)}); name one, "
                    "or set KGDX_ONTOLOGY"
                )
        if not isinstance(ref, str):
            raise KgError(f"ontology reference must be a string, got {ref!r}")
        name, sep, prefix = ref.strip().partition("@")
        if not name:
            raise KgError(f"ontology reference must be name or name@version, got {ref!r}")
        mine = [s for s in stored if s.info.name == name]
        if not mine:
            choices = ", ".join(names) if names else "none"
            raise NotFoundError(f"no ontology named {name!r} (stored: {choices})")
        if not sep:
            active = [s for s in mine if s.info.active]
            return active[0] if active else mine[-1]
        prefix = prefix.strip().lower()
        if not _VERSION_PREFIX.fullmatch(prefix):
            raise KgError(f"version in {ref!r} must be at least 6 hex digits of the content hash")
        matches = [s for s in mine if s.info.version.startswith(prefix)]
        if not matches:
            have = ", ".join(s.info.version for s in mine)
            raise NotFoundError(f"no version {prefix!r} of {name!r} (stored: {have})")
        if len(matches) > 1:
            raise KgError(
                f"version prefix {prefix!r} of {name!r} is ambiguous: "
                + ", ".join(s.info.version for s in matches)
            )
        return matches[0]

    # -- reading -----------------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        """Driver SQL written with ``?`` placeholders, in the driver's paramstyle."""
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def load(self, ref: str | None = None) -> Ontology:
        """The whole stored ontology; its ``content_hash()`` equals the stored version."""
        with _gc_paused(), self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            crow = conn.exec_driver_sql(
                self._sql(
                    "SELECT concept_id, label, definition, synonyms, xrefs, obsolete, "
                    "replaced_by FROM concepts WHERE version_id = ? ORDER BY idx"
                ),
                (s.id,),
            ).all()
            concepts = {r[0]: _concept(r) for r in crow}
            ids = [r[0] for r in crow]
            rrows = conn.exec_driver_sql(
                self._sql(
                    "SELECT subject_idx, object_idx, predicate, weight, source "
                    "FROM relations WHERE version_id = ? ORDER BY pos"
                ),
                (s.id,),
            ).all()
            rels = [Relation(ids[a], p, ids[b], w, src) for a, b, p, w, src in rrows]
        return Ontology(name=s.info.name, concepts=concepts, relations=rels, meta=dict(s.info.meta))

    def graph(self, ref: str | None = None) -> ConceptGraph:
        """The version's :class:`ConceptGraph`, built from raw rows and cached per version.

        Equal to ``ConceptGraph.from_ontology(self.load(ref))``, much faster. The returned
        graph is shared: treat it as read-only.
        """
        with self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            key = (s.id, s.info.version)
            with self._graphs_lock:
                cached = self._graphs.get(key)
            if cached is not None:
                return cached
            with _gc_paused():
                graph = self._build_graph(conn, s.id)
        with self._graphs_lock:
            return self._graphs.setdefault(key, graph)

    def _build_graph(self, conn: Connection, vid: int) -> ConceptGraph:
        nodes = conn.exec_driver_sql(
            self._sql("SELECT concept_id, label FROM concepts WHERE version_id = ? ORDER BY idx"),
            (vid,),
        ).all()
        edges = conn.exec_driver_sql(
            self._sql(
                "SELECT subject_idx, object_idx, predicate, weight FROM relations "
                "WHERE version_id = ? ORDER BY pos"
            ),
            (vid,),
        ).all()
        ids = [r[0] for r in nodes]
        labels = [r[1] or r[0] for r in nodes]
        predicates = sorted({r[2] for r in edges})
        rel_index = {p: i for i, p in enumerate(predicates)}
        return ConceptGraph.from_edges(
            ids, labels, predicates, [(a, b, rel_index[p], w) for a, b, p, w in edges]
        )

    def concept(self, concept_id: str, ref: str | None = None) -> Concept:
        """One concept; :class:`NotFoundError` names the id when the version lacks it."""
        with self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            r = (
                conn.exec_driver_sql(
                    self._sql(
                        "SELECT concept_id, label, definition, synonyms, xrefs, obsolete, "
                        "replaced_by FROM concepts WHERE version_id = ? AND concept_id = ?"
                    ),
                    (s.id, concept_id),
                ).first()
                if "\x00" not in concept_id
                else None
            )
        if r is None:
            raise NotFoundError(f"unknown concept id {concept_id!r} in {s.info.ref}")
        return _concept(r)

    def search(self, text: str, ref: str | None = None, limit: int = 20) -> list[SearchHit]:
        """Concepts whose label, synonym or id matches ``text``, best first.

        Every word of ``text`` must match a word of the name, as a prefix when it has two or
        more characters; case and accents are ignored. Exact label or id matches come first.
        Raises :class:`KgError` for empty text or a limit outside 1..1000.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise KgError(f"limit must be an integer in 1..{MAX_LIMIT}, got {limit!r}")
        tokens = query_tokens(text)
        text = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL; no name has one
        with self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            candidates: list[Candidate] = []
            r = conn.exec_driver_sql(
                self._sql(
                    "SELECT idx, concept_id, label, obsolete FROM concepts "
                    "WHERE version_id = ? AND concept_id = ?"
                ),
                (s.id, text.strip()),
            ).first()
            if r is not None:
                candidates.append((r[0], r[1], 0, 0.0, r[1], r[2], bool(r[3])))
            if tokens:
                candidates += self._search.candidates(conn, s.id, tokens, limit)
        return rank_hits(text, candidates, limit)

    def by_xref(self, xref: str, ref: str | None = None) -> list[str]:
        """Ids of the concepts carrying cross-reference ``xref`` (e.g. ``UMLS:C0032285``)."""
        xref = xref.strip()
        with self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            if "\x00" in xref:
                return []
            rows = conn.exec_driver_sql(
                self._sql(
                    "SELECT c.concept_id FROM xrefs AS x JOIN concepts AS c "
                    "ON c.version_id = x.version_id AND c.idx = x.idx "
                    "WHERE x.version_id = ? AND x.xref = ? ORDER BY c.concept_id"
                ),
                (s.id, xref),
            ).all()
        return [r[0] for r in rows]

    def parents(
        self, concept_id: str, ref: str | None = None, relation: str = HIERARCHY_RELATIONS[0]
    ) -> list[str]:
        """Direct targets of ``concept_id -relation->`` (its ``is_a`` parents by default)."""
        return self._neighbours(concept_id, ref, relation, 1)

    def children(
        self, concept_id: str, ref: str | None = None, relation: str = HIERARCHY_RELATIONS[0]
    ) -> list[str]:
        """Direct sources of ``-relation-> concept_id`` (its ``is_a`` children by default)."""
        return self._neighbours(concept_id, ref, relation, -1)

    def _neighbours(
        self, concept_id: str, ref: str | None, relation: str, direction: int
    ) -> list[str]:
        g = self.graph(ref)
        u = g.node(concept_id)
        return sorted(
            {
                g.ids[v]
                for v, r, d, _ in g.adjacency[u]
                if d == direction and g.relations[r] == relation
            }
        )

    def stats(self, ref: str | None = None) -> dict[str, Any]:
        """Counts describing one version.

        Keys: ``ref``, ``concepts``, ``obsolete``, ``with_definition``, ``synonyms``,
        ``relations`` (count by predicate), ``xrefs`` (count by prefix), ``roots``
        (non-obsolete concepts without an ``is_a`` parent, when the version has ``is_a``).
        """
        c = schema.concepts
        rel = schema.relations
        with self._engine.connect() as conn:
            s = self._resolve(conn, ref)
            n, obsolete, with_def = conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((c.c.obsolete, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((c.c.definition != "", 1), else_=0)), 0),
                ).where(c.c.version_id == s.id)
            ).one()
            by_predicate: dict[str, int] = dict(
                conn.execute(
                    select(rel.c.predicate, func.count())
                    .where(rel.c.version_id == s.id)
                    .group_by(rel.c.predicate)
                    .order_by(rel.c.predicate)
                )
                .tuples()
                .all()
            )
            synonyms = sum(
                len(_load(x))
                for x in conn.execute(
                    select(c.c.synonyms).where(c.c.version_id == s.id, c.c.synonyms.is_not(None))
                ).scalars()
            )
            prefixes = Counter(
                x.split(":", 1)[0] if ":" in x else ""
                for x in conn.execute(
                    select(schema.xrefs.c.xref).where(schema.xrefs.c.version_id == s.id)
                ).scalars()
            )
            obsolete_idx = set(
                conn.execute(select(c.c.idx).where(c.c.version_id == s.id, c.c.obsolete)).scalars()
            )
        out: dict[str, Any] = {
            "ref": s.info.ref,
            "concepts": int(n),
            "obsolete": int(obsolete),
            "with_definition": int(with_def),
            "synonyms": synonyms,
            "relations": by_predicate,
            "xrefs": dict(sorted(prefixes.items())),
        }
        hierarchy = HIERARCHY_RELATIONS[0]
        if hierarchy in by_predicate:
            g = self.graph(s.info.ref)
            r_h = g.relations.index(hierarchy)
            out["roots"] = sum(
                1
                for u, adj in enumerate(g.adjacency)
                if u not in obsolete_idx and not any(d == 1 and r == r_h for _, r, d, _ in adj)
            )
        return out


# -- helpers ---------------------------------------------------------------------------------


def _normalize_url(url: str) -> URL:
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"database URL must be a non-empty string, got {url!r}")
    u = make_url(url.strip())
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        u = u.set(drivername="postgresql+psycopg")
    backend = u.get_backend_name()
    if backend == "postgresql" and u.drivername != "postgresql+psycopg":
        raise StoreError(f"PostgreSQL is supported through psycopg 3 only, got {u.drivername!r}")
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {u.drivername!r}: use sqlite:// or postgresql://")
    return u


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise KgError(f"ontology name must be a non-empty string, got {name!r}")
    if (
        name != name.strip()
        or "@" in name
        or not name.isprintable()  # control characters would reach terminals and logs
        or len(name) > schema.NAME_MAX
    ):
        raise KgError(
            f"ontology name must have no '@', no control characters, no surrounding spaces "
            f"and at most {schema.NAME_MAX} characters, got {name!r}"
        )
    return name


def _row_to_stored(m: Any) -> _Stored:
    return _Stored(
        id=m["id"],
        info=VersionInfo(
            name=m["name"],
            version=m["version"],
            active=bool(m["active"]),
            n_concepts=m["n_concepts"],
            n_relations=m["n_relations"],
            format=m["format"],
            source=m["source"],
            created_at=m["created_at"],
            meta=json.loads(m["meta"] or "{}"),
        ),
    )


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building big acyclic structures.

    Allocating some 100k row tuples and adjacency lists sets off full collections that walk
    every live object of the process; none of these objects form cycles. Pausing it makes
    ``graph()`` on HPO about three times faster. Nested and threaded uses are counted.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


def _dump(values: Sequence[str]) -> str | None:
    return json.dumps(list(values), ensure_ascii=False) if values else None


def _concept(r: Any) -> Concept:
    """A :class:`Concept` from a row of ``concept_id, label, definition, synonyms, xrefs,
    obsolete, replaced_by``."""
    return Concept(
        id=r[0],
        label=r[1],
        synonyms=_load(r[3]),
        definition=r[2],
        xrefs=_load(r[4]),
        obsolete=bool(r[5]),
        replaced_by=_load(r[6]),
    )


def _load(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _chunks(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _enumerated_chunks(items: Sequence[_T], size: int) -> Iterator[tuple[int, Sequence[_T]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]
