"""An in-memory, read-only concept graph for path queries and traversal.

Built from an :class:`~kg.ontology.Ontology` or straight from the store's rows. Each node
keeps one adjacency list holding both outgoing (``direction=+1``) and incoming
(``direction=-1``) edges, so paths may follow relations either way and record which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kg.errors import NotFoundError
from kg.ontology import HIERARCHY_RELATIONS, Ontology
from kg.tensors import GraphArrays

#: (neighbour index, relation index, direction +1/-1, edge cost)
Adjacent = tuple[int, int, int, float]


def edge_cost(weight: float | None) -> float:
    """Cost of traversing an edge: 1 for an unweighted edge, more for a weak weighted one.

    ``1 - ln(w)`` keeps hop count the first criterion and prefers strong weights after it.
    """
    if weight is None:
        return 1.0
    return 1.0 - math.log(min(max(weight, 1e-6), 1.0))


@dataclass
class ConceptGraph:
    """Nodes (ids, labels) and an undirected view of typed, directed edges."""

    ids: list[str]
    labels: list[str]
    relations: list[str]
    adjacency: list[list[Adjacent]]
    index: dict[str, int]

    @classmethod
    def from_edges(
        cls,
        ids: Sequence[str],
        labels: Sequence[str],
        relations: Sequence[str],
        edges: Sequence[tuple[int, int, int, float | None]],
    ) -> ConceptGraph:
        """Build from node lists and ``(subject_idx, object_idx, relation_idx, weight)`` rows."""
        adjacency: list[list[Adjacent]] = [[] for _ in ids]
        for s, o, r, w in edges:
            c = edge_cost(w)
            adjacency[s].append((o, r, 1, c))
            adjacency[o].append((s, r, -1, c))
        for adj in adjacency:
            adj.sort(key=lambda a: a[3])
        return cls(
            ids=list(ids),
            labels=list(labels),
            relations=list(relations),
            adjacency=adjacency,
            index={cid: i for i, cid in enumerate(ids)},
        )

    @classmethod
    def from_ontology(cls, ontology: Ontology) -> ConceptGraph:
        ids = sorted(ontology.concepts)
        index = {cid: i for i, cid in enumerate(ids)}
        relations = ontology.relation_types()
        rel_index = {r: i for i, r in enumerate(relations)}
        edges = [
            (index[r.subject], index[r.object], rel_index[r.predicate], r.weight)
            for r in ontology.relations
            if r.subject in index and r.object in index
        ]
        labels = [ontology.concepts[c].label or c for c in ids]
        return cls.from_edges(ids, labels, relations, edges)

    @classmethod
    def from_arrays(cls, arrays: GraphArrays) -> ConceptGraph:
        """Build from the model's :class:`~kg.tensors.GraphArrays` (same node order)."""
        rows = arrays.edge_index.T.tolist()
        types = arrays.edge_type.tolist()
        weights = arrays.edge_weight.tolist()
        edges = [
            (s, o, t, None if w == 1.0 else w)
            for (s, o), t, w in zip(rows, types, weights, strict=True)
        ]
        return cls.from_edges(arrays.node_ids, arrays.node_labels, arrays.relations, edges)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_edges(self) -> int:
        return sum(1 for adj in self.adjacency for a in adj if a[2] == 1)

    def node(self, concept_id: str) -> int:
        """Index of ``concept_id``; raises :class:`NotFoundError` naming it."""
        try:
            return self.index[concept_id]
        except KeyError:
            raise NotFoundError(f"unknown concept id {concept_id!r}") from None

    def ancestors(
        self, concept_id: str, relations: Sequence[str] = HIERARCHY_RELATIONS
    ) -> list[str]:
        """All concepts reachable by following ``relations`` forward, nearest first."""
        wanted = {i for i, r in enumerate(self.relations) if r in relations}
        start = self.node(concept_id)
        seen = {start}
        frontier = [start]
        out: list[str] = []
        while frontier:
            nxt: list[int] = []
            for u in frontier:
                for v, r, d, _ in self.adjacency[u]:
                    if d == 1 and r in wanted and v not in seen:
                        seen.add(v)
                        nxt.append(v)
                        out.append(self.ids[v])
            frontier = nxt
        return out
