"""Training losses: masked multi-label BCE and the image-report contrastive loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Upper bound of the automatic positive-class weight (rare findings such as Hernia would
#: otherwise get weights in the hundreds and dominate the gradient).
MAX_POS_WEIGHT = 10.0


def masked_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy averaged over the known labels only.

    ``loss = sum(mask * bce(logits, labels)) / max(sum(mask), 1)``, so an UNKNOWN label
    (``mask = 0``, e.g. the 13 unlabelled findings of a pneumonia-only row) contributes
    neither loss nor gradient, and a batch with no known label gives 0.

    Args:
        logits: (B, K) raw scores.
        labels: (B, K) 0/1 targets (their value is ignored where ``mask`` is 0).
        mask: (B, K) 1 where the label is known, 0 where unknown.
        pos_weight: optional (K,) weight of the positive term per finding (see
            :func:`auto_pos_weight`).

    Shapes:
        returns a scalar tensor.
    """
    if logits.shape != labels.shape or labels.shape != mask.shape:
        raise ValueError(
            f"logits, labels and mask must have one shape, got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.to(logits.dtype)
    per = F.binary_cross_entropy_with_logits(
        logits, labels.to(logits.dtype), pos_weight=pos_weight, reduction="none"
    )  # (B, K)
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def auto_pos_weight(
    labels: np.ndarray, mask: np.ndarray, max_weight: float = MAX_POS_WEIGHT
) -> torch.Tensor:
    """Per-finding ``negatives / positives`` among the known labels, clipped to
    ``[1, max_weight]`` (1 where a finding has no known positive).

    Shapes:
        labels, mask: (N, K) -> (K,) float32.
    """
    known = np.asarray(mask) > 0
    y = np.asarray(labels) > 0
    pos = (y & known).sum(axis=0).astype(np.float64)
    neg = (~y & known).sum(axis=0).astype(np.float64)
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1.0), 1.0)
    return torch.from_numpy(np.clip(ratio, 1.0, max_weight).astype(np.float32))


def contrastive_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    groups: torch.Tensor | None = None,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Symmetric InfoNCE between images and their reports (CLIP, Radford et al. 2021).

    ``logits = normalize(I) @ normalize(T).T / temperature``; each image's target is its own
    report, averaged cross-entropy over images -> reports and reports -> images. Rows with
    the same ``groups`` id (identical report texts, e.g. two "No acute findings") are all
    positives of each other, so the loss does not push apart images whose reports agree.

    Args:
        image_emb: (B, D) image embeddings.
        text_emb: (B, D) report embeddings.
        groups: optional (B,) integer id of each report's text.
        temperature: softmax temperature (default 0.07).

    Shapes:
        returns a scalar tensor (0 when B < 2: no negatives).
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(
            f"image_emb and text_emb must both be (B, D), got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}"
        )
    b = image_emb.shape[0]
    if b < 2:
        return image_emb.sum() * 0.0
    i = F.normalize(image_emb.float(), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    logits = i @ t.T / temperature  # (B, B)
    if groups is None:
        same = torch.eye(b, device=logits.device)
    else:
        same = (groups.view(-1, 1) == groups.view(1, -1)).to(logits.dtype)  # (B, B)
    target = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    loss_i = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2
