"""Export of an ontology to arrays the model layer turns into tensors.

``kg`` holds no torch model code: this module produces NumPy arrays (``edge_index``,
``edge_type``, ``edge_weight``), the node index map, the relation vocabulary and the node
texts; ``models`` wraps them with ``torch.from_numpy``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kg.ontology import Ontology


@dataclass(frozen=True)
class GraphArrays:
    """Arrays describing a multi-relational graph.

    Shapes:
        edge_index: (2, E) int64, row 0 = subject index, row 1 = object index.
        edge_type: (E,) int64 index into ``relations``.
        edge_weight: (E,) float32, 1.0 where the relation has no weight.
    """

    node_ids: list[str]
    node_texts: list[str]
    node_labels: list[str]
    relations: list[str]
    edge_index: np.ndarray
    edge_type: np.ndarray
    edge_weight: np.ndarray

    @property
    def num_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def num_relations(self) -> int:
        return len(self.relations)

    def index(self) -> dict[str, int]:
        """Concept id -> node index."""
        return {cid: i for i, cid in enumerate(self.node_ids)}


def to_arrays(ontology: Ontology, *, include_obsolete: bool = False) -> GraphArrays:
    """Export ``ontology`` as :class:`GraphArrays` with nodes in sorted id order.

    Args:
        ontology: the ontology to export.
        include_obsolete: keep obsolete concepts as nodes (default ``False``).
    """
    ids = sorted(cid for cid, c in ontology.concepts.items() if include_obsolete or not c.obsolete)
    index = {cid: i for i, cid in enumerate(ids)}
    relations = ontology.relation_types()
    rel_index = {r: i for i, r in enumerate(relations)}
    src: list[int] = []
    dst: list[int] = []
    typ: list[int] = []
    wts: list[float] = []
    for r in ontology.relations:
        s = index.get(r.subject)
        o = index.get(r.object)
        if s is None or o is None:
            continue
        src.append(s)
        dst.append(o)
        typ.append(rel_index[r.predicate])
        wts.append(1.0 if r.weight is None else float(r.weight))
    concepts = ontology.concepts
    return GraphArrays(
        node_ids=ids,
        node_texts=[concepts[c].text() for c in ids],
        node_labels=[concepts[c].label or c for c in ids],
        relations=relations,
        edge_index=np.asarray([src, dst], dtype=np.int64).reshape(2, -1),
        edge_type=np.asarray(typ, dtype=np.int64),
        edge_weight=np.asarray(wts, dtype=np.float32),
    )
