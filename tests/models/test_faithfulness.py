"""The deletion test: masks, mechanics, a model built so the outcome is known, the summary."""

from __future__ import annotations

import dataclasses
from typing import cast

import numpy as np
import pytest
import torch

from kg.tensors import GraphArrays
from models.explain import rank_evidence
from models.faithfulness import (
    DeletionConfig,
    DeletionRecord,
    deletion_test,
    positive_pairs,
    random_masks,
    summarise_deletion,
)
from models.fusion import FusionBlock
from models.model import KgdxModel
from tests.models.conftest import tiny_config
from tests.models.tiny_checkpoint import tiny_model


def test_random_masks_are_reproducible_and_exclude_the_finding() -> None:
    a = random_masks(10, own=3, k=4, draws=6, seed=7, image=12, finding=1)
    assert a == random_masks(10, own=3, k=4, draws=6, seed=7, image=12, finding=1)
    assert len(a) == 6
    for draw in a:
        assert len(draw) == len(set(draw)) == 4 and 3 not in draw
        assert all(0 <= e < 10 for e in draw)
    assert a != random_masks(10, own=3, k=4, draws=6, seed=8, image=12, finding=1)
    assert a != random_masks(10, own=3, k=4, draws=6, seed=7, image=13, finding=1)
    # k larger than the pool: every other entity
    assert random_masks(4, own=0, k=9, draws=2, seed=0, image=0, finding=0) == [[1, 2, 3]] * 2


def test_positive_pairs() -> None:
    probs = np.array([[0.9, 0.2], [0.4, 0.7]])
    labels = np.array([[1, 1], [0, 1]])
    mask = np.array([[1, 0], [1, 1]])
    assert positive_pairs(probs, labels, mask) == [(0, 0), (1, 1)]
    assert positive_pairs(probs, labels) == [(0, 0), (0, 1), (1, 1)]
    assert positive_pairs(torch.tensor(probs)) == [(0, 0), (1, 1)]
    assert positive_pairs(probs, thresholds=[0.3, 0.8]) == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match="labels and mask"):
        positive_pairs(probs, labels[:1])


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="k must be"):
        DeletionConfig(k=0)
    with pytest.raises(ValueError, match="min_drop"):
        DeletionConfig(min_drop=0.0)


