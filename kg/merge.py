"""Merge two ontologies into one graph, unifying concepts that name the same thing.

``merge(a, b)`` keeps every concept of ``a`` and adds ``b``'s. A concept of ``b`` that
*matches* a concept of ``a`` is unified with it: the merged node keeps ``a``'s id, label and
definition, and gains ``b``'s id as an xref, ``b``'s label and synonyms as synonyms, and
``b``'s xrefs. Matches, best first:

1. ``id``: the same id;
2. ``a_xref``: ``a``'s concept lists ``b``'s id as an xref (``KGDX:...`` with ``xref: HP:...``);
3. ``b_xref``: ``b``'s concept lists ``a``'s id as an xref;
4. ``shared_xref``: both list one xref (a UMLS CUI, a SNOMED CT code, ...).

``by="id"`` uses only the first; ``by="xref"`` all four. Unification is one-to-one: a concept
of ``b`` whose candidates in ``a`` are several takes the best (then the smallest id) and the
report lists it as a conflict; a concept of ``a`` claimed by several of ``b`` goes to the
best claim and the others are added as concepts of their own (also reported), so ``b``'s
hierarchy is never folded onto itself. Obsolete concepts match only by id.

Every relation of the result says where it came from in :attr:`Relation.source`: the
source it already had, else the name of the ontology it came from. ``b``'s relations are
rewritten onto the unified ids; one that then repeats an ``a`` relation (same subject,
predicate and object) is dropped. Unification is one-to-one, so no relation of ``b``
becomes a self-loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from kg.ontology import HIERARCHY_RELATIONS, Concept, Ontology, Relation
from kg.validate import extract_cycle, find_cycle_nodes

__all__ = ["MATCH_KINDS", "Match", "MergeReport", "merge"]

MatchBy = Literal["xref", "id"]
#: Kinds of match, best first.
MATCH_KINDS = ("id", "a_xref", "b_xref", "shared_xref")


@dataclass(frozen=True)
class Match:
    """``b_id`` of ontology B unified with ``a_id`` of ontology A, found by ``via``.

    ``via`` is one of :data:`MATCH_KINDS`; ``xref`` names the shared cross-reference for
    ``shared_xref`` matches and is empty otherwise.
    """

    b_id: str
    a_id: str
    via: str
    xref: str = ""


@dataclass
class MergeReport:
    """What :func:`merge` did.

    Attributes:
        a_name, b_name: the merged ontologies' names.
        matched: unified pairs, in ``b`` id order.
        conflicts: concepts of ``b`` with more than one candidate in ``a`` at their best
            match kind (``{"b_id", "candidates", "chosen", "via"}``), and concepts of ``b``
            left unmatched because a better claim took their ``a`` concept
            (``{"b_id", "candidates", "chosen": None, "taken_by"}``).
        added: concepts of ``b`` added as new concepts.
        relations_a, relations_b: relations taken from each side.
        duplicates_dropped: ``b`` relations that repeated one already present.
        cycle: an ``is_a`` cycle the merge created (in order), empty when there is none.
    """

    a_name: str
    b_name: str
    matched: list[Match] = field(default_factory=list)
    conflicts: list[dict[str, object]] = field(default_factory=list)
    added: int = 0
    relations_a: int = 0
    relations_b: int = 0
    duplicates_dropped: int = 0
    cycle: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Matches per kind."""
        out = dict.fromkeys(MATCH_KINDS, 0)
        for m in self.matched:
            out[m.via] += 1
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "a": self.a_name,
            "b": self.b_name,
            "matched": [
                {"b_id": m.b_id, "a_id": m.a_id, "via": m.via, "xref": m.xref} for m in self.matched
            ],
            "match_counts": self.counts(),
            "conflicts": list(self.conflicts),
            "added": self.added,
            "relations_a": self.relations_a,
            "relations_b": self.relations_b,
            "duplicates_dropped": self.duplicates_dropped,
            "cycle": list(self.cycle),
        }


