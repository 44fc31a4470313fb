"""Ontology GNN: relation-aware message passing over concept text features.

Each directed relation ``s -r-> o`` is used twice, as relation ``r`` from ``s`` to ``o`` and
as its own reverse type ``r^-1`` from ``o`` to ``s``, so a finding hears both its parents
(``is_a``) and its children, both what it ``suggests`` and what suggests it, without the
two directions sharing weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATv2Conv
from torch_geometric.utils import k_hop_subgraph, subgraph

from kg.tensors import GraphArrays
from models.errors import ConfigError, UnknownConceptError
from models.rgcn import FusedRGCNConv

_CONVS = ("rgcn", "gat")


@dataclass
class OntologyGNNConfig:
    """Shape of the ontology GNN.

    Args:
        in_dim: width of the node text features (default 384, MiniLM).
        hidden: width of every layer and of the output (default 256).
        layers: message-passing layers, 2-3 cover the neighbourhood that matters (default 2).
        num_relations: forward relation types; 0 (default) = taken from the graph.
        conv: ``"rgcn"`` (default, Schlichtkrull et al. 2018) or ``"gat"`` (GATv2, Brody et
            al. 2022, with a learned embedding per relation type as edge attribute).
        num_bases: R-GCN basis decomposition, ``None`` (default) = one full matrix per type.
        heads: attention heads of the GAT layers (default 4; ``hidden`` must divide by it).
        dropout: dropout on every layer's output (default 0.1).
    """

    in_dim: int = 384  # node feature width (text encoder output)
    hidden: int = 256  # layer width = output width D
    layers: int = 2  # message-passing layers
    num_relations: int = 0  # forward relation types; 0 = from the graph
    conv: str = "rgcn"  # "rgcn" | "gat"
    num_bases: int | None = None  # R-GCN basis decomposition (None = full)
    heads: int = 4  # GAT heads
    dropout: float = 0.1  # on every layer's output

    def __post_init__(self) -> None:
        if self.conv not in _CONVS:
            raise ConfigError(f"gnn.conv must be one of {_CONVS}, got {self.conv!r}")
        if self.layers < 1:
            raise ConfigError(f"gnn.layers must be >= 1, got {self.layers}")
        if self.in_dim < 1 or self.hidden < 1:
            raise ConfigError(
                f"gnn.in_dim and gnn.hidden must be >= 1, got {self.in_dim}, {self.hidden}"
            )
        if self.num_relations < 0:
            raise ConfigError(f"gnn.num_relations must be >= 0, got {self.num_relations}")
        if self.num_bases is not None and self.num_bases < 1:
            raise ConfigError(f"gnn.num_bases must be None or >= 1, got {self.num_bases}")
        if self.conv == "gat" and self.hidden % self.heads:
            raise ConfigError(
                f"gnn.hidden={self.hidden} must be divisible by gnn.heads={self.heads}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"gnn.dropout must be in [0, 1), got {self.dropout}")


def add_reverse_edges(
    edge_index: torch.Tensor, edge_type: torch.Tensor, num_relations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append each edge reversed, typed ``r + num_relations``.

    Shapes:
        edge_index: (2, E) -> (2, 2E); edge_type: (E,) -> (2E,).
    """
    rev = edge_index.flip(0)  # (2, E)
    return torch.cat([edge_index, rev], 1), torch.cat([edge_type, edge_type + num_relations])


def check_edge_types(edge_type: torch.Tensor, num_relations: int) -> None:
    """Raise ``ValueError`` unless every edge type lies in ``[0, num_relations)``."""
    if not edge_type.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(edge_type))
    if lo < 0 or hi >= num_relations:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"edge_type holds {bad}, the GNN knows relation types 0 to {num_relations - 1}"
        )


