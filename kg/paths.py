"""The path engine: top-k simple paths between concepts over typed edges in either direction.

A path may follow an edge forwards (subject -> object) or backwards; the direction is kept
so an explanation reads ``Consolidation -suggests-> Pneumonia`` or
``Pneumonia <-is_a- Bacterial pneumonia``. Paths are ranked by cost, the sum over their edges
of :func:`kg.graph.edge_cost` (hop count first, weak weighted edges later), discounted for
edges that enter a concept the caller marks relevant (the model's evidence), so
``score = 1 / cost`` is highest for short, strong paths through relevant concepts.

The search meets in the middle: all simple half-paths of up to ``ceil(H/2)`` hops from the
source and up to ``floor(H/2)`` hops into each target, joined at shared middle nodes. Every
path of at most ``H`` hops is found exactly once, so the ranking is exact, and the work is
bounded by two balls of half the radius instead of one of the full radius.

What the search walks does not depend on the relevances, only what the paths cost does. So
the half-paths from a node and the pairs of them that join into simple paths are built once
per (node, length, relation filter) and (source, target, hops) and cached on the finder;
each query then prices its candidates with numpy, in the same floating-point operations and
order as a walk would, keeps the ones that can reach its top ``k`` and ranks them through the
same heap, so the answer is the walk's, ties included. An explanation asks for the same few
findings' paths image after image: cached, that costs about a fifth of the walk.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kg.errors import KgError
from kg.graph import ConceptGraph

#: Longest path the engine accepts; explanations use at most 4 hops.
MAX_HOPS_LIMIT = 6
#: How much full relevance (1.0) lowers the cost of entering a concept.
RELEVANCE_DISCOUNT = 0.5
#: The cheapest an edge can be: weight 1 (cost 1) into a fully relevant concept.
MIN_EDGE_COST = 1.0 - RELEVANCE_DISCOUNT

#: Half-paths and joined pairs a finder keeps cached (about 300 bytes each: 60 MB at most);
#: past that the caches are emptied and built anew from the next query on. Explaining 480
#: varied radiographs with the shipped model filled them with about 22,000.
MAX_CACHED = 200_000

_Edges = tuple[tuple[int, int], ...]  # (relation index, direction) per edge
_HalfKey = tuple[int, int, frozenset[int] | None, bool]  # start, length, relations, backward
_JoinKey = tuple[int, int, int, frozenset[int] | None]  # source, target, hops, relations


@dataclass(frozen=True)
class _Halves:
    """All simple half-paths of 0..L hops from one node, without their costs.

    ``by_end`` lists, per end node in the order the walk reaches them, the indices of the
    halves ending there in the order the walk makes them. Half ``i`` enters
    ``step_node[i, j]`` over an edge of cost ``step_cost[i, j]`` at its step ``j``; past its
    length the cost is 0 and the node is the padding index ``N`` (never discounted).
    """

    nodes: list[tuple[int, ...]]
    edges: list[_Edges]
    by_end: dict[int, list[int]]
    step_cost: np.ndarray  # (halves, L) float64
    step_node: np.ndarray  # (halves, L) intp

    def costs(self, discount: np.ndarray) -> np.ndarray:
        """Each half's cost, summed step by step as the walk sums it."""
        cost = np.zeros(len(self.nodes))
        for j in range(self.step_cost.shape[1]):
            cost = cost + self.step_cost[:, j] * discount[self.step_node[:, j]]
        return cost


@dataclass(frozen=True)
class _Joins:
    """The (forward half, backward half) index pairs that form the simple paths from a
    source to one target, in the order the walk meets them."""

    first: np.ndarray  # (pairs,) intp, into the source's halves
    second: np.ndarray  # (pairs,) intp, into the target's halves


@dataclass(frozen=True)
class Path:
    """One path: ``len(nodes) == len(edges) + 1``; each edge joins consecutive nodes."""

    nodes: tuple[tuple[str, str], ...]  # (id, label)
    edges: tuple[tuple[str, str], ...]  # (relation, "forward" | "backward")
    score: float

    @property
    def hops(self) -> int:
        return len(self.edges)

    def to_dict(self) -> dict[str, object]:
        return {
            "nodes": [{"id": i, "label": lab} for i, lab in self.nodes],
            "edges": [{"relation": r, "direction": d} for r, d in self.edges],
            "score": self.score,
        }

    def __str__(self) -> str:
        parts = [self.nodes[0][1]]
        for (rel, direction), (_, label) in zip(self.edges, self.nodes[1:], strict=True):
            parts.append(f"-{rel}->" if direction == "forward" else f"<-{rel}-")
            parts.append(label)
        return " ".join(parts)


