from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from kg.tensors import GraphArrays
from models.errors import ConfigError, UnknownConceptError
from models.gnn import (
    OntologyGNN,
    OntologyGNNConfig,
    add_reverse_edges,
    check_edge_types,
    k_hop_subgraph_for,
)


def _gnn(arrays: GraphArrays, **kw: object) -> OntologyGNN:
    cfg = OntologyGNNConfig(in_dim=16, hidden=32, num_relations=arrays.num_relations, **kw)  # type: ignore[arg-type]
    return OntologyGNN(cfg).eval()


def _tensors(arrays: GraphArrays) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(arrays.edge_index), torch.from_numpy(arrays.edge_type)


@pytest.mark.parametrize("conv", ["rgcn", "gat"])
@pytest.mark.parametrize("layers", [2, 3])
def test_output_shape(arrays: GraphArrays, features: torch.Tensor, conv: str, layers: int) -> None:
    gnn = _gnn(arrays, conv=conv, layers=layers)
    out = gnn(features, *_tensors(arrays))
    assert out.shape == (arrays.num_nodes, 32)
    assert torch.isfinite(out).all()


def test_reverse_edges() -> None:
    ei = torch.tensor([[0, 1], [1, 2]])
    et = torch.tensor([0, 1])
    full, types = add_reverse_edges(ei, et, 2)
    assert full.tolist() == [[0, 1, 1, 2], [1, 2, 0, 1]]
    assert types.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("conv", ["rgcn", "gat"])
def test_messages_flow_both_ways(arrays: GraphArrays, features: torch.Tensor, conv: str) -> None:
    """With one layer, changing a node changes both its is_a parent and its is_a child."""
    gnn = _gnn(arrays, conv=conv, layers=1)
    idx = arrays.index()
    ei, et = _tensors(arrays)
    base = gnn(features, ei, et)
    x = features.clone()
    x[idx["X:opacity"]] += 1.0
    out = gnn(x, ei, et)
    changed = (out - base).abs().sum(-1) > 1e-6
    assert changed[idx["X:finding"]]  # opacity -is_a-> finding (forward)
    assert changed[idx["X:consolidation"]]  # consolidation -is_a-> opacity (reverse)
    assert not changed[idx["X:pleura"]]  # not a neighbour


def test_num_bases_shrinks_rgcn(arrays: GraphArrays) -> None:
    full = sum(p.numel() for p in _gnn(arrays).parameters())
    based = sum(p.numel() for p in _gnn(arrays, num_bases=2).parameters())
    assert based < full


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="conv"):
        OntologyGNNConfig(conv="gcn")
    with pytest.raises(ConfigError, match="heads"):
        OntologyGNNConfig(conv="gat", hidden=30, heads=4)
    with pytest.raises(ConfigError, match="num_relations"):
        OntologyGNN(OntologyGNNConfig())


def test_rejects_unknown_edge_type(arrays: GraphArrays, features: torch.Tensor) -> None:
    gnn = _gnn(arrays)
    ei, et = _tensors(arrays)
    with pytest.raises(ValueError, match="edge_type"):
        gnn(features, ei, et + arrays.num_relations)


def test_rejects_negative_edge_type(arrays: GraphArrays, features: torch.Tensor) -> None:
    gnn = _gnn(arrays)
    ei, et = _tensors(arrays)
    et = et.clone()
    et[3] = -1
    with pytest.raises(ValueError, match="edge_type holds -1"):
        gnn(features, ei, et)


def test_checks_every_call_unless_told(arrays: GraphArrays, features: torch.Tensor) -> None:
    gnn = _gnn(arrays)
    ei, et = _tensors(arrays)
    et = et.clone()
    gnn(features, ei, et)
    et.add_(arrays.num_relations)  # the same tensor, written in place
    with pytest.raises(ValueError, match="edge_type"):
        gnn(features, ei, et)
    with torch.inference_mode():  # inference tensors are checked too
        with pytest.raises(ValueError, match="edge_type"):
            gnn(features, ei, et.clone())
        assert gnn(features, ei, et.clone() % arrays.num_relations).shape[0] == len(features)
    with pytest.raises(ValueError, match="relation types 0 to"):
        check_edge_types(et, arrays.num_relations)


def _bfs(arrays: GraphArrays, seeds: list[int], k: int) -> set[int]:
    adj: dict[int, set[int]] = {i: set() for i in range(arrays.num_nodes)}
    for s, o in arrays.edge_index.T.tolist():
        adj[s].add(o)
        adj[o].add(s)
    seen = {s: 0 for s in seeds}
    queue = deque(seeds)
    while queue:
        n = queue.popleft()
        if seen[n] == k:
            continue
        for m in adj[n]:
            if m not in seen:
                seen[m] = seen[n] + 1
                queue.append(m)
    return set(seen)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_k_hop_subgraph_matches_bfs(arrays: GraphArrays, k: int) -> None:
    hood = k_hop_subgraph_for(["X:pleura"], arrays, k)
    idx = arrays.index()
    expected = _bfs(arrays, [idx["X:pleura"]], k)
    assert set(hood.nodes.tolist()) == expected
    sub = hood.arrays
    assert sub.node_ids == [arrays.node_ids[i] for i in sorted(expected)]
    # every kept edge is an original edge between kept nodes, with its type
    original = {
        (arrays.node_ids[s], arrays.node_ids[o], int(t))
        for (s, o), t in zip(arrays.edge_index.T.tolist(), arrays.edge_type, strict=True)
    }
    kept = {
        (sub.node_ids[s], sub.node_ids[o], int(t))
        for (s, o), t in zip(sub.edge_index.T.tolist(), sub.edge_type, strict=True)
    }
    inside = {e for e in original if e[0] in sub.node_ids and e[1] in sub.node_ids}
    assert kept == inside
    assert sub.relations == arrays.relations
    assert sub.edge_weight.dtype == np.float32


def test_k_hop_subgraph_unknown_target(arrays: GraphArrays) -> None:
    with pytest.raises(UnknownConceptError, match="X:nope"):
        k_hop_subgraph_for(["X:nope"], arrays, 1)
