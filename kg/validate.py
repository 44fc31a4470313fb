"""Structural checks every loaded ontology passes: no dangling references, no ``is_a`` cycles.

Duplicate ids are caught by the parsers, which know the line; this module sees only the
parsed :class:`~kg.ontology.Ontology`. The cycle check is Kahn's algorithm (no recursion, so
300k concepts and 1M edges take about a second) followed by a walk that extracts one cycle,
in order, for the error message.
"""

from __future__ import annotations

from collections import deque

from kg.errors import CycleError, DanglingReferenceError, OntologyValidationError
from kg.ontology import HIERARCHY_RELATIONS, Ontology, Relation


def validate(
    ontology: Ontology, *, allow_cycles: bool = False, drop_dangling: bool = False
) -> Ontology:
    """Check ``ontology`` in place and return it.

    Args:
        ontology: a freshly parsed ontology.
        allow_cycles: keep ``is_a`` cycles (self-loops included) instead of raising; the
            number of concepts on a cycle or with an ancestor on one is recorded in
            ``meta["is_a_cycle_concepts"]``.
        drop_dangling: drop relations whose subject or object is not a concept instead of
            raising; the number dropped is recorded in ``meta["dropped_dangling"]``.

    Raises:
        DanglingReferenceError: a relation points at an undefined concept.
        CycleError: the ``is_a`` hierarchy has a cycle; ``cycle`` lists it in order.
        OntologyValidationError: a relation weight outside (0, 1].
    """
    _check_weights(ontology.relations)
    _check_dangling(ontology, drop=drop_dangling)
    for predicate in HIERARCHY_RELATIONS:
        cycle_nodes = find_cycle_nodes(ontology, predicate)
        if cycle_nodes and not allow_cycles:
            raise CycleError(extract_cycle(ontology, predicate, cycle_nodes), predicate)
        if cycle_nodes:
            key = f"{predicate}_cycle_concepts"
            ontology.meta[key] = str(len(cycle_nodes))
    return ontology


def _check_weights(relations: list[Relation]) -> None:
    for r in relations:
        w = r.weight
        if w is not None and not 0.0 < w <= 1.0:  # also refuses NaN
            raise OntologyValidationError(
                f"relation {r.subject} {r.predicate} {r.object} has weight {w}; "
                "weights must be in (0, 1]"
            )


def _check_dangling(ontology: Ontology, *, drop: bool) -> None:
    concepts = ontology.concepts
    bad = [r for r in ontology.relations if r.subject not in concepts or r.object not in concepts]
    if not bad:
        return
    if not drop:
        missing = [(r.subject, r.predicate, r.object) for r in bad]
        raise DanglingReferenceError(missing)
    ontology.relations = [
        r for r in ontology.relations if r.subject in concepts and r.object in concepts
    ]
    ontology.meta["dropped_dangling"] = str(len(bad))


def _successors(ontology: Ontology, predicate: str) -> tuple[list[str], list[list[int]]]:
    """Integer adjacency of one relation: ids and, per node, the indices of its objects."""
    index: dict[str, int] = {}
    ids: list[str] = []
    succ: list[list[int]] = []
    for r in ontology.relations:
        if r.predicate != predicate:
            continue
        for node in (r.subject, r.object):
            if node not in index:
                index[node] = len(ids)
                ids.append(node)
                succ.append([])
        succ[index[r.subject]].append(index[r.object])
    return ids, succ


def find_cycle_nodes(ontology: Ontology, predicate: str = "is_a") -> list[str]:
    """Ids of the concepts that lie on a ``predicate`` cycle or can reach one.

    Kahn's algorithm peeling nodes with no remaining successors; what is left cannot be
    ordered. Empty when the relation is acyclic.
    """
    ids, succ = _successors(ontology, predicate)
    n = len(ids)
    out_degree = [len(s) for s in succ]
    preds: list[list[int]] = [[] for _ in range(n)]
    for s, targets in enumerate(succ):
        for t in targets:
            preds[t].append(s)
    queue = deque(i for i in range(n) if out_degree[i] == 0)
    removed = 0
    while queue:
        node = queue.popleft()
        removed += 1
        for p in preds[node]:
            out_degree[p] -= 1
            if out_degree[p] == 0:
                queue.append(p)
    if removed == n:
        return []
    return [ids[i] for i in range(n) if out_degree[i] > 0]


def extract_cycle(
    ontology: Ontology, predicate: str = "is_a", cycle_nodes: list[str] | None = None
) -> list[str]:
    """One ``predicate`` cycle, in edge order (``[a, b, c]`` for ``a -> b -> c -> a``).

    Every node left by :func:`find_cycle_nodes` has a successor that is also left, so
    walking successors inside that set must revisit a node; the walk from that node on
    is a cycle. Empty when there is no cycle.
    """
    if cycle_nodes is None:
        cycle_nodes = find_cycle_nodes(ontology, predicate)
    if not cycle_nodes:
        return []
    remaining = set(cycle_nodes)
    succ: dict[str, list[str]] = {}
    for r in ontology.relations:
        if r.predicate == predicate and r.subject in remaining and r.object in remaining:
            succ.setdefault(r.subject, []).append(r.object)
    node = min(cycle_nodes)  # deterministic messages
    position: dict[str, int] = {}
    path: list[str] = []
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = min(succ[node])
    return path[position[node] :]
