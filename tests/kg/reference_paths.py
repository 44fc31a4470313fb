"""The path search as it was before its caches: a walk per query, the oracle the cached
:class:`kg.paths.PathFinder` must match exactly (tests only).

:class:`ReferencePathFinder` is the finder with its search core (relevance discounts, the
half-path walk, the meet-in-the-middle join) put back as it was; the query API, the
iterative deepening and the path records are the finder's own.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

from kg.paths import PathFinder

_Half = tuple[float, tuple[int, ...], tuple[tuple[int, int], ...]]


class ReferencePathFinder(PathFinder):
    """:class:`PathFinder` searching by walking the graph for every query."""

    def _search(
        self,
        s: int,
        target_idx: list[int],
        max_hops: int,
        k: int,
        allowed: set[int] | None,
        discount: Any,  # this finder's own _discounts: a dict of node -> factor
    ) -> list[tuple[float, tuple[int, ...], tuple[tuple[int, int], ...]]]:
        """The k cheapest paths of at most ``max_hops``, as ``(cost, nodes, edges)``."""
        fwd_len = (max_hops + 1) // 2
        back_len = max_hops // 2

        forward = self._walk_halves(s, fwd_len, allowed, discount, backward=False)
        best: list[tuple[float, int, tuple[int, ...], tuple[tuple[int, int], ...]]] = []
        counter = 0
        for t in target_idx:
            backward = self._walk_halves(t, back_len, allowed, discount, backward=True)
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

    def _discounts(self, relevance: Mapping[str, float] | None) -> Any:
        """The finder's factors as the walk reads them: node -> factor, where not 1."""
        factors = super()._discounts(relevance)[:-1]  # the last is the padding index
        return {i: float(f) for i, f in enumerate(factors) if f != 1.0}

    def _walk_halves(
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
