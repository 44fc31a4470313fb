from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import RGCNConv

from models.rgcn import FusedRGCNConv


def _pair(num_bases: int | None, root: bool = True) -> tuple[RGCNConv, FusedRGCNConv]:
    torch.manual_seed(0)
    ref = RGCNConv(12, 8, num_relations=5, num_bases=num_bases, root_weight=root).double()
    fused = FusedRGCNConv(12, 8, num_relations=5, num_bases=num_bases, root_weight=root).double()
    fused.load_state_dict(ref.state_dict())  # same parameter names and shapes
    return ref, fused


@pytest.mark.parametrize("num_bases", [None, 3])
@pytest.mark.parametrize("root", [True, False])
def test_matches_pyg_rgcn(num_bases: int | None, root: bool) -> None:
    ref, fused = _pair(num_bases, root)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 12, generator=g, dtype=torch.float64)
    # repeated edges, self loops, a type no edge has, nodes no edge reaches
    ei = torch.randint(0, 15, (2, 60), generator=g)
    et = torch.randint(0, 4, (60,), generator=g)
    torch.testing.assert_close(fused(x, ei, et), ref(x, ei, et))


def test_gradients_match_pyg_rgcn() -> None:
    ref, fused = _pair(3)
    x = torch.randn(10, 12, dtype=torch.float64)
    ei = torch.tensor([[0, 1, 2, 3, 3], [1, 2, 3, 0, 0]])
    et = torch.tensor([0, 1, 1, 4, 2])
    ref(x, ei, et).square().sum().backward()
    fused(x, ei, et).square().sum().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_no_edges_leaves_root_and_bias() -> None:
    ref, fused = _pair(None)
    x = torch.randn(4, 12, dtype=torch.float64)
    ei = torch.empty(2, 0, dtype=torch.long)
    et = torch.empty(0, dtype=torch.long)
    torch.testing.assert_close(fused(x, ei, et), x @ fused.root + fused.bias)
    torch.testing.assert_close(fused(x, ei, et), ref(x, ei, et))


def test_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="block"):
        FusedRGCNConv(4, 4, num_relations=2, num_blocks=2)
    with pytest.raises(ValueError, match="mean"):
        FusedRGCNConv(4, 4, num_relations=2, aggr="add")
    conv = FusedRGCNConv(4, 4, num_relations=2)
    with pytest.raises(ValueError, match="float"):
        conv(torch.arange(3), torch.tensor([[0], [1]]), torch.tensor([0]))


def test_counts_many_neighbours_in_half_precision() -> None:
    """A node with 999 neighbours of one type: bfloat16 alone would stop counting at 256."""
    ref, fused = _pair(None)
    ref, fused = ref.float(), fused.float()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 12, generator=g)
    ei = torch.stack(
        [torch.randint(0, 50, (999,), generator=g), torch.zeros(999, dtype=torch.long)]
    )
    et = torch.zeros(999, dtype=torch.long)
    want = ref(x, ei, et)[0]
    got = fused.to(torch.bfloat16)(x.to(torch.bfloat16), ei, et)[0].float()
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_refuses_the_reverse_flow() -> None:
    with pytest.raises(ValueError, match="source to target"):
        FusedRGCNConv(4, 4, num_relations=2, flow="target_to_source")
