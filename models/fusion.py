"""Knowledge fusion: image (and text) tokens cross-attend to ontology entity embeddings.

After fusion every token carries what the ontology says about the concepts it resembles;
the token -> entity attention is kept, since composed with a finding's attention over the
tokens it ranks the concepts that informed the finding (the ``evidence`` of an explanation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import FeedForward, MultiHeadAttention
from models.errors import ConfigError


@dataclass
class FusionConfig:
    """Shape of the knowledge fusion.

    Args:
        layers: fusion blocks (default 1).
        heads: attention heads (default 8; the model width must divide by it).
        ffn_mult: feed-forward width multiplier (default 4).
        dropout: dropout on attention weights and block outputs (default 0.1).
        top_k: each token attends to at most its ``top_k`` best-matching entities per head
            (sparse fusion: a finding then rests on a few concepts, not a haze over the
            whole graph); ``0`` (default) attends to all. Entities outside a token's top
            ``k`` get zero attribution (:mod:`models.attribution`), though removing one
            inside it lets the next one in, which the first-order estimate does not see.
    """

    layers: int = 1  # cross-attention blocks
    heads: int = 8  # attention heads
    ffn_mult: int = 4  # feed-forward hidden width = ffn_mult * D
    dropout: float = 0.1  # attention and residual dropout
    top_k: int = 0  # entities each token attends to per head; 0 = all

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"fusion.layers must be >= 1, got {self.layers}")
        if self.top_k < 0:
            raise ConfigError(f"fusion.top_k must be >= 0 (0 = all entities), got {self.top_k}")
        if self.heads < 1 or self.ffn_mult < 1:
            raise ConfigError(
                f"fusion.heads and fusion.ffn_mult must be >= 1, got {self.heads}, {self.ffn_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"fusion.dropout must be in [0, 1), got {self.dropout}")


class FusionBlock(nn.Module):
    r"""One pre-norm cross-attention block, tokens -> entities.

    .. math::
        x \leftarrow x + \mathrm{Drop}(\mathrm{MHA}(\mathrm{LN}(x), \mathrm{LN}_e(E))),
        \qquad x \leftarrow x + \mathrm{Drop}(\mathrm{FFN}(\mathrm{LN}(x)))

    Args:
        dim: model width ``D``.
        config: :class:`FusionConfig`.

    Shapes:
        tokens: (B, S, D), entities: (N, D) or (B, N, D), entity_mask: (N,) or (B, N) bool
        (``True`` = masked), entity_bias: (N,) or (B, N) float added to the attention scores
        -> tokens (B, S, D), weights (B, S, N).
    """

    def __init__(self, dim: int, config: FusionConfig):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_e = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, config.heads, config.dropout, config.top_k or None)
        self.norm_ff = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, config.ffn_mult, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        entities: torch.Tensor,
        entity_mask: torch.Tensor | None = None,
        entity_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, w = self.attn(self.norm_q(tokens), self.norm_e(entities), entity_mask, entity_bias)
        tokens = tokens + self.dropout(a)  # (B, S, D)
        tokens = tokens + self.dropout(self.ffn(self.norm_ff(tokens)))  # (B, S, D)
        return tokens, w


class KnowledgeFusion(nn.Module):
    """A stack of :class:`FusionBlock` s and a final LayerNorm.

    Image and text tokens ``[V; T]`` attend to the entity embeddings ``E`` (a residual
    update: tokens keep their own content and gain knowledge). The returned attention is
    the heads-averaged weight of each token over the entities, averaged over blocks.

    Args:
        dim: model width ``D``.
        config: :class:`FusionConfig` (default ``FusionConfig()``).

    Shapes:
        tokens: (B, S, D) with ``S = P + L``; entities: (N, D) shared by the batch (or
        (B, N, D)); entity_mask: (N,) or (B, N) bool, ``True`` = entity hidden from the
        tokens (used to measure faithfulness); entity_bias: (N,) or (B, N) float added to
        every block's attention scores for each entity (its gradient attributes a finding to
        the entities, see :mod:`models.attribution`). Returns fused tokens (B, S, D) and attention
        (B, S, N), each row summing to 1 over the unmasked entities.
    """

    def __init__(self, dim: int, config: FusionConfig | None = None):
        super().__init__()
        self.config = config or FusionConfig()
        if dim % self.config.heads:
            raise ConfigError(f"dim={dim} must be divisible by fusion.heads={self.config.heads}")
        self.blocks = nn.ModuleList(
            FusionBlock(dim, self.config) for _ in range(self.config.layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        tokens: torch.Tensor,
        entities: torch.Tensor,
        entity_mask: torch.Tensor | None = None,
        entity_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 3 or tokens.shape[-1] != entities.shape[-1]:
            raise ValueError(
                f"tokens must be (B, S, D) and entities (N, D) with the same D, got "
                f"{tuple(tokens.shape)} and {tuple(entities.shape)}"
            )
        total: torch.Tensor | None = None
        for block in self.blocks:
            tokens, w = block(tokens, entities, entity_mask, entity_bias)  # (B,S,D), (B,S,N)
            total = w if total is None else total + w
        assert total is not None
        return self.norm(tokens), total / len(self.blocks)
