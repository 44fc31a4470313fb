"""The normalized multi-relational ontology every loader produces and every consumer reads.

Concepts carry id, label, synonyms, definition, xrefs and obsolescence; relations are typed,
directed ``subject -predicate-> object`` triples with an optional weight and a provenance tag.
The content hash of the canonical form is the ontology *version*.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: Relation names that form the subsumption hierarchy (checked for cycles, used for ancestors).
HIERARCHY_RELATIONS = ("is_a",)


@dataclass(slots=True)
class Concept:
    """One ontology term.

    Args:
        id: CURIE such as ``HP:0002202``.
        label: preferred name.
        synonyms: alternative names (exact, related, broad and narrow alike).
        definition: free-text definition, empty when the source has none.
        xrefs: cross-references as CURIEs (``UMLS:C0032227``, ``SNOMEDCT_US:60046008``).
        obsolete: whether the source marks the term obsolete.
        replaced_by: ids that replace an obsolete term.
    """

    id: str
    label: str = ""
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    xrefs: tuple[str, ...] = ()
    obsolete: bool = False
    replaced_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "label": self.label,
            "synonyms": list(self.synonyms),
            "definition": self.definition,
            "xrefs": list(self.xrefs),
            "obsolete": self.obsolete,
            "replaced_by": list(self.replaced_by),
        }

    def text(self) -> str:
        """The text a text encoder reads for this concept: label, synonyms, definition."""
        parts = [self.label or self.id]
        if self.synonyms:
            parts.append("; ".join(self.synonyms))
        if self.definition:
            parts.append(self.definition)
        return ". ".join(parts)


@dataclass(slots=True, frozen=True)
class Relation:
    """A typed, directed edge ``subject -predicate-> object``.

    Args:
        subject: id of the source concept.
        predicate: relation name (``is_a``, ``part_of``, ``suggests``, ...).
        object: id of the target concept.
        weight: optional strength in (0, 1], e.g. a conditional probability.
        source: provenance, the name of the ontology the edge came from.
    """

    subject: str
    predicate: str
    object: str
    weight: float | None = None
    source: str = ""


@dataclass
class Ontology:
    """A whole ontology in memory: concepts by id and a list of relations."""

    name: str
    concepts: dict[str, Concept] = field(default_factory=dict)
    relations: list[Relation] = field(default_factory=list)
    #: Free-form facts about the source (format, data-version, merged_from, ...).
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.concepts)

    def add(self, concept: Concept) -> None:
        self.concepts[concept.id] = concept

    def relation_types(self) -> list[str]:
        """Sorted relation vocabulary."""
        return sorted({r.predicate for r in self.relations})

    def iter_edges(self, predicate: str | None = None) -> Iterator[Relation]:
        for r in self.relations:
            if predicate is None or r.predicate == predicate:
                yield r

    def content_hash(self) -> str:
        """Hash of the canonical content: the ontology version (16 hex digits).

        Independent of the order of concepts and relations in the source file and of the
        name it is stored under, so re-loading the same content is a no-op.
        """
        h = hashlib.sha256()
        for cid in sorted(self.concepts):
            c = self.concepts[cid]
            h.update(
                json.dumps(
                    [
                        c.id,
                        c.label,
                        sorted(c.synonyms),
                        c.definition,
                        sorted(c.xrefs),
                        c.obsolete,
                        sorted(c.replaced_by),
                    ],
                    ensure_ascii=False,
                ).encode()
            )
            h.update(b"\n")
        h.update(b"--relations--\n")
        for key in sorted(_relation_key(r) for r in self.relations):
            h.update(key.encode())
            h.update(b"\n")
        return h.hexdigest()[:16]


def _relation_key(r: Relation) -> str:
    w = "" if r.weight is None else repr(round(r.weight, 9))
    return f"{r.subject}\t{r.predicate}\t{r.object}\t{w}\t{r.source}"


def unique_relations(relations: Iterable[Relation]) -> list[Relation]:
    """Drop exact duplicate relations, keeping first occurrences in order."""
    seen: set[Relation] = set()
    out: list[Relation] = []
    for r in relations:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out