def _xref_key(x: str) -> str:
    """Xrefs compare case-insensitively (``UMLS:C0032285`` == ``umls:c0032285``)."""
    return x.strip().casefold()


def _candidates(
    b: Ontology, a: Ontology, by: MatchBy, prefixes: frozenset[str] | None
) -> dict[str, list[tuple[int, str, str]]]:
    """For each concept of ``b``: its candidates in ``a`` as ``(kind rank, a_id, xref)``,
    best first, one entry per ``a`` concept."""

    def usable(x: str) -> bool:
        return prefixes is None or x.split(":", 1)[0].casefold() in prefixes

    a_by_xref: dict[str, list[str]] = {}
    if by == "xref":
        for c in a.concepts.values():
            if not c.obsolete:
                for x in c.xrefs:
                    a_by_xref.setdefault(_xref_key(x), []).append(c.id)
    a_ids_folded = {cid.casefold(): cid for cid in a.concepts}

    out: dict[str, list[tuple[int, str, str]]] = {}
    for bid in sorted(b.concepts):
        bc = b.concepts[bid]
        offers: list[tuple[int, str, str]] = []
        if bid in a.concepts:
            offers.append((0, bid, ""))
        if by == "xref" and not bc.obsolete:
            offers += [(1, aid, "") for aid in a_by_xref.get(_xref_key(bid), ())]
            for x in bc.xrefs:
                aid = a_ids_folded.get(_xref_key(x))
                if aid is not None and not a.concepts[aid].obsolete:
                    offers.append((2, aid, ""))
            for x in bc.xrefs:
                if usable(x):
                    offers += [(3, aid, x) for aid in a_by_xref.get(_xref_key(x), ())]
        best: dict[str, tuple[int, str, str]] = {}
        for offer in sorted(offers):
            best.setdefault(offer[1], offer)
        if best:
            out[bid] = sorted(best.values())
    return out


def _union(
    first: Iterable[str], *more: Iterable[str], exclude: Iterable[str] = ()
) -> tuple[str, ...]:
    """Order-keeping union without case-insensitive repeats or excluded values."""
    seen = {s.casefold() for s in exclude}
    out: list[str] = []
    for seq in (first, *more):
        for s in seq:
            k = s.casefold()
            if s and k not in seen:
                seen.add(k)
                out.append(s)
    return tuple(out)


