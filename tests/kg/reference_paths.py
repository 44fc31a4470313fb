"""The path engine as it was before its caches: a walk per query, the oracle the cached
:class:`kg.paths.PathFinder` must match exactly (tests only)."""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Mapping

from kg.errors import KgError
from kg.graph import ConceptGraph
from kg.paths import MAX_HOPS_LIMIT, MIN_EDGE_COST, RELEVANCE_DISCOUNT, Path

_Half = tuple[float, tuple[int, ...], tuple[tuple[int, int], ...]]


class ReferencePathFinder:
    """Path queries over one :class:`ConceptGraph`.

    Args:
        graph: the graph to search; it is never modified.
    """

    def __init__(self, graph: ConceptGraph):
        self.graph = graph

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
        discount: dict[int, float],
    ) -> list[tuple[float, tuple[int, ...], tuple[tuple[int, int], ...]]]:
        """The k cheapest paths of at most ``max_hops``, as ``(cost, nodes, edges)``."""
        fwd_len = (max_hops + 1) // 2
        back_len = max_hops // 2

        forward = self._half_paths(s, fwd_len, allowed, discount, backward=False)
        best: list[tuple[float, int, tuple[int, ...], tuple[tuple[int, int], ...]]] = []
        counter = 0
        for t in target_idx:
            backward = self._half_paths(t, back_len, allowed, discount, backward=True)
            for m, into_m in backward.items():
                out_of_s = forward.get(m)
                if not out_of_s:
                    continue
                for c1, n1, e1 in out_of_s:
                    # Canonical split: the forward half is as long as it may be, unless the
                    # whole path fits in it; so each path is produced once.
                    full_forward = len(e1) == fwd_len
                    n1_set = set(n1)
                    for c2, n2, e2 in into_m:
                        if e2 and not full_forward:
                            continue
                        if any(v in n1_set for v in n2[:-1]):
                            continue
                        cost = c1 + c2
                        counter += 1
                        item = (-cost, counter, n1 + n2[-2::-1], e1 + e2[::-1])
                        if len(best) < k:
                            heapq.heappush(best, item)
                        elif -cost > best[0][0]:
                            heapq.heapreplace(best, item)
        ranked = sorted(best, key=lambda it: (-it[0], it[1]))
        return [(-neg, nodes, edges) for neg, _, nodes, edges in ranked]

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

    def _discounts(self, relevance: Mapping[str, float] | None) -> dict[int, float]:
        if not relevance:
            return {}
        out: dict[int, float] = {}
        for cid, r in relevance.items():
            i = self.graph.index.get(cid)
            if i is not None:
                out[i] = 1.0 - RELEVANCE_DISCOUNT * min(max(float(r), 0.0), 1.0)
        return out

    def _half_paths(
        self,
        start: int,
        length: int,
        allowed: set[int] | None,
        discount: dict[int, float],
        *,
        backward: bool,
    ) -> dict[int, list[_Half]]:
        """All simple paths of 0..``length`` hops from ``start``, grouped by end node.

        For the target side (``backward=True``) paths are walked from the target, so each
        edge's direction is flipped to read source -> target once reversed, and the discount
        applies to the node the full path enters (the one nearer the target).
        """
        adjacency = self.graph.adjacency
        start_half: _Half = (0.0, (start,), ())
        by_end: dict[int, list[_Half]] = {start: [start_half]}
        frontier: list[_Half] = [start_half]
        for _ in range(length):
            nxt: list[_Half] = []
            for cost, nodes, edges in frontier:
                u = nodes[-1]
                for v, r, d, c in adjacency[u]:
                    if allowed is not None and r not in allowed:
                        continue
                    if v in nodes:
                        continue
                    entered = u if backward else v
                    step = c * discount.get(entered, 1.0)
                    half = (cost + step, (*nodes, v), (*edges, (r, -d if backward else d)))
                    nxt.append(half)
                    by_end.setdefault(v, []).append(half)
            frontier = nxt
        return by_end

    def _to_path(
        self, cost: float, nodes: tuple[int, ...], edges: tuple[tuple[int, int], ...]
    ) -> Path:
        g = self.graph
        return Path(
            nodes=tuple((g.ids[i], g.labels[i]) for i in nodes),
            edges=tuple((g.relations[r], "forward" if d == 1 else "backward") for r, d in edges),
            score=round(1.0 / cost, 6) if cost > 0 else 1.0,
        )
