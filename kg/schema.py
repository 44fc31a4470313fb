"""Tables of the versioned ontology store (SQLAlchemy Core).

One row of ``ontology_versions`` per stored version; its concepts, relations, cross-references
and (on PostgreSQL) searchable names hang off it with ``ON DELETE CASCADE``, so deleting the
version row removes everything. Concepts are numbered ``idx = 0..N-1`` in sorted-id order,
the node order of :class:`~kg.graph.ConceptGraph`, and relations refer to them by ``idx``.

On SQLite the search index is one FTS5 table per version, ``concept_fts_<version id>``
(see :func:`fts_table_name`), created and dropped by the store next to the version row;
on PostgreSQL it is the ``concept_names`` table with a GIN index over its ``tsvector``.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Computed,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)
from sqlalchemy.dialects.postgresql import TSVECTOR

metadata = MetaData()

#: Longest ontology name the store accepts.
NAME_MAX = 200

ontology_versions = Table(
    "ontology_versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(NAME_MAX), nullable=False),
    #: ``Ontology.content_hash()``: 16 hex digits.
    Column("version", String(64), nullable=False),
    Column("format", Text, nullable=False, default=""),
    Column("source", Text, nullable=False, default=""),
    #: ISO 8601, UTC.
    Column("created_at", String(40), nullable=False),
    Column("n_concepts", Integer, nullable=False),
    Column("n_relations", Integer, nullable=False),
    Column("active", Boolean, nullable=False, default=False),
    #: ``Ontology.meta`` as a JSON object of strings.
    Column("meta", Text, nullable=False, default="{}"),
    UniqueConstraint("name", "version", name="uq_ontology_versions_name_version"),
    # At most one active version per name, enforced by the database itself.
    Index(
        "uq_ontology_versions_active",
        "name",
        unique=True,
        sqlite_where=literal_column("active = 1"),
        postgresql_where=literal_column("active"),
    ),
    # Never reuse the id of a removed version: in-process caches are keyed by it.
    sqlite_autoincrement=True,
)


def _version_fk() -> ForeignKey:
    return ForeignKey("ontology_versions.id", ondelete="CASCADE")


concepts = Table(
    "concepts",
    metadata,
    Column("version_id", Integer, _version_fk(), primary_key=True),
    #: Node index, the position of ``concept_id`` in the sorted ids of the version.
    Column("idx", Integer, primary_key=True, autoincrement=False),
    Column("concept_id", Text, nullable=False),
    Column("label", Text, nullable=False, default=""),
    Column("definition", Text, nullable=False, default=""),
    #: JSON lists of strings; NULL for an empty list.
    Column("synonyms", Text),
    Column("xrefs", Text),
    Column("obsolete", Boolean, nullable=False, default=False),
    Column("replaced_by", Text),
    Index("ix_concepts_version_concept", "version_id", "concept_id", unique=True),
    # Clustered by (version_id, idx): one version's rows are one contiguous range.
    sqlite_with_rowid=False,
)

relations = Table(
    "relations",
    metadata,
    Column("version_id", Integer, _version_fk(), primary_key=True),
    #: Position in ``Ontology.relations``, so a reload keeps the saved order.
    Column("pos", Integer, primary_key=True, autoincrement=False),
    Column("subject_idx", Integer, nullable=False),
    Column("object_idx", Integer, nullable=False),
    Column("predicate", Text, nullable=False),
    Column("weight", Float),
    Column("source", Text, nullable=False, default=""),
    sqlite_with_rowid=False,
)

xrefs = Table(
    "xrefs",
    metadata,
    Column("version_id", Integer, _version_fk(), primary_key=True),
    Column("xref", Text, primary_key=True),
    Column("idx", Integer, primary_key=True, autoincrement=False),
    sqlite_with_rowid=False,
)

#: Searchable names (label and synonyms), PostgreSQL only.
concept_names = Table(
    "concept_names",
    metadata,
    Column("version_id", Integer, _version_fk(), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("name", Text, nullable=False),
    #: 0 for the label, 1 for a synonym.
    Column("kind", Integer, nullable=False),
    #: :func:`kg.search.sort_key`: fewer words first, the order bm25 gives an AND query.
    Column("sort_key", Integer, nullable=False),
    #: :func:`kg.search.fold` of ``name``: accents removed, as SQLite's FTS5 tokenizer does.
    Column("folded", Text, nullable=False),
    Column("tsv", TSVECTOR, Computed("to_tsvector('simple', folded)", persisted=True)),
    # No index on (version_id, sort_key): the planner would walk it expecting matches to be
    # spread evenly and scan most of a version for a rare word; the GIN bitmap is faster.
    Index("ix_concept_names_version", "version_id"),
    Index("ix_concept_names_tsv", "tsv", postgresql_using="gin"),
)

#: Tables created on every backend.
COMMON_TABLES = (ontology_versions, concepts, relations, xrefs)
#: Tables created only on PostgreSQL.
POSTGRES_TABLES = (concept_names,)


def fts_table_name(version_id: int) -> str:
    """Name of the SQLite FTS5 search table of one version."""
    if not isinstance(version_id, int) or isinstance(version_id, bool) or version_id < 0:
        raise ValueError(f"version_id must be a non-negative int, got {version_id!r}")
    return f"concept_fts_{version_id}"
