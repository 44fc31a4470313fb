from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kg.tensors import GraphArrays
from models.errors import ConfigError, ModelError, UnknownConceptError
from models.model import KgdxModel
from tests.models.conftest import TARGETS, tiny_config


def _model(arrays: GraphArrays, features: torch.Tensor, **kw: object) -> KgdxModel:
    return KgdxModel(tiny_config(**kw), arrays, features).eval()  # type: ignore[arg-type]


def _images(b: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 1, size, size)


@pytest.mark.parametrize("conv", ["rgcn", "gat"])
def test_output_shapes_and_attention(
    arrays: GraphArrays, features: torch.Tensor, conv: str
) -> None:
    model = _model(arrays, features, conv=conv)
    out = model(_images())
    k, n = len(TARGETS), arrays.num_nodes
    assert out.logits.shape == (2, k)
    torch.testing.assert_close(out.probabilities, torch.sigmoid(out.logits))
    assert out.grid == (4, 4)
    assert out.patch_attention.shape == (2, k, 16)
    assert out.heatmaps().shape == (2, k, 4, 4)
    assert out.entity_relevance.shape == (2, k, n)
    assert out.fusion_attention is not None and out.fusion_attention.shape == (2, 16, n)
    torch.testing.assert_close(out.patch_attention.sum(-1), torch.ones(2, k))
    torch.testing.assert_close(out.entity_relevance.sum(-1), torch.ones(2, k))
    torch.testing.assert_close(out.fusion_attention.sum(-1), torch.ones(2, 16))
    assert out.concept_ids == TARGETS
    assert out.entity_ids == arrays.node_ids


@pytest.mark.parametrize("backbone", ["densenet121", "resnet18"])
def test_real_backbones(arrays: GraphArrays, features: torch.Tensor, backbone: str) -> None:
    model = KgdxModel(tiny_config(backbone, 64), arrays, features).eval()
    out = model(_images(1, 64))
    assert out.logits.shape == (1, 3) and out.grid == (2, 2)


