"""Evidence attribution: the gradient it returns, what it predicts, and how outputs carry it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kg.tensors import GraphArrays
from models.attribution import attributed_forward, attribution_shares
from models.explain import explain_output
from models.faithfulness import DeletionConfig, deletion_test
from tests.models.tiny_checkpoint import tiny_model


def test_attribution_is_the_logit_gradient_of_each_entitys_attention_bias(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    """Each (image, finding) row is d logit / d b_n, checked by finite differences, and the
    output is the model's own output on those columns."""
    model = tiny_model(arrays, features).double()
    model.cache_entities()
    images = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    out = attributed_forward(model, images, columns=[2, 0])
    assert out.entity_attribution is not None
    assert out.entity_attribution.shape == (3, 2, arrays.num_nodes)
    with torch.no_grad():
        plain = model(images, targets=[2, 0])
    torch.testing.assert_close(out.logits, plain.logits)
    assert out.concept_ids == plain.concept_ids
    eps = 1e-5
    for n in (0, 4, arrays.num_nodes - 1):
        bias = torch.zeros(arrays.num_nodes, dtype=torch.float64)
        bias[n] = eps
        with torch.no_grad():
            up = model(images, targets=[2, 0], entity_bias=bias).logits
            down = model(images, targets=[2, 0], entity_bias=-bias).logits
        numeric = (up - down) / (2 * eps)  # (B, C): every image's logits move with b_n
        torch.testing.assert_close(
            out.entity_attribution[..., n].double(), numeric, atol=1e-6, rtol=1e-4
        )


def test_attribution_predicts_what_removing_a_concept_does(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    """The first-order estimate ranks concepts by their real effect: the concept it names
    first costs the logit more, when removed, than the one it names last."""
    model = tiny_model(arrays, features)
    model.cache_entities()
    images = torch.randn(4, 1, 32, 32)
    out = attributed_forward(model, images)
    assert out.entity_attribution is not None
    agree = []
    for i in range(4):
        for c in range(len(model.config.targets)):
            a = out.entity_attribution[i, c]
            real = []
            for n in (int(a.argmax()), int(a.argmin())):
                mask = torch.zeros(arrays.num_nodes, dtype=torch.bool)
                mask[n] = True
                with torch.no_grad():
                    masked = model(images[i : i + 1], entity_mask=mask).logits[0, c]
                real.append(float(out.logits[i, c] - masked))
            agree.append(real[0] > real[1])
    assert np.mean(agree) >= 0.9


def test_shares_and_the_explanations_rank_by_the_attribution(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = tiny_model(arrays, features)
    model.cache_entities()
    images = torch.randn(2, 1, 32, 32)
    out = attributed_forward(model, images)
    attr = out.entity_attribution
    assert attr is not None
    shares = out.entity_relevance
    assert (shares >= 0).all()
    torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[:2]))
    assert ((shares > 0) == (attr > 0)).all()
    labels = {cid: cid for cid in arrays.node_ids}
    explained = explain_output(out, labels, top_k=3)
    for i, image in enumerate(explained):
        for c, finding in enumerate(image.findings):
            want = torch.sort(-attr[i, c], stable=True).indices[:3].tolist()
            assert [e.concept_id for e in finding.evidence] == [arrays.node_ids[n] for n in want]
            assert [e.relevance for e in finding.evidence] == pytest.approx(
                shares[i, c, want].tolist()
            )
    # the deletion test masks the concepts the explanation names
    records = deletion_test(model, images, out, [(0, 1)], DeletionConfig(k=2, n_boot=0))
    own = model.concept_indices(model.config.targets)[1]
    ranked = [n for n in torch.sort(-attr[0, 1], stable=True).indices.tolist() if n != own]
    assert records[0].evidence == ranked[:2]


def test_shares_of_nothing_positive_are_zero() -> None:
    a = torch.tensor([[-1.0, -2.0, 0.0], [3.0, -1.0, 1.0]])
    torch.testing.assert_close(
        attribution_shares(a), torch.tensor([[0.0, 0.0, 0.0], [0.75, 0.0, 0.25]])
    )


def test_bad_columns_are_refused(arrays: GraphArrays, features: torch.Tensor) -> None:
    model = tiny_model(arrays, features)
    images = torch.randn(1, 1, 32, 32)
    with pytest.raises(ValueError, match="columns"):
        attributed_forward(model, images, columns=[99])
    with pytest.raises(ValueError, match="columns"):
        attributed_forward(model, images, columns=[])


def test_attribution_runs_inside_no_grad_and_inference_mode(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    """Callers that wrap scoring in ``no_grad`` or ``inference_mode`` (the entity cache made
    there too, inputs made there) get the same attribution as everyone else."""
    model = tiny_model(arrays, features)
    with torch.inference_mode():
        model.cache_entities()
        images = torch.randn(2, 1, 32, 32)
    assert not model._entity_cache.is_inference()
    plain = attributed_forward(model, images.clone())
    with torch.no_grad():
        quiet = attributed_forward(model, images)
    with torch.inference_mode():
        inside = attributed_forward(model, images)
    for out in (quiet, inside):
        assert out.entity_attribution is not None and plain.entity_attribution is not None
        torch.testing.assert_close(out.entity_attribution, plain.entity_attribution)
        torch.testing.assert_close(out.logits, plain.logits)


def test_concepts_that_would_not_lower_the_logit_are_no_evidence(
    arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = tiny_model(arrays, features)
    model.cache_entities()
    out = attributed_forward(model, torch.randn(1, 1, 32, 32))
    assert out.entity_attribution is not None
    out.entity_attribution[0, 0] = -1.0  # nothing would lower finding 0's logit
    out.entity_attribution[0, 0, 3] = 0.5  # but one concept
    explained = explain_output(out, {}, top_k=4)[0].findings
    assert [e.concept_id for e in explained[0].evidence] == [arrays.node_ids[3]]
    assert len(explained[1].evidence) == 4