class OntologyGNN(nn.Module):
    r"""Relation-aware GNN over the ontology: concept text features -> entity embeddings.

    Each layer is a pre-activation residual block

    .. math::
        h^{(l+1)} = \mathrm{LayerNorm}\big(h^{(l)} + \mathrm{Dropout}(\mathrm{GELU}(
        \mathrm{Conv}(h^{(l)}, \mathcal{E}, r)))\big)

    with ``Conv`` an R-GCN layer (``h_i' = W_0 h_i + \sum_r \sum_{j \in N_r(i)} W_r h_j /
    |N_r(i)|``, optional basis decomposition) or a GATv2 layer whose attention also sees
    the relation type. Reverse edges are added as their own types (``2R`` in all).

    Args:
        config: :class:`OntologyGNNConfig`; ``num_relations`` must be set (> 0) here.

    Shapes:
        x: (N, in_dim), edge_index: (2, E), edge_type: (E,) in ``[0, R)`` -> (N, hidden).
    """

    def __init__(self, config: OntologyGNNConfig):
        super().__init__()
        if config.num_relations < 1:
            raise ConfigError(
                f"gnn.num_relations must be >= 1 to build the GNN, got {config.num_relations}"
            )
        self.config = config
        d = config.hidden
        types = 2 * config.num_relations
        self.input = nn.Linear(config.in_dim, d)
        self.input_norm = nn.LayerNorm(d)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(config.layers))
        self.relation_embedding: nn.Embedding | None = None
        if config.conv == "gat":
            self.relation_embedding = nn.Embedding(types, d)
        for _ in range(config.layers):
            conv: nn.Module
            if config.conv == "rgcn":
                num_bases = config.num_bases
                if num_bases is not None and num_bases >= types:
                    num_bases = None  # more bases than types would only add parameters
                conv = FusedRGCNConv(d, d, num_relations=types, num_bases=num_bases)
            else:
                conv = GATv2Conv(
                    d,
                    d // config.heads,
                    heads=config.heads,
                    edge_dim=d,
                    add_self_loops=True,
                    fill_value="mean",
                )
            self.convs.append(conv)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.input.reset_parameters()
        self.input_norm.reset_parameters()
        for conv, norm in zip(self.convs, self.norms, strict=True):
            conv.reset_parameters()  # type: ignore[operator]
            norm.reset_parameters()  # type: ignore[operator]
        if self.relation_embedding is not None:
            nn.init.normal_(self.relation_embedding.weight, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        edge_index: torch.Tensor,
        edge_type: torch.Tensor,
        *,
        types_checked: bool = False,
    ) -> torch.Tensor:
        """Entity embeddings of every node.

        Args:
            types_checked: the caller has checked ``edge_type`` with
                :func:`check_edge_types` (a model passing its own graph buffer every step:
                the check reads the tensor, which on a GPU waits for all queued work).

        Shapes:
            x: (N, in_dim), edge_index: (2, E), edge_type: (E,) -> (N, hidden).
        """
        if x.dim() != 2 or x.shape[1] != self.config.in_dim:
            raise ValueError(f"x must have shape (N, {self.config.in_dim}), got {tuple(x.shape)}")
        r = self.config.num_relations
        if not types_checked:
            check_edge_types(edge_type, r)
        ei, et = add_reverse_edges(edge_index, edge_type, r)  # (2, 2E), (2E,)
        h = self.input_norm(self.input(x))  # (N, D)
        edge_attr = None
        if self.relation_embedding is not None:
            edge_attr = self.relation_embedding(et)  # (2E, D)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            # R-GCN reads the type; GATv2 reads the type's embedding.
            m = conv(h, ei, et) if edge_attr is None else conv(h, ei, edge_attr=edge_attr)
            h = norm(h + self.dropout(F.gelu(m)))
        return h


@dataclass(frozen=True)
class Neighbourhood:
    """A k-hop neighbourhood of some target concepts.

    Attributes:
        arrays: the restricted graph, nodes in the original (sorted id) order.
        nodes: (n,) int64 index of each restricted node in the original graph; index the
            full graph's feature matrix with it.
    """

    arrays: GraphArrays
    nodes: torch.Tensor


def k_hop_subgraph_for(targets: Sequence[str | int], arrays: GraphArrays, k: int) -> Neighbourhood:
    """The nodes within ``k`` hops of ``targets`` (edges followed either way) and their edges.

    Keeps a huge ontology (HPO, SNOMED) down to the part a model over a few dozen findings
    can use: with a ``k``-layer GNN, nodes farther than ``k`` hops cannot reach a target.

    Args:
        targets: concept ids or node indices of the findings.
        arrays: the whole graph.
        k: hops (>= 0); use the GNN's layer count.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    index = arrays.index()
    idx: list[int] = []
    missing: list[str] = []
    for t in targets:
        if isinstance(t, int):
            if not 0 <= t < arrays.num_nodes:
                raise ValueError(f"target index {t} out of range [0, {arrays.num_nodes})")
            idx.append(t)
        elif t in index:
            idx.append(index[t])
        else:
            missing.append(t)
    if missing:
        raise UnknownConceptError(missing)
    if not idx:
        raise ValueError("targets must not be empty")
    ei = torch.from_numpy(arrays.edge_index)
    both = torch.cat([ei, ei.flip(0)], 1)  # (2, 2E): hops follow edges either way
    subset, _, _, _ = k_hop_subgraph(
        torch.tensor(sorted(set(idx))), k, both, num_nodes=arrays.num_nodes
    )
    subset = subset.sort().values  # (n,)
    sub_ei, _, mask = subgraph(
        subset, ei, relabel_nodes=True, num_nodes=arrays.num_nodes, return_edge_mask=True
    )
    m = mask.numpy()
    keep = subset.tolist()
    restricted = GraphArrays(
        node_ids=[arrays.node_ids[i] for i in keep],
        node_texts=[arrays.node_texts[i] for i in keep],
        node_labels=[arrays.node_labels[i] for i in keep],
        relations=list(arrays.relations),  # same vocabulary: relation ids stay valid
        edge_index=np.ascontiguousarray(sub_ei.numpy()),
        edge_type=arrays.edge_type[m],
        edge_weight=arrays.edge_weight[m],
    )
    return Neighbourhood(arrays=restricted, nodes=subset)
