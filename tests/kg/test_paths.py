from __future__ import annotations

import itertools
import random

import networkx as nx
import pytest

from kg.errors import KgError, NotFoundError
from kg.graph import ConceptGraph, edge_cost
from kg.ontology import Concept, Ontology, Relation
from kg.paths import PathFinder


def _chest() -> Ontology:
    o = Ontology(name="mini")
    for cid, label in [
        ("X:1", "Consolidation"),
        ("X:2", "Pulmonary opacity"),
        ("X:3", "Pneumonia"),
        ("X:4", "Lung"),
        ("X:5", "Bacterial pneumonia"),
        ("X:6", "Effusion"),
    ]:
        o.add(Concept(cid, label))
    o.relations = [
        Relation("X:1", "is_a", "X:2"),
        Relation("X:1", "suggests", "X:3"),
        Relation("X:1", "located_in", "X:4"),
        Relation("X:5", "is_a", "X:3"),
        Relation("X:6", "co_occurs_with", "X:1", weight=0.2),
        Relation("X:3", "located_in", "X:4"),
    ]
    return o


def test_direct_path_is_best_and_directions_recorded() -> None:
    finder = PathFinder(ConceptGraph.from_ontology(_chest()))
    paths = finder.paths("X:1", "X:3", k=5)
    assert [p.hops for p in paths] == [1, 2]
    best = paths[0].to_dict()
    assert best["nodes"] == [
        {"id": "X:1", "label": "Consolidation"},
        {"id": "X:3", "label": "Pneumonia"},
    ]
    assert best["edges"] == [{"relation": "suggests", "direction": "forward"}]
    second = paths[1]
    assert [e[1] for e in second.edges] == ["forward", "backward"]
    assert str(second) == "Consolidation -located_in-> Lung <-located_in- Pneumonia"


def test_backward_edges_and_relation_filter() -> None:
    finder = PathFinder(ConceptGraph.from_ontology(_chest()))
    paths = finder.paths("X:3", "X:5", relations=["is_a"])
    assert len(paths) == 1
    assert paths[0].edges == (("is_a", "backward"),)
    with pytest.raises(KgError, match="unknown relation"):
        finder.paths("X:3", "X:5", relations=["nope"])


def test_relevance_reorders_equal_length_paths() -> None:
    o = Ontology(name="diamond")
    for c in "ABCD":
        o.add(Concept(c, c))
    o.relations = [
        Relation("A", "r", "B"),
        Relation("B", "r", "D"),
        Relation("A", "r", "C"),
        Relation("C", "r", "D"),
    ]
    finder = PathFinder(ConceptGraph.from_ontology(o))
    assert [p.nodes[1][0] for p in finder.paths("A", "D", relevance={"C": 1.0})] == ["C", "B"]
    assert [p.nodes[1][0] for p in finder.paths("A", "D", relevance={"B": 1.0})] == ["B", "C"]


def test_weights_rank_strong_edges_first() -> None:
    o = Ontology(name="w")
    for c in "ABC":
        o.add(Concept(c, c))
    o.relations = [Relation("A", "co", "B", weight=0.1), Relation("A", "co2", "B", weight=0.9)]
    paths = PathFinder(ConceptGraph.from_ontology(o)).paths("A", "B")
    assert [p.edges[0][0] for p in paths] == ["co2", "co"]
    assert paths[0].score == pytest.approx(1 / edge_cost(0.9), rel=1e-5)


def test_errors_name_the_problem() -> None:
    finder = PathFinder(ConceptGraph.from_ontology(_chest()))
    with pytest.raises(NotFoundError, match="X:99"):
        finder.paths("X:99", "X:1")
    with pytest.raises(KgError, match="max_hops"):
        finder.paths("X:1", "X:3", max_hops=0)
    with pytest.raises(KgError, match="k must"):
        finder.paths("X:1", "X:3", k=0)
    assert finder.paths("X:1", "X:1") == []


def _reference(graph: ConceptGraph, s: str, t: str, max_hops: int) -> list[tuple[float, tuple]]:
    """Every simple path by brute force over the undirected multigraph, with its cost."""
    g = nx.MultiGraph()
    for u, adj in enumerate(graph.adjacency):
        for v, r, d, c in adj:
            if d == 1:
                g.add_edge(u, v, key=(r, u, v), cost=c)
    out = []
    # all_simple_paths yields a node path once per parallel edge; count each once.
    found = nx.all_simple_paths(g, graph.index[s], graph.index[t], cutoff=max_hops)
    node_paths = {tuple(p) for p in found}
    for node_path in node_paths:
        hops = list(itertools.pairwise(node_path))
        choices = [list(g.get_edge_data(u, v).items()) for u, v in hops]
        for combo in itertools.product(*choices):
            cost = sum(data["cost"] for _, data in combo)
            edges = tuple(
                (graph.relations[key[0]], "forward" if key[1] == u else "backward")
                for (key, _), (u, _v) in zip(combo, hops, strict=True)
            )
            out.append((round(cost, 9), (tuple(graph.ids[i] for i in node_path), edges)))
    return sorted(out)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("max_hops", [1, 2, 3, 4, 5])
