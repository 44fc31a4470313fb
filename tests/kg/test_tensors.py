from __future__ import annotations

import numpy as np

from kg.bundled import bundled_ontology_path
from kg.loaders import load_ontology
from kg.ontology import Concept, Ontology, Relation
from kg.tensors import to_arrays


def _tiny() -> Ontology:
    o = Ontology(name="t")
    o.add(Concept("B:2", "Pneumonia", synonyms=("Lung infection",), definition="Infection."))
    o.add(Concept("A:1", "Consolidation"))
    o.add(Concept("C:3", "Old term", obsolete=True))
    o.relations = [
        Relation("A:1", "suggests", "B:2"),
        Relation("A:1", "co_occurs_with", "B:2", weight=0.25),
        Relation("C:3", "is_a", "B:2"),
    ]
    return o


def test_arrays_index_edges_types_weights_and_texts() -> None:
    arrays = to_arrays(_tiny())
    assert arrays.node_ids == ["A:1", "B:2"]
    assert arrays.index() == {"A:1": 0, "B:2": 1}
    assert arrays.relations == ["co_occurs_with", "is_a", "suggests"]
    assert arrays.edge_index.dtype == np.int64 and arrays.edge_index.shape == (2, 2)
    assert arrays.edge_index.tolist() == [[0, 0], [1, 1]]
    assert [arrays.relations[t] for t in arrays.edge_type] == ["suggests", "co_occurs_with"]
    assert arrays.edge_weight.tolist() == [1.0, 0.25]
    assert arrays.node_texts[1] == "Pneumonia. Lung infection. Infection."
    assert arrays.node_labels == ["Consolidation", "Pneumonia"]


def test_obsolete_nodes_can_be_kept() -> None:
    arrays = to_arrays(_tiny(), include_obsolete=True)
    assert arrays.num_nodes == 3 and arrays.edge_index.shape == (2, 3)


def test_bundled_graph_exports_consistently() -> None:
    ontology = load_ontology(bundled_ontology_path())
    arrays = to_arrays(ontology)
    live = [c for c in ontology.concepts.values() if not c.obsolete]
    assert arrays.num_nodes == len(live)
    assert arrays.edge_index.max() < arrays.num_nodes
    assert arrays.edge_index.shape[1] == arrays.edge_type.shape[0] == arrays.edge_weight.shape[0]
    assert set(arrays.relations) >= {"is_a", "suggests", "located_in", "co_occurs_with"}
    co = arrays.relations.index("co_occurs_with")
    weights = arrays.edge_weight[arrays.edge_type == co]
    assert len(weights) > 0 and (weights > 0).all() and (weights <= 1).all() and (weights < 1).any()


def test_graph_from_arrays_matches_graph_from_ontology() -> None:
    from kg.graph import ConceptGraph
    from kg.paths import PathFinder

    ontology = load_ontology(bundled_ontology_path())
    a = ConceptGraph.from_arrays(to_arrays(ontology))
    b = ConceptGraph.from_ontology(ontology)
    assert a.ids == b.ids and a.relations == b.relations

    def rounded(g: ConceptGraph) -> list[list[tuple[int, int, int, float]]]:
        # Weights pass through float32 in the arrays.
        return [sorted((v, r, d, round(c, 3)) for v, r, d, c in adj) for adj in g.adjacency]

    assert rounded(a) == rounded(b)
    pa = PathFinder(a).paths("KGDX:0000116", "KGDX:0000114")
    pb = PathFinder(b).paths("KGDX:0000116", "KGDX:0000114")
    assert [(p.nodes, p.edges) for p in pa] == [(p.nodes, p.edges) for p in pb]
