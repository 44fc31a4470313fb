"""Full-text search over concept labels and synonyms, one backend per database.

SQLite uses one FTS5 table per ontology version (``concept_fts_<id>``; bm25 ranking, prefix
indexes); PostgreSQL uses the ``concept_names`` table with a GIN index over a stored
``to_tsvector('simple', name)`` column. Both turn user text into a query the same way —
alphanumeric tokens, each quoted, ANDed, with prefix matching for tokens of two or more
characters — so any input is safe, and both rank candidates the same way in
:func:`rank_hits`: an exact id or label match first, then an exact synonym, then by the
engine's relevance; obsolete concepts score half.

Speed: ranking every match of a common word ("of" matches half of HPO) costs about a
microsecond a row. Names are therefore stored in :func:`sort_key` order (fewer words, then
shorter, first): for an AND query every match holds every query word, so bm25 orders matches
by length, and the first few matches in that order are the best ones. Each backend reads only
those, ranks them, and never sorts all matches.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection

from kg.errors import KgError
from kg.schema import fts_table_name

#: At most this many query tokens are used; the rest of a long text is ignored.
MAX_TOKENS = 16
#: Candidates fetched from the engine per requested hit, before de-duplication by concept.
CANDIDATES_PER_HIT = 5
MIN_CANDIDATES = 50

_TOKEN = re.compile(r"[^\W_]+")
_SPACE = re.compile(r"\s+")

#: A name row: (concept idx, name, kind 0=label or id/1=synonym).
NameRow = tuple[int, str, int]
#: Bits of an FTS5 rowid below the sort key: a running number within the version.
SEQ_BITS = 32
#: A candidate: (idx, matched name, kind, engine relevance >= 0, concept_id, label, obsolete).
Candidate = tuple[int, str, int, float, str, str, bool]


@dataclass(frozen=True)
class SearchHit:
    """One concept found by :meth:`GraphStore.search <kg.store.GraphStore.search>`.

    Args:
        concept_id: the concept's id.
        label: its preferred name.
        matched: the label, synonym or id that matched the text.
        score: relevance in (0, 1], higher is better: 1.0 for an exact id or label match,
            0.95 for an exact synonym match, below 0.9 otherwise; halved for obsolete concepts.
    """

    concept_id: str
    label: str
    matched: str
    score: float


def normalize(text: str) -> str:
    """Case- and whitespace-insensitive form used to recognise exact matches."""
    return _SPACE.sub(" ", text).strip().casefold()


def fold(text: str) -> str:
    """``text`` without diacritics (``Épanchement`` -> ``Epanchement``)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def query_tokens(text: str) -> list[str]:
    """The alphanumeric tokens of ``text`` (at most :data:`MAX_TOKENS`), lower-cased.

    Raises :class:`KgError` when ``text`` is empty or blank.
    """
    if not isinstance(text, str):
        raise KgError(f"search text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise KgError("search text is empty")
    return [t.lower() for t in _TOKEN.findall(fold(text))][:MAX_TOKENS]


def fts5_query(tokens: Sequence[str]) -> str:
    """An FTS5 MATCH expression: every token quoted (so operators are inert), ANDed.

    Tokens of two or more characters match as prefixes; a one-character prefix would expand
    to a large share of the vocabulary for little use.
    """
    return " AND ".join(f'"{t}"*' if len(t) >= 2 else f'"{t}"' for t in tokens)


def tsquery(tokens: Sequence[str]) -> str:
    """A PostgreSQL ``to_tsquery`` expression with the same meaning as :func:`fts5_query`."""
    return " & ".join(f"'{t}':*" if len(t) >= 2 else f"'{t}'" for t in tokens)


def sort_key(name: str, kind: int) -> int:
    """Order in which names are stored and read: fewer words, shorter, labels first."""
    words = min(len(_TOKEN.findall(name)), 1023)
    return ((words << 15) | min(len(name), 32767)) << 1 | (1 if kind else 0)


def name_rows(
    concepts: Iterable[tuple[int, str, Sequence[str]]],
) -> Iterable[NameRow]:
    """Searchable names of ``(idx, label, synonyms)`` triples: the label, then new synonyms."""
    for idx, label, synonyms in concepts:
        seen = set()
        if label:
            seen.add(normalize(label))
            yield idx, label, 0
        for s in synonyms:
            key = normalize(s)
            if key and key not in seen:
                seen.add(key)
                yield idx, s, 1


def rank_hits(text: str, candidates: Iterable[Candidate], limit: int) -> list[SearchHit]:
    """Best hit per concept, ordered by score (descending) then concept id."""
    wanted = normalize(text)
    best: dict[int, tuple[float, int, SearchHit]] = {}
    for idx, name, kind, relevance, concept_id, label, obsolete in candidates:
        if normalize(name) == wanted:
            score = 1.0 if kind == 0 else 0.95
        else:
            score = 0.9 * relevance / (1.0 + relevance)
        if obsolete:
            score *= 0.5
        # Per concept, the best-scoring name; the label on a tie.
        key = (score, -kind)
        old = best.get(idx)
        if old is None or key > old[:2]:
            hit = SearchHit(concept_id=concept_id, label=label, matched=name, score=score)
            best[idx] = (score, -kind, hit)
    hits = sorted((b[2] for b in best.values()), key=lambda h: (-h.score, h.concept_id))
    return hits[:limit]


def _n_candidates(limit: int) -> int:
    return max(limit * CANDIDATES_PER_HIT, MIN_CANDIDATES)


class SqliteSearch:
    """FTS5 backend: one contentful FTS5 table per version holding ``(name, idx, kind)``."""

    @staticmethod
    def create(conn: Connection, version_id: int) -> None:
        table = fts_table_name(version_id)
        conn.exec_driver_sql(
            f"CREATE VIRTUAL TABLE {table} USING fts5("
            "name, idx UNINDEXED, kind UNINDEXED, "
            "tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3')"
        )

    @staticmethod
    def insert(conn: Connection, version_id: int, rows: Sequence[NameRow], seq: int) -> None:
        """Add names; ``seq`` numbers the first one (names saved before it in the version)."""
        if not rows:  # concepts without labels or synonyms: nothing to index (and the
            return  # driver refuses an executemany of no rows)
        table = fts_table_name(version_id)
        # FTS5 flushes its pending terms whenever a rowid is lower than the one before, so
        # a chunk goes in sorted: one flush per chunk instead of one per row.
        keyed = sorted(
            ((sort_key(name, kind) << SEQ_BITS) | (seq + k), idx, name, kind)
            for k, (idx, name, kind) in enumerate(rows)
        )
        conn.exec_driver_sql(
            f"INSERT INTO {table} (rowid, idx, name, kind) VALUES (?, ?, ?, ?)", keyed
        )

    @staticmethod
    def finish(conn: Connection, version_id: int) -> None:
        # Merge the b-trees written in chunks into one: faster queries from the first one.
        table = fts_table_name(version_id)
        conn.exec_driver_sql(f"INSERT INTO {table} ({table}) VALUES ('optimize')")

    @staticmethod
    def drop(conn: Connection, version_id: int) -> None:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {fts_table_name(version_id)}")

    @staticmethod
    def candidates(
        conn: Connection, version_id: int, tokens: Sequence[str], limit: int
    ) -> list[Candidate]:
        table = fts_table_name(version_id)
        # rowid order is sort_key order: the first matches are the shortest names.
        sql = (
            "SELECT f.idx, f.name, f.kind, -f.score, c.concept_id, c.label, c.obsolete "
            f"FROM (SELECT idx, name, kind, bm25({table}) AS score FROM {table} "
            f"WHERE {table} MATCH ? ORDER BY rowid LIMIT ?) AS f "
            "JOIN concepts AS c ON c.version_id = ? AND c.idx = f.idx"
        )
        params = (fts5_query(tokens), _n_candidates(limit), version_id)
        rows = conn.exec_driver_sql(sql, params).all()
        return [(r[0], r[1], r[2], float(r[3]), r[4], r[5], bool(r[6])) for r in rows]


class PostgresSearch:
    """``tsvector`` backend over the ``concept_names`` table (GIN index, sort-key index)."""

    @staticmethod
    def finish(conn: Connection) -> None:
        # COPY leaves new GIN entries in the index's unsorted pending list, which every
        # query would scan; merge them now, and give the planner statistics at once.
        conn.exec_driver_sql("SELECT gin_clean_pending_list('ix_concept_names_tsv'::regclass)")
        conn.exec_driver_sql("ANALYZE ontology_versions, concepts, relations, xrefs, concept_names")

    @staticmethod
    def candidates(
        conn: Connection, version_id: int, tokens: Sequence[str], limit: int
    ) -> list[Candidate]:
        # The first matches in sort_key order, then ts_rank on those only (normalization 2
        # divides by length: short, fully matching names first, as bm25 does). The inner
        # query leaves the stored tsvector alone: carrying it doubles the cost of a common word.
        sql = (
            "SELECT n.idx, n.name, n.kind, "
            "ts_rank(to_tsvector('simple', n.folded), to_tsquery('simple', %(q)s), 2), "
            "c.concept_id, c.label, c.obsolete "
            "FROM (SELECT idx, name, folded, kind FROM concept_names "
            "WHERE version_id = %(v)s AND tsv @@ to_tsquery('simple', %(q)s) "
            "ORDER BY sort_key LIMIT %(n)s) AS n "
            "JOIN concepts AS c ON c.version_id = %(v)s AND c.idx = n.idx"
        )
        params = {"q": tsquery(tokens), "v": version_id, "n": _n_candidates(limit)}
        rows = conn.exec_driver_sql(sql, params).all()
        # ts_rank values are small (about 0.01-0.1); scale them to bm25-like magnitudes.
        return [(r[0], r[1], r[2], 10.0 * float(r[3]), r[4], r[5], bool(r[6])) for r in rows]
