"""Masked BCE against a reference loop, positive weights, and the contrastive loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.losses import MAX_POS_WEIGHT, auto_pos_weight, contrastive_loss, masked_bce


def reference_bce(logits, labels, mask, pos_weight=None) -> float:
    """Mean of the per-label BCE over the known labels, one element at a time."""
    total, count = 0.0, 0
    b, k = logits.shape
    for i in range(b):
        for j in range(k):
            if mask[i, j] == 0:
                continue
            p = 1 / (1 + math.exp(-float(logits[i, j])))
            w = 1.0 if pos_weight is None else float(pos_weight[j])
            y = float(labels[i, j])
            total += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / max(count, 1)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    labels = (torch.rand(6, 4, generator=g) < 0.4).float()
    mask = (torch.rand(6, 4, generator=g) < 0.7).float()
    mask[0] = 1.0
    return logits, labels, mask


@pytest.mark.parametrize("weighted", [False, True])
def test_masked_bce_matches_reference(batch, weighted: bool) -> None:
    logits, labels, mask = batch
    pw = torch.tensor([1.0, 2.0, 0.5, 4.0]) if weighted else None
    got = float(masked_bce(logits, labels, mask, pw))
    assert got == pytest.approx(reference_bce(logits, labels, mask, pw), rel=1e-5)


def test_unknown_labels_give_no_loss_and_no_gradient(batch) -> None:
    logits, labels, mask = batch
    logits = logits.clone().requires_grad_(True)
    base = masked_bce(logits, labels, mask)
    base.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[mask == 0] == 0)
    # whatever an unknown label holds, the loss is the same
    flipped = torch.where(mask == 0, 1 - labels, labels)
    assert float(masked_bce(logits, flipped, mask).detach()) == pytest.approx(float(base.detach()))


def test_all_unknown_is_zero_not_nan() -> None:
    logits = torch.randn(3, 2, requires_grad=True)
    loss = masked_bce(logits, torch.ones(3, 2), torch.zeros(3, 2))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        masked_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2))


def test_auto_pos_weight() -> None:
    labels = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 1]], dtype=np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=np.float32)
    w = auto_pos_weight(labels, mask)
    # col 0: 1 pos, 2 neg (row 3 unknown) -> 2; col 1: no positive -> 1; col 2: 2 pos, 1 neg
    assert w.tolist() == pytest.approx([2.0, 1.0, 1.0])
    rare = np.zeros((100, 1), dtype=np.float32)
    rare[0] = 1
    assert float(auto_pos_weight(rare, np.ones_like(rare))[0]) == MAX_POS_WEIGHT


def test_contrastive_matches_clip_reference() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / 0.1
    target = torch.arange(5)
    want = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    got = contrastive_loss(img, txt, temperature=0.1)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # distinct groups are the same as no groups
    same = contrastive_loss(img, txt, torch.arange(5), temperature=0.1)
    assert float(same) == pytest.approx(float(want), rel=1e-5)


def test_contrastive_identical_reports_are_shared_positives() -> None:
    g = torch.Generator().manual_seed(0)
    txt = torch.randn(1, 8, generator=g).repeat(4, 1)  # four copies of one report
    img = torch.randn(4, 8, generator=g)
    loss = contrastive_loss(img, txt, torch.zeros(4, dtype=torch.long), temperature=0.1)
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / 0.1
    uniform = torch.full((4, 4), 0.25)  # every pair is a positive
    want = (
        -(uniform * F.log_softmax(logits, 1)).sum(1).mean()
        - (uniform * F.log_softmax(logits.T, 1)).sum(1).mean()
    ) / 2
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    # images -> reports: all logits of a row are equal, so that half is exactly log(4)
    assert float(-(uniform * F.log_softmax(logits, 1)).sum(1).mean()) == pytest.approx(
        math.log(4), rel=1e-5
    )
    assert float(contrastive_loss(img[:1], txt[:1])) == 0.0
