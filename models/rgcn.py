"""R-GCN layer with every relation type in one pass: PyG's :class:`RGCNConv`, same parameters.

PyG's ``RGCNConv`` (with basis decomposition, or without ``pyg-lib``'s segment matmul)
loops over the relation types: per type it masks the edges (``nonzero``, a host-device
synchronisation on CUDA), aggregates and multiplies. With the ontology's 12 edge types (6
relations and their reverses) and 2 layers, a training step of the KG model on an H200 made
24 such synchronisations and ~1,460 kernel launches; it took ~70 ms, of which the GPU was
busy ~7 ms, against ~12 ms for the backbone alone.

:class:`FusedRGCNConv` computes the same function with a handful of kernels whatever the
number of types: the per-(node, type) mean of the neighbours' features is one
``index_add_`` into an ``(R * N, in)`` buffer, and ``sum_r mean_r(x_j) W_r`` is one matrix
product of the ``(N, R * in)`` aggregate with the ``(R * in, out)`` stacked weights. Its
parameters are ``RGCNConv``'s (``weight``, ``comp``, ``root``, ``bias``), so checkpoints
saved with either load into the other. Its output is that of PyG's per-type loop (the mean
over each type's neighbours); PyG's segment-matmul path (``pyg-lib`` installed, no bases, its
heuristic on) averages over all of a node's neighbours instead, so weights trained on that
path compute differently here.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.nn import RGCNConv


class FusedRGCNConv(RGCNConv):
    r"""``h_i' = W_0 h_i + b + \sum_r \frac{1}{|N_r(i)|} \sum_{j \in N_r(i)} W_r h_j``.

    Takes :class:`RGCNConv`'s arguments (``aggr="mean"``, the default, only; no block
    decomposition) and computes its output up to float rounding.

    Shapes:
        x: (N, in), edge_index: (2, E) source -> target, edge_type: (E,) in ``[0, R)``
        -> (N, out).
    """

    def __init__(self, in_channels: int, out_channels: int, num_relations: int, **kwargs: object):
        if kwargs.get("num_blocks") is not None:
            raise ValueError("FusedRGCNConv has no block-diagonal decomposition")
        if kwargs.get("aggr", "mean") != "mean":
            raise ValueError("FusedRGCNConv aggregates by mean only")
        if kwargs.get("flow", "source_to_target") != "source_to_target":
            raise ValueError("FusedRGCNConv passes messages from source to target only")
        super().__init__(in_channels, out_channels, num_relations, **kwargs)

    def forward(self, x: Tensor, edge_index: Tensor, edge_type: Tensor) -> Tensor:
        if not torch.is_floating_point(x):
            raise ValueError("FusedRGCNConv needs float node features")
        n, r = x.size(0), self.num_relations
        weight = self.weight  # (R, in, out) or (B, in, out)
        if self.num_bases is not None:
            weight = (self.comp @ weight.view(self.num_bases, -1)).view(
                r, self.in_channels_l, self.out_channels
            )
        src, dst = edge_index[0], edge_index[1]
        slot = edge_type * n + dst  # (E,) row of the (R * N) aggregate
        # counts and means in float32 at least: bfloat16 stops counting at 256
        acc = torch.promote_types(x.dtype, torch.float32)
        count = torch.zeros(r * n, dtype=acc, device=x.device)
        count.index_add_(0, slot, torch.ones_like(slot, dtype=acc))
        scale = count.clamp_min(1.0).reciprocal()[slot]  # (E,) 1 / |N_r(i)|
        agg = torch.zeros(r * n, x.size(1), dtype=acc, device=x.device)
        agg.index_add_(0, slot, x[src].to(acc) * scale.unsqueeze(1))  # (R * N, in)
        agg = agg.view(r, n, -1).transpose(0, 1).reshape(n, -1).to(x.dtype)  # (N, R * in)
        out = agg @ weight.reshape(-1, self.out_channels)  # (N, out)
        if self.root is not None:
            out = out + x @ self.root
        if self.bias is not None:
            out = out + self.bias
        return out
