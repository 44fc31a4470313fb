"""Multi-head attention that returns its weights and lets keys be shared by the batch.

``torch.nn.MultiheadAttention`` needs keys per sample, so attending from ``B`` images to the
same ``N`` ontology entities would project the ``N`` keys ``B`` times; here keys and values of
shape ``(S, D)`` are projected once and broadcast. The weights (before dropout, averaged
over heads) come back for explanations.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    r"""Scaled dot-product attention (Vaswani et al. 2017) with ``heads`` heads.

    .. math::
        \mathrm{head}_h = \mathrm{softmax}\Big(\frac{(Q W^Q_h)(K W^K_h)^\top}{\sqrt{d}}
        + M\Big) V W^V_h, \qquad \mathrm{out} = [\mathrm{head}_1; \dots] W^O

    with ``M = -inf`` at masked keys. A query whose keys are all masked gets zero weights and
    a zero output (not NaN).

    Args:
        dim: model width ``D``.
        heads: number of heads (default 8); ``dim`` must divide by it.
        dropout: dropout on the attention weights (default 0.0).
        top_k: keep only each query's ``top_k`` highest-scoring keys per head (the rest get
            zero weight, as if masked); ``None`` (default) keeps all.

    Shapes:
        query: (B, T, D) or (T, D); key_value: (B, S, D) or (S, D), shared by the batch when
        2-D; key_padding_mask: (B, S) or (S,) bool, ``True`` = ignore that key; key_bias:
        (B, S) or (S,) float added to every head's scores for that key (0 leaves it as it
        is; its gradient measures what each key adds, see :mod:`models.attribution`).
        Returns out (B, T, D) (or (T, D) when both inputs are 2-D) and weights
        (B, T, S) averaged over heads (``(1, T, S)`` when both are 2-D).
    """

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.0, top_k: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        self.top_k = top_k
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0)  # (1, S, D): broadcast over the batch in matmul
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (b, h, S, d)

    def forward(
        self,
        query: torch.Tensor,
        key_value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``query`` to ``key_value``; see the class docstring for shapes."""
        unbatched = query.dim() == 2 and key_value.dim() == 2
        q = self._split(self.q(query))  # (Bq, h, T, d)
        k = self._split(self.k(key_value))  # (Bk, h, S, d)
        v = self._split(self.v(key_value))  # (Bk, h, S, d)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, h, T, S)
        if key_bias is not None:
            bias = key_bias.to(scores.dtype)
            scores = scores + (
                bias.view(1, 1, 1, -1) if bias.dim() == 1 else bias[:, None, None, :]
            )
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask.bool()
            mask = mask.view(1, 1, 1, -1) if mask.dim() == 1 else mask[:, None, None, :]
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]  # (B, h, T, 1)
            low = scores < kth  # ties with the k-th score stay
            scores = scores.masked_fill(low, torch.finfo(scores.dtype).min)
            mask = low if mask is None else mask | low
        attn = scores.softmax(-1)  # (B, h, T, S)
        if mask is not None:
            # finfo.min instead of -inf keeps all-masked rows finite; zero them here.
            attn = attn.masked_fill(mask, 0.0)
        out = self.dropout(attn) @ v  # (B, h, T, d)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, self.dim)  # (B, T, D)
        out = self.out(out)
        weights = attn.mean(1)  # (B, T, S)
        if unbatched:
            out = out.squeeze(0)  # (T, D)
        return out, weights


class FeedForward(nn.Module):
    """Position-wise MLP ``Linear(D, mult*D) -> GELU -> Dropout -> Linear(mult*D, D)``.

    Args:
        dim: model width ``D``.
        mult: hidden width multiplier (default 4).
        dropout: dropout after the activation (default 0.0).

    Shapes:
        x: (..., D) -> (..., D).
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