def test_mechanics_match_direct_masked_forwards(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = tiny_model(arrays, features)
    model.cache_entities()
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = model(images)
    pairs = [(0, 0), (2, 1), (1, 2)]
    config = DeletionConfig(k=2, random_draws=3, seed=5, batch_size=4)
    records = deletion_test(model, images, out, pairs, config, image_keys=[10, 11, 12])
    assert [(r.image, r.finding) for r in records] == [(10, 0), (12, 1), (11, 2)]
    own = model.concept_indices(model.config.targets)
    n = arrays.num_nodes
    for (i, c), r in zip(pairs, records, strict=True):
        expected = rank_evidence(out.entity_relevance[i, c], 2, exclude=[own[c]])[0].tolist()
        assert r.evidence == expected and own[c] not in r.evidence
        assert r.probability == pytest.approx(float(out.probabilities[i, c]), abs=1e-6)
        draws = random_masks(n, own[c], 2, 3, 5, 10 + i, c)
        checks = [(r.evidence, r.evidence_drop), *zip(draws, r.random_drops, strict=True)]
        for masked, drop in checks:
            mask = torch.zeros(n, dtype=torch.bool)
            mask[masked] = True
            with torch.no_grad():
                p = model(images[i : i + 1], entity_mask=mask).probabilities[0, c]
            assert drop == pytest.approx(r.probability - float(p), abs=1e-5)
    # the same pair gives the same record whatever else is in the batch
    alone = deletion_test(model, images, out, [(2, 1)], config, image_keys=[10, 11, 12])
    assert alone[0] == records[1]
    assert deletion_test(model, images, out, [], config) == []


def test_masking_every_other_entity_changes_the_output(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = tiny_model(arrays, features)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(images)
    config = DeletionConfig(k=arrays.num_nodes, random_draws=2)
    records = deletion_test(model, images, out, [(0, 0), (1, 2)], config)
    for r in records:
        assert len(r.evidence) == arrays.num_nodes - 1  # all but the finding's own concept
        assert abs(r.evidence_drop) > 1e-4
        # the random draws of all other entities are the evidence set itself
        assert r.random_drops == pytest.approx([r.evidence_drop] * 2, abs=1e-6)


def test_refuses_bad_arguments(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = tiny_model(arrays, features)
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(images)
        partial = model(images, targets=[0])
    with pytest.raises(ValueError, match="outside the batch"):
        deletion_test(model, images, out, [(2, 0)])
    with pytest.raises(ValueError, match="all of the model's targets"):
        deletion_test(model, images, partial, [(0, 0)])
    with pytest.raises(ValueError, match="batch has 1 images"):
        deletion_test(model, images[:1], out, [(0, 0)])


def _one_concept_model(arrays: GraphArrays, features: torch.Tensor, hot: int) -> KgdxModel:
    """A model whose knowledge fusion attends to entity ``hot`` alone.

    Single-head fusion with every token asking the same query ``alpha * LN(E[hot])`` and
    keys ``LN(E)``: by Cauchy-Schwarz the score is highest at ``hot`` by a wide margin, so
    ``hot`` gets nearly all the attention and the relevance; masking it replaces what the
    tokens read, masking any other entity changes nearly nothing.
    """
    config = tiny_config()
    config = dataclasses.replace(config, fusion=dataclasses.replace(config.fusion, heads=1))
    model = tiny_model(arrays, features, config=config)
    entities = model.cache_entities()
    block = cast(FusionBlock, model.fusion.blocks[0])
    with torch.no_grad():
        target = block.norm_e(entities)[hot]  # (D,)
        block.attn.q.weight.zero_()
        block.attn.q.bias.copy_(8.0 * target / target.norm() * target.numel() ** 0.5)
        block.attn.k.weight.copy_(torch.eye(target.numel()))
        block.attn.k.bias.zero_()
    return model


def test_known_outcome_evidence_beats_random(arrays: GraphArrays, features: torch.Tensor) -> None:
    hot = arrays.index()["X:pleura"]  # not a target: the evidence of every finding
    model = _one_concept_model(arrays, features, hot)
    images = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        out = model(images)
    assert out.fusion_attention is not None
    assert float(out.fusion_attention[..., hot].min()) > 0.99
    pairs = [(i, c) for i in range(4) for c in range(3)]
    config = DeletionConfig(k=1, random_draws=8, seed=0, n_boot=200)
    records = deletion_test(model, images, out, pairs, config)
    assert all(r.evidence == [hot] for r in records)
    # the drop's sign depends on the random head; flip the logit to make it a drop
    if np.mean([r.evidence_drop for r in records]) < 0:
        with torch.no_grad():
            last = cast(torch.nn.Linear, model.decoder.head[-1])
            last.weight.neg_()
            last.bias.neg_()
            assert model.logit_bias is not None
            model.logit_bias.neg_()
        with torch.no_grad():
            out = model(images)
        records = deletion_test(model, images, out, pairs, config)
    ev = np.array([r.evidence_drop for r in records])
    assert ev.mean() > 0.005
    for r in records:
        # a random draw either hits `hot` (then it is the evidence drop) or changes ~nothing
        for d in r.random_drops:
            assert d == pytest.approx(r.evidence_drop, abs=1e-5) or abs(d) < 1e-4
    report = summarise_deletion(records, ["Consolidation", "Effusion", "Opacity"], config)
    overall = report["overall"]
    # 1 of the 5 other entities is `hot`: random masks hit it about a fifth of the time
    assert overall["ratio"] > 2.5
    assert overall["ratio_ci"][0] <= overall["ratio"] <= overall["ratio_ci"][1]
    assert overall["evidence_beats_random"] > 0.5
    assert set(report["per_finding"]) == {"Consolidation", "Effusion", "Opacity"}


def _record(finding: int, ev: float, rand: list[float], image: int = 0) -> DeletionRecord:
    return DeletionRecord(image, finding, 0.8, [1], ev, rand)


def test_summary_values_floor_and_empty() -> None:
    records = [
        _record(0, 0.30, [0.05, 0.15], 0),
        _record(0, 0.10, [0.10, 0.10], 1),
        _record(1, 0.20, [0.0, 0.0], 2),
    ]
    config = DeletionConfig(n_boot=300, min_drop=0.01)
    report = summarise_deletion(records, ["A", "B", "C"], config)
    a = report["per_finding"]["A"]
    assert a["n_pairs"] == 2
    assert a["evidence_drop"] == pytest.approx(0.2) and a["random_drop"] == pytest.approx(0.1)
    assert a["ratio"] == pytest.approx(2.0) and not a["random_floored"]
    assert a["evidence_beats_random"] == pytest.approx(0.5)  # 0.10 vs 0.10 is no win
    b = report["per_finding"]["B"]
    assert b["ratio"] == pytest.approx(20.0) and b["random_floored"]
    assert b["ratio_ci"] == [None, None]  # one pair: no interval
    assert "C" not in report["per_finding"]
    overall = report["overall"]
    assert overall["ratio"] == pytest.approx(0.2 / (0.2 / 3))
    lo, hi = overall["ratio_ci"]
    assert lo is not None and hi is not None and lo <= overall["ratio"] <= hi
    assert report["k"] == 5 and report["min_drop"] == 0.01
    assert records[0].ratio(0.01) == pytest.approx(3.0)
    assert records[0].to_dict(["a", "b"])["evidence"] == ["b"]
    empty = summarise_deletion([], ["A"], config)
    assert empty["overall"]["n_pairs"] == 0 and empty["overall"]["ratio"] is None
    assert empty["per_finding"] == {}