def merge(
    a: Ontology,
    b: Ontology,
    *,
    by: MatchBy = "xref",
    name: str | None = None,
    xref_prefixes: Iterable[str] | None = None,
) -> tuple[Ontology, MergeReport]:
    """Merge ``b`` into ``a``; neither input is modified.

    Args:
        a: the ontology whose ids, labels and definitions win.
        b: the ontology merged into it.
        by: ``"xref"`` to unify by id and cross-references, ``"id"`` by id only.
        name: the merged ontology's name; ``"<a.name>+<b.name>"`` by default.
        xref_prefixes: prefixes (``UMLS``, ``SNOMEDCT_US``) whose shared xrefs count as a
            match; all by default. Id-to-xref matches (``a_xref``, ``b_xref``) always count.

    Returns:
        The merged ontology (``meta["merged_from"]`` is a JSON list of ``{name, version,
        data-version}`` for ``a`` then ``b``) and a :class:`MergeReport`.

    Raises:
        ValueError: ``by`` is neither ``"xref"`` nor ``"id"``.
    """
    if by not in ("xref", "id"):
        raise ValueError(f"by must be 'xref' or 'id', got {by!r}")
    if isinstance(xref_prefixes, str):
        raise ValueError(f"xref_prefixes must be a list of prefixes, got {xref_prefixes!r}")
    prefixes = None if xref_prefixes is None else frozenset(p.casefold() for p in xref_prefixes)
    report = MergeReport(a.name, b.name)
    kinds = MATCH_KINDS

    # 1. Who unifies with whom: best claims first, one b concept per a concept.
    candidates = _candidates(b, a, by, prefixes)
    claims = sorted(
        (cands[0][0], cands[0][1], bid) for bid, cands in candidates.items()
    )  # (rank, a_id, b_id)
    owner: dict[str, str] = {}  # a_id -> b_id
    for _rank, aid, bid in claims:
        owner.setdefault(aid, bid)
    remap: dict[str, str] = {}  # b_id -> merged id
    for bid, cands in candidates.items():
        rank, aid, xref = cands[0]
        if owner[aid] != bid:
            report.conflicts.append(
                {
                    "b_id": bid,
                    "candidates": [c[1] for c in cands],
                    "chosen": None,
                    "taken_by": owner[aid],
                }
            )
            continue
        remap[bid] = aid
        report.matched.append(Match(bid, aid, kinds[rank], xref if rank == 3 else ""))
        tied = [c[1] for c in cands if c[0] == rank]
        if len(tied) > 1:
            report.conflicts.append(
                {"b_id": bid, "candidates": tied, "chosen": aid, "via": kinds[rank]}
            )
    report.conflicts.sort(key=lambda d: str(d["b_id"]))

    # 2. Concepts: a's, enriched by their b partners, then b's unmatched ones.
    partner = {aid: bid for bid, aid in remap.items()}
    concepts: dict[str, Concept] = {}
    for aid, ac in a.concepts.items():
        if aid not in partner:
            concepts[aid] = ac
            continue
        bid = partner[aid]
        bc = b.concepts[bid]
        concepts[aid] = Concept(
            id=aid,
            label=ac.label or bc.label,
            synonyms=_union(ac.synonyms, [bc.label], bc.synonyms, exclude=[ac.label or bc.label]),
            definition=ac.definition or bc.definition,
            xrefs=_union(ac.xrefs, [bid] if bid != aid else [], bc.xrefs, exclude=[aid]),
            obsolete=ac.obsolete,
            replaced_by=ac.replaced_by,
        )
    added: list[str] = []
    for bid, bc in b.concepts.items():
        if bid in remap:
            continue
        # Same ids always match (kind 0 beats every other claim), so an unmatched concept
        # of b never collides with one of a.
        assert bid not in concepts, bid
        remap[bid] = bid
        concepts[bid] = bc
        added.append(bid)
    report.added = len(added)
    for bid in added:
        c = concepts[bid]
        if any(remap.get(r, r) != r for r in c.replaced_by):
            concepts[bid] = replace(c, replaced_by=tuple(remap.get(r, r) for r in c.replaced_by))

    # 3. Relations with provenance; b's rewritten onto merged ids.
    relations: list[Relation] = []
    seen: set[tuple[str, str, str]] = set()
    for r in a.relations:
        key = (r.subject, r.predicate, r.object)
        if key in seen:
            continue
        seen.add(key)
        relations.append(_with_source(r, r.subject, r.object, a.name))
    report.relations_a = len(relations)
    for r in b.relations:
        s, o = remap.get(r.subject, r.subject), remap.get(r.object, r.object)
        key = (s, r.predicate, o)
        if key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        relations.append(_with_source(r, s, o, b.name))
        report.relations_b += 1

    merged = Ontology(
        name=name or f"{a.name}+{b.name}",
        concepts=concepts,
        relations=relations,
        meta={
            "format": "merged",
            "merged_from": json.dumps(
                [_provenance(a), _provenance(b)], ensure_ascii=False, separators=(",", ":")
            ),
            "merge_by": by,
        },
    )
    for predicate in HIERARCHY_RELATIONS:
        nodes = find_cycle_nodes(merged, predicate)
        if nodes:
            report.cycle = extract_cycle(merged, predicate, nodes)
            break
    return merged, report


def _with_source(r: Relation, s: str, o: str, default: str) -> Relation:
    if r.subject == s and r.object == o and r.source:
        return r
    return Relation(s, r.predicate, o, r.weight, r.source or default)


def _provenance(o: Ontology) -> dict[str, str]:
    out = {"name": o.name, "version": o.content_hash()}
    if o.meta.get("data-version"):
        out["data-version"] = o.meta["data-version"]
    return out
