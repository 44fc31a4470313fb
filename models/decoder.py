"""Finding decoder: each target finding's entity embedding queries the fused tokens.

The disease-query design of KAD / MedKLIP, with the queries taken from the ontology GNN: a
finding is scored by a head shared by all findings, so any concept of the graph (one with no
training labels included) can be a query and get a logit (zero-shot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.attention import FeedForward, MultiHeadAttention
from models.errors import ConfigError

#: Where a loss on the heat map may send its gradient (``DecoderConfig.map_gradient``).
MAP_GRADIENTS = ("all", "projections", "fusion")


@dataclass
class DecoderConfig:
    """Shape of the finding decoder.

    Args:
        layers: decoder blocks (default 2).
        heads: attention heads (default 8; the model width must divide by it).
        ffn_mult: feed-forward width multiplier (default 4).
        dropout: dropout on attention weights and block outputs (default 0.1).
        self_attention: queries attend to each other before the tokens (default ``True``);
            lets co-occurring findings inform each other, at the price of a finding's score
            depending on which other findings are asked at the same time.
        target_bias: learn a query offset and a logit bias per trained target (default
            ``True``); concepts outside the targets (zero-shot) get zero bias.
        patch_pooling: also score every image patch against each finding and pool the
            patch scores by log-sum-exp (multiple-instance learning, as the ChestX-ray8
            localisation baseline; Wang et al., CVPR 2017): the pooled score is added to the
            finding's logit, and the pooling's softmax weights over the patches are the
            finding's heat map (default ``False``: the heat map is the decoder's
            cross-attention).
        pool_sharpness: ``r`` of the log-sum-exp pooling ``(1/r) log mean exp(r s)``: near
            0 it averages the patches, large it takes their maximum (default 5).
        global_logit: with ``patch_pooling``, also add the shared head's score of the
            decoded query to the logit (default ``True``). ``False`` scores a finding from its
            patch scores alone, as a class activation map does, and the attention relevance
            follows the pooling weights over the image tokens (with ``patch_query =
            "decoder"`` the query matched against the patches has itself read every token,
            clinical text included, so the map is not all the logit rests on).
        patch_query: with ``patch_pooling``, what is matched against each patch:
            ``"decoder"`` (default) the finding's decoded query, which has read the whole
            image (and the clinical text); ``"entity"`` the finding's own entity embedding,
            the same for every image, as a CAM's class weights are.
        map_gradient: with ``patch_pooling``, where a loss on the heat map (the box loss of
            :mod:`models.box_supervision`) sends its gradient: ``"all"`` (default) through
            the patch-scoring projections into the decoder, fusion and image encoder;
            ``"projections"`` to the patch-scoring projections only, and the output
            LayerNorm they share with the global head (in training the map is recomputed
            from detached queries and patches: the same values, so the logit and the map are
            unchanged, but the map cannot reshape the features the scores rest on);
            ``"fusion"`` to everything after the image encoder (token projection, fusion, GNN,
            decoder) but not into the CNN: :class:`~models.model.KgdxModel` recomputes the map
            in training from the detached feature map (a second fusion and decoder pass).
    """

    layers: int = 2  # decoder blocks
    heads: int = 8  # attention heads
    ffn_mult: int = 4  # feed-forward hidden width = ffn_mult * D
    dropout: float = 0.1  # attention and residual dropout
    self_attention: bool = True  # queries attend to each other in every block
    target_bias: bool = True  # learned per-target query offset and logit bias
    patch_pooling: bool = False  # per-patch finding scores, LSE-pooled; heat map = their weights
    pool_sharpness: float = 5.0  # r of the log-sum-exp pooling
    global_logit: bool = True  # with patch_pooling: add the decoded query's head score
    patch_query: str = "decoder"  # with patch_pooling: "decoder" | "entity"
    map_gradient: str = "all"  # with patch_pooling: "all" | "projections" | "fusion"

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"decoder.layers must be >= 1, got {self.layers}")
        if self.heads < 1 or self.ffn_mult < 1:
            raise ConfigError(
                f"decoder.heads and decoder.ffn_mult must be >= 1, got {self.heads}, "
                f"{self.ffn_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"decoder.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.pool_sharpness) and self.pool_sharpness > 0):
            raise ConfigError(
                f"decoder.pool_sharpness must be a finite number > 0, got {self.pool_sharpness}"
            )
        if self.patch_query not in ("decoder", "entity"):
            raise ConfigError(
                f"decoder.patch_query must be 'decoder' or 'entity', got {self.patch_query!r}"
            )
        if self.map_gradient not in MAP_GRADIENTS:
            raise ConfigError(
                f"decoder.map_gradient must be one of {', '.join(MAP_GRADIENTS)}, got "
                f"{self.map_gradient!r}"
            )
        if not self.patch_pooling and (not self.global_logit or self.patch_query != "decoder"):
            raise ConfigError(
                "decoder.global_logit = false and decoder.patch_query = 'entity' need "
                "decoder.patch_pooling = true"
            )


@dataclass
class DecoderOutput:
    """What :class:`FindingDecoder` returns.

    Attributes:
        logits: (B, K) one logit per query.
        token_attention: (B, K, S) last block's cross-attention over all fused tokens,
            heads averaged; zero at padded tokens.
        patch_attention: (B, K, P) ``token_attention`` over the first ``P`` (image) tokens,
            renormalised to sum to 1 per query; with ``patch_pooling``, the pooling's
            softmax weights over the patches instead.
        entity_relevance: (B, K, N) ``token_attention @ fusion_attention`` when the fusion
            attention was given (without ``global_logit``: ``patch_attention`` composed with
            the image tokens' fusion attention), else ``None``.
    """

    logits: torch.Tensor
    token_attention: torch.Tensor
    patch_attention: torch.Tensor
    entity_relevance: torch.Tensor | None


class DecoderBlock(nn.Module):
    r"""Pre-norm decoder block: optional self-attention, cross-attention, feed-forward.

    .. math::
        q \leftarrow q + \mathrm{SA}(\mathrm{LN}(q)),\quad
        q \leftarrow q + \mathrm{CA}(\mathrm{LN}(q), X),\quad
        q \leftarrow q + \mathrm{FFN}(\mathrm{LN}(q))

    Args:
        dim: model width ``D``.
        config: :class:`DecoderConfig`.

    Shapes:
        queries: (K, D) or (B, K, D); tokens: (B, S, D); token_mask: (B, S) bool, ``True``
        = padded -> queries (B, K, D), cross-attention (B, K, S).
    """

    def __init__(self, dim: int, config: DecoderConfig):
        super().__init__()
        self.self_attn: MultiHeadAttention | None = None
        self.norm_sa: nn.LayerNorm | None = None
        if config.self_attention:
            self.norm_sa = nn.LayerNorm(dim)
            self.self_attn = MultiHeadAttention(dim, config.heads, config.dropout)
        self.norm_ca = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, config.heads, config.dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, config.ffn_mult, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None and self.norm_sa is not None:
            x = self.norm_sa(queries)
            queries = queries + self.dropout(self.self_attn(x, x)[0])  # (K, D) or (B, K, D)
        a, w = self.cross_attn(self.norm_ca(queries), self.norm_tokens(tokens), token_mask)
        queries = queries + self.dropout(a)  # (B, K, D)
        queries = queries + self.dropout(self.ffn(self.norm_ff(queries)))
        return queries, w


class FindingDecoder(nn.Module):
    """Per-finding queries over fused tokens, scored by one shared head.

    Args:
        dim: model width ``D``.
        config: :class:`DecoderConfig` (default ``DecoderConfig()``).

    Shapes:
        queries: (K, D) entity embeddings of the findings (plus any per-target offset),
        tokens: (B, S, D) fused tokens, the first ``num_image_tokens`` = P of them image
        patches; token_mask: (B, S) bool, ``True`` = padded text token; logit_bias: (K,);
        fusion_attention: (B, S, N). See :class:`DecoderOutput` for what comes back.
    """

    def __init__(self, dim: int, config: DecoderConfig | None = None):
        super().__init__()
        self.config = config or DecoderConfig()
        if dim % self.config.heads:
            raise ConfigError(f"dim={dim} must be divisible by decoder.heads={self.config.heads}")
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, self.config) for _ in range(self.config.layers)
        )
        self.norm = nn.LayerNorm(dim)
        # Shared by every finding: the property that makes zero-shot scoring possible.
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.patch_query: nn.Linear | None = None
        self.patch_key: nn.Linear | None = None
        self.patch_norm: nn.LayerNorm | None = None
        if self.config.patch_pooling:  # also shared by every finding
            self.patch_query = nn.Linear(dim, dim)
            self.patch_key = nn.Linear(dim, dim)
            self.patch_norm = nn.LayerNorm(dim)

    def forward(
        self,
        queries: torch.Tensor,
        tokens: torch.Tensor,
        num_image_tokens: int,
        token_mask: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
        fusion_attention: torch.Tensor | None = None,
    ) -> DecoderOutput:
        if not 0 < num_image_tokens <= tokens.shape[1]:
            raise ValueError(
                f"num_image_tokens must be in (0, {tokens.shape[1]}], got {num_image_tokens}"
            )
        h = queries
        attn: torch.Tensor | None = None
        for block in self.blocks:
            h, attn = block(h, tokens, token_mask)  # (B, K, D), (B, K, S)
        assert attn is not None
        if h.dim() == 2:  # pragma: no cover - blocks always return batched queries
            h = h.unsqueeze(0)
        h = h.expand(tokens.shape[0], -1, -1)  # (B, K, D)
        attn = attn.expand(tokens.shape[0], -1, -1)  # (B, K, S)
        cfg = self.config
        logits = (  # (B, K)
            self.head(self.norm(h)).squeeze(-1) if cfg.global_logit else h.new_zeros(h.shape[:2])
        )
        if logit_bias is not None:
            logits = logits + logit_bias
        if self.patch_query is not None:
            q = h if cfg.patch_query == "decoder" else queries.expand_as(h)
            pooled, patch = self._pool_patches(q, tokens[:, :num_image_tokens])
            logits = logits + pooled
        else:
            patch = attn[..., :num_image_tokens]  # (B, K, P)
            patch = patch / patch.sum(-1, keepdim=True).clamp_min(1e-12)
        relevance = None
        if fusion_attention is not None:
            if cfg.global_logit:
                relevance = attn @ fusion_attention  # (B, K, S) @ (B, S, N) -> (B, K, N)
            else:  # the logit rests on the patches alone: weigh their knowledge by the pooling
                relevance = patch @ fusion_attention[:, :num_image_tokens]
        return DecoderOutput(logits, attn, patch, relevance)

    def _pool_patches(
        self, h: torch.Tensor, patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch finding scores pooled by log-sum-exp.

        Shapes: h (B, K, D), patches (B, P, D) -> pooled (B, K), weights (B, K, P).
        """
        assert self.patch_query is not None and self.patch_key is not None
        assert self.patch_norm is not None
        scores = self._patch_scores(h, patches)  # (B, K, P)
        r = self.config.pool_sharpness
        pooled = (torch.logsumexp(r * scores, dim=-1) - math.log(scores.shape[-1])) / r
        if self.config.map_gradient == "projections" and self.training and torch.is_grad_enabled():
            # the same scores from detached inputs: a loss on the map trains the projections
            scores = self._patch_scores(h.detach(), patches.detach())
        return pooled, torch.softmax(r * scores, dim=-1)

    def _patch_scores(self, h: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Scaled dot products of the projected queries and patches: (B, K, P)."""
        assert self.patch_query is not None and self.patch_key is not None
        assert self.patch_norm is not None
        q = self.patch_query(self.norm(h))  # (B, K, D)
        k = self.patch_key(self.patch_norm(patches))  # (B, P, D)
        return q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
