"""Structural validation: dangling references, is_a cycles (checked against networkx), weights."""

from __future__ import annotations

import random
import time

import networkx as nx
import pytest

from kg.errors import CycleError, DanglingReferenceError, OntologyValidationError
from kg.ontology import Concept, Ontology, Relation
from kg.validate import extract_cycle, find_cycle_nodes, validate


def make(n: int, edges: list[tuple[int, int]], predicate: str = "is_a") -> Ontology:
    onto = Ontology("t", {f"C{i}": Concept(f"C{i}") for i in range(n)})
    onto.relations = [Relation(f"C{s}", predicate, f"C{o}") for s, o in edges]
    return onto


def test_acyclic_passes_unchanged() -> None:
    onto = make(4, [(1, 0), (2, 0), (3, 1), (3, 2)])
    assert validate(onto) is onto
    assert len(onto.relations) == 4 and "dropped_dangling" not in onto.meta


@pytest.mark.parametrize(
    ("edges", "cycle"),
    [
        ([(0, 0)], ["C0"]),
        ([(0, 1), (1, 0)], ["C0", "C1"]),
        ([(0, 1), (1, 2), (2, 3), (3, 1)], ["C1", "C2", "C3"]),
        ([(4, 0), (0, 2), (2, 1), (1, 0)], ["C0", "C2", "C1"]),
    ],
    ids=["self-loop", "two", "three-behind-a-tail", "order-follows-edges"],
)
def test_cycles_listed_in_order(edges: list[tuple[int, int]], cycle: list[str]) -> None:
    onto = make(5, edges)
    with pytest.raises(CycleError) as err:
        validate(onto)
    assert err.value.cycle == cycle


def test_allow_cycles_keeps_them_and_counts() -> None:
    onto = make(3, [(0, 1), (1, 0), (2, 2)])
    validate(onto, allow_cycles=True)
    assert len(onto.relations) == 3
    assert onto.meta["is_a_cycle_concepts"] == "3"


def test_other_relations_may_cycle() -> None:
    validate(make(2, [(0, 1), (1, 0)], predicate="co_occurs_with"))


@pytest.mark.parametrize("seed", range(40))
def test_cycle_detection_matches_networkx(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randint(1, 2 * n))]
    if seed % 2:  # half the cases: a DAG (edges point to lower indices)
        edges = [(max(s, o), min(s, o)) for s, o in edges if s != o]
    onto = make(n, edges)
    graph = nx.DiGraph([(f"C{s}", f"C{o}") for s, o in edges])
    cycle = extract_cycle(onto)
    assert bool(cycle) == (not nx.is_directed_acyclic_graph(graph))
    for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True):
        assert graph.has_edge(a, b)
    assert len(set(cycle)) == len(cycle)
    # Every node on a cycle is reported (nodes that only lead into one may be too).
    on_cycles = {
        v
        for comp in nx.strongly_connected_components(graph)
        for v in comp
        if len(comp) > 1 or graph.has_edge(v, v)
    }
    assert on_cycles <= set(find_cycle_nodes(onto))


def test_long_chain_needs_no_recursion() -> None:
    n = 100_000  # far past the recursion limit
    onto = make(n, [(i + 1, i) for i in range(n - 1)] + [(0, n - 1)])
    cycle = extract_cycle(onto)
    assert len(cycle) == n


def test_fast_on_large_graph() -> None:
    rng = random.Random(0)
    n, m = 100_000, 350_000
    edges = [(i, rng.randrange(i)) for i in range(1, n)]
    edges += [(s, rng.randrange(s)) for s in (rng.randrange(1, n) for _ in range(m - n + 1))]
    onto = make(n, edges)
    start = time.process_time()  # CPU time: other processes on the machine do not count
    validate(onto)
    assert time.process_time() - start < 3.0


def test_dangling_references_listed() -> None:
    onto = make(2, [(0, 1)])
    onto.relations += [Relation("C0", "part_of", "X9"), Relation("X8", "is_a", "C1")]
    with pytest.raises(DanglingReferenceError) as err:
        validate(onto)
    assert err.value.missing == [("C0", "part_of", "X9"), ("X8", "is_a", "C1")]
    assert "--drop-dangling" in str(err.value)


def test_drop_dangling_records_count() -> None:
    onto = make(2, [(0, 1)])
    onto.relations += [Relation("C0", "part_of", "X9"), Relation("X8", "is_a", "X7")]
    validate(onto, drop_dangling=True)
    assert onto.relations == [Relation("C0", "is_a", "C1")]
    assert onto.meta["dropped_dangling"] == "2"


def test_dangling_is_checked_before_cycles() -> None:
    onto = make(1, [(0, 0)])
    onto.relations.append(Relation("C0", "is_a", "C404"))
    with pytest.raises(DanglingReferenceError):
        validate(onto)


@pytest.mark.parametrize("weight", [0.0, -0.5, 1.5, float("nan")])
def test_weights_outside_unit_interval(weight: float) -> None:
    onto = make(2, [])
    onto.relations = [Relation("C0", "suggests", "C1", weight)]
    with pytest.raises(OntologyValidationError, match="weights must be in"):
        validate(onto)