class PathFinder:
    """Path queries over one :class:`ConceptGraph`.

    Args:
        graph: the graph to search; it is never modified.
    """

    def __init__(self, graph: ConceptGraph):
        self.graph = graph
        self._halves: dict[_HalfKey, _Halves] = {}
        self._joins: dict[_JoinKey, _Joins] = {}
        self._cached = 0  # half-paths and pairs held in the two caches

    def paths(
        self,
        source: str,
        target: str,
        *,
        max_hops: int = 4,
        k: int = 5,
        relevance: Mapping[str, float] | None = None,
        relations: Collection[str] | None = None,
    ) -> list[Path]:
        """The ``k`` best simple paths from ``source`` to ``target`` of at most ``max_hops``.

        Args:
            source: concept id where paths start.
            target: concept id where paths end.
            max_hops: longest path, 1..6 (default 4).
            k: how many paths, best first (default 5).
            relevance: optional concept id -> relevance in [0, 1]; relevant concepts make
                the paths through them cheaper.
            relations: optional relation names the paths may use (default all).
        """
        return self.paths_to_any(
            source, [target], max_hops=max_hops, k=k, relevance=relevance, relations=relations
        )

    def paths_to_any(
        self,
        source: str,
        targets: Iterable[str],
        *,
        max_hops: int = 4,
        k: int = 5,
        relevance: Mapping[str, float] | None = None,
        relations: Collection[str] | None = None,
    ) -> list[Path]:
        """The ``k`` best paths from ``source`` to any of ``targets`` (see :meth:`paths`)."""
        if not 1 <= max_hops <= MAX_HOPS_LIMIT:
            raise KgError(f"max_hops must be between 1 and {MAX_HOPS_LIMIT}, got {max_hops}")
        if k < 1:
            raise KgError(f"k must be at least 1, got {k}")
        g = self.graph
        s = g.node(source)
        target_idx = sorted({g.node(t) for t in targets} - {s})
        if not target_idx:
            return []
        allowed = self._relation_filter(relations)
        discount = self._discounts(relevance)
        # Iterative deepening: every edge costs at least MIN_EDGE_COST, so once the k-th best
        # path of at most h hops is cheaper than any path of h + 1 hops can be, longer paths
        # cannot enter the top k and the (much larger) deeper search is skipped.
        for hops in range(min(2, max_hops), max_hops + 1):
            ranked = self._search(s, target_idx, hops, k, allowed, discount)
            if hops == max_hops or (
                len(ranked) >= k and ranked[k - 1][0] < MIN_EDGE_COST * (hops + 1)
            ):
                break
        return [self._to_path(cost, nodes, edges) for cost, nodes, edges in ranked]

    def _search(
        self,
        s: int,
        target_idx: list[int],
        max_hops: int,
        k: int,
        allowed: set[int] | None,
        discount: np.ndarray,
    ) -> list[tuple[float, tuple[int, ...], _Edges]]:
        """The k cheapest paths of at most ``max_hops``, as ``(cost, nodes, edges)``."""
        fwd_len = (max_hops + 1) // 2
        back_len = max_hops // 2
        key = None if allowed is None else frozenset(allowed)
        forward = self._half_paths(s, fwd_len, key, backward=False)
        forward_cost = forward.costs(discount)
        # Every candidate path of every target, priced, in the order the walk meets them.
        parts: list[tuple[_Halves, _Joins]] = []
        costs: list[np.ndarray] = []
        for t in target_idx:
            backward = self._half_paths(t, back_len, key, backward=True)
            joins = self._join(s, t, max_hops, key, forward, backward)
            if len(joins.first):
                parts.append((backward, joins))
                costs.append(forward_cost[joins.first] + backward.costs(discount)[joins.second])
        if not costs:
            return []
        cost = np.concatenate(costs)
        owner = np.repeat(np.arange(len(parts)), [len(c) for c in costs])
        offset = np.cumsum([0] + [len(c) for c in costs])
        # Only a candidate no dearer than the k-th cheapest can end in the top k; the others
        # would only have filled free places in the heap, so they are left out of it.
        if len(cost) > k and not np.isnan(cost).any():  # NaN: the heap alone, as the walk
            (keep,) = np.nonzero(cost <= np.partition(cost, k - 1)[k - 1])
        else:
            keep = np.arange(len(cost))
        best: list[tuple[float, int]] = []
        for i in keep.tolist():
            item = (-float(cost[i]), i)
            if len(best) < k:
                heapq.heappush(best, item)
            elif item[0] > best[0][0]:
                heapq.heapreplace(best, item)
        ranked = []
        for neg, i in sorted(best, key=lambda it: (-it[0], it[1])):
            backward, joins = parts[int(owner[i])]
            j = i - int(offset[owner[i]])
            a, b = int(joins.first[j]), int(joins.second[j])
            n1, e1, n2, e2 = (
                forward.nodes[a],
                forward.edges[a],
                backward.nodes[b],
                backward.edges[b],
            )
            ranked.append((-neg, n1 + n2[-2::-1], e1 + e2[::-1]))
        return ranked

    def _join(
        self,
        s: int,
        t: int,
        max_hops: int,
        allowed: frozenset[int] | None,
        forward: _Halves,
        backward: _Halves,
    ) -> _Joins:
        """The pairs of halves that join into simple paths from ``s`` to ``t`` (cached)."""
        key = (s, t, max_hops, allowed)
        found = self._joins.get(key)
        if found is not None:
            return found
        fwd_len = (max_hops + 1) // 2
        first: list[int] = []
        second: list[int] = []
        for m, into_m in backward.by_end.items():
            out_of_s = forward.by_end.get(m)
            if not out_of_s:
                continue
            for a in out_of_s:
                n1 = forward.nodes[a]
                # Canonical split: the forward half is as long as it may be, unless the
                # whole path fits in it; so each path is produced once.
                full_forward = len(forward.edges[a]) == fwd_len
                n1_set = set(n1)
                for b in into_m:
                    if backward.edges[b] and not full_forward:
                        continue
                    if any(v in n1_set for v in backward.nodes[b][:-1]):
                        continue
                    first.append(a)
                    second.append(b)
        joins = _Joins(np.asarray(first, dtype=np.intp), np.asarray(second, dtype=np.intp))
        self._remember(self._joins, key, joins, len(first))
        return joins

    def _relation_filter(self, relations: Collection[str] | None) -> set[int] | None:
        if relations is None:
            return None
        known = set(self.graph.relations)
        unknown = sorted(set(relations) - known)
        if unknown:
            raise KgError(
                f"unknown relation(s) {', '.join(unknown)}; this ontology has "
                f"{', '.join(self.graph.relations) or 'none'}"
            )
        return {i for i, r in enumerate(self.graph.relations) if r in relations}

    def _discounts(self, relevance: Mapping[str, float] | None) -> np.ndarray:
        """The factor on the cost of entering each node (1 where not relevant), and 1 at
        the padding index ``N``."""
        out = np.ones(len(self.graph.ids) + 1)
        for cid, r in (relevance or {}).items():
            i = self.graph.index.get(cid)
            if i is not None:
                out[i] = 1.0 - RELEVANCE_DISCOUNT * min(max(float(r), 0.0), 1.0)
        return out

    def _half_paths(
        self,
        start: int,
        length: int,
        allowed: frozenset[int] | None,
        *,
        backward: bool,
    ) -> _Halves:
        """All simple paths of 0..``length`` hops from ``start``, grouped by end node (cached).

        For the target side (``backward=True``) paths are walked from the target, so each
        edge's direction is flipped to read source -> target once reversed, and the discount
        applies to the node the full path enters (the one nearer the target).
        """
        key = (start, length, allowed, backward)
        found = self._halves.get(key)
        if found is not None:
            return found
        adjacency = self.graph.adjacency
        pad = len(self.graph.ids)
        nodes: list[tuple[int, ...]] = [(start,)]
        edges: list[_Edges] = [()]
        steps: list[tuple[tuple[float, int], ...]] = [()]
        by_end: dict[int, list[int]] = {start: [0]}
        frontier = [0]
        for _ in range(length):
            nxt: list[int] = []
            for h in frontier:
                path = nodes[h]
                u = path[-1]
                for v, r, d, c in adjacency[u]:
                    if allowed is not None and r not in allowed:
                        continue
                    if v in path:
                        continue
                    nodes.append((*path, v))
                    edges.append((*edges[h], (r, -d if backward else d)))
                    steps.append((*steps[h], (c, u if backward else v)))
                    nxt.append(len(nodes) - 1)
                    by_end.setdefault(v, []).append(len(nodes) - 1)
            frontier = nxt
        step_cost = np.zeros((len(nodes), length))
        step_node = np.full((len(nodes), length), pad, dtype=np.intp)
        for i, half in enumerate(steps):
            for j, (c, entered) in enumerate(half):
                step_cost[i, j] = c
                step_node[i, j] = entered
        halves = _Halves(nodes, edges, by_end, step_cost, step_node)
        self._remember(self._halves, key, halves, len(nodes))
        return halves

    def _remember(self, cache: dict[Any, Any], key: Any, value: Any, size: int) -> None:
        size = max(size, 1)  # an empty join is an entry too
        if self._cached + size > MAX_CACHED:
            self._halves.clear()
            self._joins.clear()
            self._cached = 0
        cache[key] = value
        self._cached += size

    def _to_path(
        self, cost: float, nodes: tuple[int, ...], edges: tuple[tuple[int, int], ...]
    ) -> Path:
        g = self.graph
        return Path(
            nodes=tuple((g.ids[i], g.labels[i]) for i in nodes),
            edges=tuple((g.relations[r], "forward" if d == 1 else "backward") for r, d in edges),
            score=round(1.0 / cost, 6) if cost > 0 else 1.0,
        )