def test_matches_brute_force_on_random_graphs(seed: int, max_hops: int) -> None:
    rng = random.Random(seed)
    o = Ontology(name="rand")
    ids = [f"N:{i}" for i in range(14)]
    for cid in ids:
        o.add(Concept(cid, cid))
    rels = ["is_a", "part_of", "suggests"]
    o.relations = [
        Relation(
            rng.choice(ids), rng.choice(rels), rng.choice(ids), weight=rng.choice([None, 0.3, 0.8])
        )
        for _ in range(26)
    ]
    unique = {(r.subject, r.predicate, r.object): r for r in o.relations if r.subject != r.object}
    o.relations = list(unique.values())
    graph = ConceptGraph.from_ontology(o)
    finder = PathFinder(graph)
    for s, t in [("N:0", "N:5"), ("N:3", "N:11"), ("N:7", "N:1")]:
        ref = _reference(graph, s, t, max_hops)
        got = finder.paths(s, t, max_hops=max_hops, k=len(ref) + 5)
        assert len(got) == len(ref)
        got_keys = sorted(
            (round(1 / p.score, 4), (tuple(n[0] for n in p.nodes), p.edges)) for p in got
        )
        assert [k for _, k in got_keys] == [
            k for _, k in sorted(((round(c, 4), key) for c, key in ref))
        ]
        top = finder.paths(s, t, max_hops=max_hops, k=3)
        assert [1 / p.score for p in top] == pytest.approx([c for c, _ in ref[:3]], rel=1e-5)


def _random_ontology(
    rng: random.Random, nodes: int, edges: int, predicates: list[str], weights: list[float | None]
) -> tuple[Ontology, list[str]]:
    """``nodes`` concepts joined by up to ``edges`` distinct random relations (no loops)."""
    o = Ontology(name="rand")
    ids = [f"N:{i}" for i in range(nodes)]
    for cid in ids:
        o.add(Concept(cid, cid))
    drawn = {(rng.choice(ids), rng.choice(predicates), rng.choice(ids)) for _ in range(edges)}
    o.relations = [
        Relation(s, p, t, weight=rng.choice(weights)) for s, p, t in sorted(drawn) if s != t
    ]
    return o, ids


def test_ancestors_follow_is_a_upwards() -> None:
    graph = ConceptGraph.from_ontology(_chest())
    assert graph.ancestors("X:5") == ["X:3"]
    assert graph.ancestors("X:1") == ["X:2"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iterative_deepening_matches_the_full_search(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kg.paths

    rng = random.Random(seed)
    o, ids = _random_ontology(rng, 30, 70, ["is_a", "suggests"], [None, 0.4])
    finder = PathFinder(ConceptGraph.from_ontology(o))
    relevance = {cid: rng.random() for cid in rng.sample(ids, 10)}
    queries = [(rng.choice(ids), rng.sample(ids, 4), rng.choice([1, 3, 5])) for _ in range(20)]
    fast = [finder.paths_to_any(s, t, k=k, relevance=relevance) for s, t, k in queries]
    monkeypatch.setattr(kg.paths, "MIN_EDGE_COST", 0.0)  # never stop early
    full = [finder.paths_to_any(s, t, k=k, relevance=relevance) for s, t, k in queries]
    assert fast == full


@pytest.mark.parametrize("seed", range(6))
def test_cached_search_answers_exactly_as_the_walk(seed: int) -> None:
    """Paths, order (ties included) and scores are the uncached walk's, query after query on
    one finder (its caches warm), whatever the relevances, relation filters, hops and k."""
    from tests.kg.reference_paths import ReferencePathFinder

    rng = random.Random(seed)
    o, ids = _random_ontology(rng, 25, 60, ["is_a", "suggests", "part_of"], [None, 0.4, 0.7])
    graph = ConceptGraph.from_ontology(o)
    cached, walk = PathFinder(graph), ReferencePathFinder(graph)
    for _ in range(60):
        # relevances drawn from a few values make equal costs, so ties must break alike
        relevance = {c: rng.choice([0.0, 0.5, 1.0, rng.random()]) for c in rng.sample(ids, 6)}
        query = {
            "max_hops": rng.choice([1, 2, 3, 4, 5]),
            "k": rng.choice([1, 2, 3, 5, 8]),
            "relevance": rng.choice([None, relevance]),
            "relations": rng.choice([None, ["is_a", "suggests"], ["part_of"]]),
        }
        source, targets = rng.choice(ids[:5]), rng.sample(ids, rng.choice([1, 3, 6]))
        assert cached.paths_to_any(source, targets, **query) == walk.paths_to_any(
            source, targets, **query
        )


def test_the_caches_stay_bounded_and_refill(monkeypatch: pytest.MonkeyPatch) -> None:
    import kg.paths

    monkeypatch.setattr(kg.paths, "MAX_CACHED", 12)
    finder = PathFinder(ConceptGraph.from_ontology(_chest()))
    first = [finder.paths(s, t, k=3) for s in ("X:1", "X:3", "X:6") for t in ("X:4", "X:5")]
    assert finder._cached <= 12
    again = [finder.paths(s, t, k=3) for s in ("X:1", "X:3", "X:6") for t in ("X:4", "X:5")]
    assert again == first and finder._cached <= 12


def test_a_nan_relevance_is_ranked_as_the_walk_ranks_it() -> None:
    """NaN costs defeat the cheapest-k filter; the heap alone then decides, as in the walk."""
    from tests.kg.reference_paths import ReferencePathFinder

    o = Ontology(name="diamond")
    for cid in "ABCDE":
        o.add(Concept(cid, cid))
    o.relations = [Relation("A", "r", m) for m in "BCE"] + [Relation(m, "r", "D") for m in "BCE"]
    graph = ConceptGraph.from_ontology(o)
    for relevance in ({"B": float("nan")}, dict.fromkeys("BCE", float("nan"))):
        got = PathFinder(graph).paths("A", "D", max_hops=2, k=2, relevance=relevance)
        assert got == ReferencePathFinder(graph).paths(
            "A", "D", max_hops=2, k=2, relevance=relevance
        )
