"""The named output of :class:`~models.model.KgdxModel`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KgdxOutput:
    """Scores and the attention an explanation is built from.

    ``B`` images, ``K`` findings asked (columns ``concept_ids``), ``P = rows * cols`` image
    patches, ``S = P + L`` fused tokens (``L`` clinical text tokens, 0 without text), ``N``
    entities (columns ``entity_ids``: every graph node, or the ``K`` label embeddings of the
    ``--no-kg`` ablation).

    Attributes:
        logits: (B, K) one logit per finding.
        probabilities: (B, K) ``sigmoid(logits)``.
        patch_attention: (B, K, P) each finding's last-layer attention over the image
            patches (heads averaged), summing to 1 per finding; reshape to
            ``(B, K, rows, cols)`` for a heat map.
        grid: (rows, cols) of the patch grid, row-major.
        entity_relevance: (B, K, N) finding -> token attention composed with token ->
            entity attention; each row sums to 1 over the entities. With
            ``entity_attribution``: each entity's share of the finding's positive
            attribution instead (rows sum to 1, or 0 when none is positive).
        concept_ids: the K concept ids of the columns of ``logits``.
        entity_ids: the N concept ids of the last axis of ``entity_relevance``.
        fusion_attention: (B, S, N) token -> entity attention, or ``None``.
        token_attention: (B, K, S) finding -> token attention over image and text tokens
            (zero at padded text), or ``None``.
        entity_attribution: (B, K, N) the logit each finding would lose, to first order,
            without each entity (:mod:`models.attribution`), or ``None`` when not computed.
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    patch_attention: torch.Tensor
    grid: tuple[int, int]
    entity_relevance: torch.Tensor
    concept_ids: list[str]
    entity_ids: list[str]
    fusion_attention: torch.Tensor | None = None
    token_attention: torch.Tensor | None = None
    entity_attribution: torch.Tensor | None = None

    def evidence_scores(self) -> torch.Tensor:
        """What evidence is ranked by: ``entity_attribution`` when computed, else
        ``entity_relevance``.

        Shapes:
            returns (B, K, N).
        """
        if self.entity_attribution is not None:
            return self.entity_attribution
        return self.entity_relevance

    def heatmaps(self) -> torch.Tensor:
        """``patch_attention`` on the patch grid.

        Shapes:
            returns (B, K, rows, cols).
        """
        b, k, _ = self.patch_attention.shape
        return self.patch_attention.reshape(b, k, *self.grid)  # (B, K, rows, cols)