def test_padded_text_is_masked(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = _model(arrays, features)
    images = _images()
    text = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(images, text, mask)
    s = 16 + 5
    assert out.token_attention is not None and out.token_attention.shape == (2, 3, s)
    assert (out.token_attention[0, :, 16 + 3 :] == 0).all()
    assert out.fusion_attention is not None and (out.fusion_attention[0, 16 + 3 :] == 0).all()
    torch.testing.assert_close(out.patch_attention.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out.entity_relevance.sum(-1), torch.ones(2, 3))
    # whatever sits in the padding changes nothing
    text2 = text.clone()
    text2[0, 3:] = 50.0
    out2 = model(images, text2, mask)
    torch.testing.assert_close(out2.logits, out.logits)
    # and real text does change the result
    assert not torch.allclose(model(images).logits, out.logits)


def test_ablation_has_no_gnn_and_runs(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = KgdxModel(tiny_config(use_kg=False), arrays).eval()
    assert model.gnn is None
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("gnn.") for n in names)
    assert "label_embeddings" in names
    out = model(_images())
    assert out.logits.shape == (2, 3)
    assert out.entity_relevance.shape == (2, 3, 3)  # entities = the label embeddings
    assert out.entity_ids == TARGETS
    # identical everywhere else: same parameter names outside the entity source
    full = KgdxModel(tiny_config(), arrays, features)
    rest = {n for n, _ in full.named_parameters() if not n.startswith("gnn.")}
    assert rest == set(names) - {"label_embeddings"}
    # no graph needed at all
    assert KgdxModel(tiny_config(use_kg=False))(_images()).logits.shape == (2, 3)
    with pytest.raises(ModelError, match="no-kg"):
        model.score_concepts(_images(), [0])


def test_zero_shot_scoring(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = _model(arrays, features)
    idx = model.concept_indices(["X:pneumonia"])
    assert "X:pneumonia" not in TARGETS
    out = model.score_concepts(_images(), idx)
    assert out.logits.shape == (2, 1) and torch.isfinite(out.logits).all()
    assert out.concept_ids == ["X:pneumonia"]
    assert out.entity_relevance.shape == (2, 1, arrays.num_nodes)
    # scoring the targets through score_concepts equals forward
    images = _images()
    torch.testing.assert_close(
        model.score_concepts(images, model.concept_indices(TARGETS)).logits, model(images).logits
    )
    with pytest.raises(UnknownConceptError, match="X:nope"):
        model.concept_indices(["X:nope"])


def test_target_bias_only_for_targets(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = _model(arrays, features)
    images = _images()
    before_target = model(images, targets=[0]).logits
    before_zero_shot = model.score_concepts(images, model.concept_indices(["X:pneumonia"])).logits
    assert model.logit_bias is not None
    with torch.no_grad():
        model.logit_bias.fill_(3.0)
    torch.testing.assert_close(model(images, targets=[0]).logits, before_target + 3.0)
    after = model.score_concepts(images, model.concept_indices(["X:pneumonia"])).logits
    torch.testing.assert_close(after, before_zero_shot)


def test_subset_of_targets(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = _model(arrays, features)
    out = model(_images(), targets=[2, 0])
    assert out.concept_ids == [TARGETS[2], TARGETS[0]]
    with pytest.raises(ValueError, match="targets"):
        model(_images(), targets=[3])


def test_entities_computed_once_and_cached(
    arrays: GraphArrays, features: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(arrays, features)
    assert model.gnn is not None
    calls = 0
    original = model.gnn.forward

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model.gnn, "forward", counted)
    images = _images(8)
    fresh = model(images)
    assert calls == 1  # once for the batch of 8, not per sample
    model.cache_entities()
    assert calls == 2
    cached = model(images)
    model(images)
    assert calls == 2
    torch.testing.assert_close(cached.logits, fresh.logits)
    model.train()
    model(images)
    assert calls == 3  # training clears the cache


def test_gradients_reach_every_part(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = KgdxModel(tiny_config(), arrays, features).train()
    out = model(_images(), torch.randn(2, 4, 24))
    out.logits.sum().backward()
    for name in (
        "gnn.input.weight",
        "image_encoder.proj.weight",
        "text_proj.0.weight",
        "fusion.blocks.0.attn.q.weight",
        "decoder.head.0.weight",
        "logit_bias",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_entity_mask(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = _model(arrays, features)
    mask = torch.zeros(arrays.num_nodes, dtype=torch.bool)
    mask[model.concept_indices(["X:pneumonia", "X:pleura"])] = True
    out = model(_images(), entity_mask=mask)
    assert (out.entity_relevance[..., mask] == 0).all()
    torch.testing.assert_close(out.entity_relevance.sum(-1), torch.ones(2, 3))


def test_k_hops_restricts_graph(arrays: GraphArrays, features: torch.Tensor) -> None:
    cfg = tiny_config()
    cfg.targets = ["X:effusion"]
    cfg.k_hops = 1
    model = KgdxModel(cfg, arrays, features)
    assert set(model.entity_ids) == {"X:effusion", "X:finding", "X:pleura", "X:pneumonia"}
    assert model(_images()).entity_relevance.shape == (2, 1, 4)


def test_bad_graph_inputs(arrays: GraphArrays, features: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="node_features"):
        KgdxModel(tiny_config(), arrays, None)
    with pytest.raises(ConfigError, match="node_features"):
        KgdxModel(tiny_config(), arrays, features[:, :5])
    cfg = tiny_config()
    cfg.targets = ["X:nope", *TARGETS]
    with pytest.raises(UnknownConceptError, match="X:nope"):
        KgdxModel(cfg, arrays, features)


def test_relation_count_resolved_from_graph(arrays: GraphArrays, features: torch.Tensor) -> None:
    cfg = tiny_config()
    assert cfg.gnn.num_relations == 0
    model = KgdxModel(cfg, arrays, features)
    assert model.config.gnn.num_relations == arrays.num_relations
    assert cfg.gnn.num_relations == 0  # the caller's config is not mutated


def test_map_gradient_fusion_keeps_the_map_off_the_cnn(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    cfg = tiny_config()
    cfg.image = dataclasses.replace(cfg.image, dropout=0.0)
    cfg.decoder = dataclasses.replace(cfg.decoder, patch_pooling=True, map_gradient="fusion")
    model = KgdxModel(cfg, arrays, features).train()
    images = _images()
    out = model(images)
    out.patch_attention[..., 0].sum().backward()  # a loss on the map alone
    cnn = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert all(g.abs().sum() == 0 for g in cnn)  # the CNN is not reshaped by the map
    for name in ("fusion.blocks.0.attn.q.weight", "decoder.patch_query.weight", "gnn.input.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout in the GNN for both calls
    out = model(images)
    out.logits.sum().backward()  # the classification loss still trains the CNN
    grad = model.get_parameter("image_encoder.proj.weight").grad
    assert grad is not None and grad.abs().sum() > 0
    torch.manual_seed(1)
    with torch.no_grad():  # no second pass: the map it gives is the recomputed one's
        torch.testing.assert_close(model(images).patch_attention, out.patch_attention)
