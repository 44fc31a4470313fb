from __future__ import annotations

import pytest
import torch

from models.decoder import DecoderConfig, FindingDecoder
from models.errors import ConfigError


def _decoder(self_attention: bool = True) -> FindingDecoder:
    cfg = DecoderConfig(layers=2, heads=4, ffn_mult=2, dropout=0.0, self_attention=self_attention)
    return FindingDecoder(32, cfg).eval()


@pytest.mark.parametrize("self_attention", [True, False])
def test_shapes_and_attention(self_attention: bool) -> None:
    dec = _decoder(self_attention)
    queries, tokens = torch.randn(3, 32), torch.randn(2, 20, 32)
    fusion_attn = torch.softmax(torch.randn(2, 20, 6), -1)
    out = dec(queries, tokens, num_image_tokens=16, fusion_attention=fusion_attn)
    assert out.logits.shape == (2, 3)
    assert out.token_attention.shape == (2, 3, 20)
    assert out.patch_attention.shape == (2, 3, 16)
    assert out.entity_relevance is not None and out.entity_relevance.shape == (2, 3, 6)
    torch.testing.assert_close(out.patch_attention.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out.entity_relevance.sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out.entity_relevance, out.token_attention @ fusion_attn)


def test_padded_tokens_get_no_attention() -> None:
    dec = _decoder()
    queries, tokens = torch.randn(3, 32), torch.randn(2, 20, 32)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 17:] = True
    out = dec(queries, tokens, 16, token_mask=mask)
    assert (out.token_attention[0, :, 17:] == 0).all()
    tokens2 = tokens.clone()
    tokens2[0, 17:] = 100.0
    out2 = dec(queries, tokens2, 16, token_mask=mask)
    torch.testing.assert_close(out2.logits, out.logits)


def test_head_is_shared_and_query_count_free() -> None:
    """Parameters do not depend on K; without self-attention a query's score is its own."""
    dec = _decoder(self_attention=False)
    tokens = torch.randn(2, 16, 32)
    q = torch.randn(5, 32)
    all5 = dec(q, tokens, 16).logits
    one = dec(q[3:4], tokens, 16).logits
    torch.testing.assert_close(one[:, 0], all5[:, 3])
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0])
    torch.testing.assert_close(dec(q, tokens, 16, logit_bias=bias).logits, all5 + bias)


def test_patch_pooling_scores_patches_and_its_weights_are_the_heat_map() -> None:
    """With patch pooling the heat map follows the patch that carries the evidence: a
    patch made to match the finding's patch query takes the weight and raises the logit."""
    torch.manual_seed(0)
    cfg = DecoderConfig(layers=1, heads=4, ffn_mult=2, dropout=0.0, patch_pooling=True)
    dec = FindingDecoder(32, cfg).eval()
    plain = FindingDecoder(32, DecoderConfig(layers=1, heads=4, ffn_mult=2, dropout=0.0))
    assert len(list(dec.parameters())) > len(list(plain.parameters()))
    queries, tokens = torch.randn(2, 32), torch.randn(1, 20, 32) * 0.1
    out = dec(queries, tokens, num_image_tokens=16)
    assert out.patch_attention.shape == (1, 2, 16)
    torch.testing.assert_close(out.patch_attention.sum(-1), torch.ones(1, 2))
    # Gradient ascent on patch 5 alone, for finding 0: it takes the heat map's peak.
    h, patches = torch.randn(1, 2, 32), torch.randn(1, 16, 32) * 0.1
    pooled, _ = dec._pool_patches(h, patches)
    for _ in range(30):
        patches.requires_grad_(True)
        dec._pool_patches(h, patches)[0][0, 0].backward()
        assert patches.grad is not None
        step = torch.zeros_like(patches)
        step[0, 5] = 0.3 * patches.grad[0, 5] / patches.grad[0, 5].norm().clamp_min(1e-12)
        patches = (patches + step).detach()
    pooled2, weights = dec._pool_patches(h, patches)
    assert int(weights[0, 0].argmax()) == 5
    assert pooled2[0, 0] > pooled[0, 0]


def test_pool_sharpness_is_checked() -> None:
    with pytest.raises(Exception, match="pool_sharpness"):
        DecoderConfig(pool_sharpness=0.0)


def _patch_only(patch_query: str) -> FindingDecoder:
    cfg = DecoderConfig(
        layers=1,
        heads=4,
        ffn_mult=2,
        dropout=0.0,
        patch_pooling=True,
        global_logit=False,
        patch_query=patch_query,
    )
    return FindingDecoder(32, cfg).eval()


@pytest.mark.parametrize("patch_query", ["decoder", "entity"])
def test_without_global_logit_the_patches_alone_make_the_logit(patch_query: str) -> None:
    """The shared head no longer adds to the logit, and the evidence ranking is the pooling
    weights composed with the image tokens' knowledge (text tokens take no part)."""
    torch.manual_seed(0)
    dec = _patch_only(patch_query)
    queries, tokens = torch.randn(3, 32), torch.randn(2, 20, 32)
    fusion_attn = torch.softmax(torch.randn(2, 20, 6), -1)
    out = dec(queries, tokens, 16, fusion_attention=fusion_attn)
    with torch.no_grad():
        for param in dec.head.parameters():
            param.add_(1.0)
    torch.testing.assert_close(dec(queries, tokens, 16).logits, out.logits)
    bias = torch.tensor([0.0, 3.0, 0.0])
    torch.testing.assert_close(dec(queries, tokens, 16, logit_bias=bias).logits, out.logits + bias)
    assert out.entity_relevance is not None
    torch.testing.assert_close(out.entity_relevance, out.patch_attention @ fusion_attn[:, :16])
    torch.testing.assert_close(out.entity_relevance.sum(-1), torch.ones(2, 3))


def test_entity_patch_query_reads_only_the_image_patches() -> None:
    """With the entity as the patch query a finding's logit and heat map are the same
    whatever else the decoder reads (text tokens here), as a class activation map's are;
    with the decoded query they change with it."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 20, 32)
    other = tokens.clone()
    other[:, 16:] = torch.randn(2, 4, 32)  # new "text" tokens, same image patches
    queries = torch.randn(3, 32)
    entity, decoded = _patch_only("entity"), _patch_only("decoder")
    a, b = entity(queries, tokens, 16), entity(queries, other, 16)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.patch_attention, b.patch_attention)
    assert not torch.allclose(
        decoded(queries, tokens, 16).logits, decoded(queries, other, 16).logits
    )


def test_patch_only_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="patch_query"):
        DecoderConfig(patch_pooling=True, patch_query="cls")
    with pytest.raises(ConfigError, match=r"need decoder\.patch_pooling"):
        DecoderConfig(global_logit=False)
    with pytest.raises(ConfigError, match=r"need decoder\.patch_pooling"):
        DecoderConfig(patch_query="entity")


def test_map_gradient_projections_keeps_values_and_trains_only_the_projections() -> None:
    def build(map_gradient: str) -> FindingDecoder:
        torch.manual_seed(0)
        cfg = DecoderConfig(
            layers=1, heads=4, ffn_mult=2, dropout=0.0, patch_pooling=True,
            map_gradient=map_gradient,
        )  # fmt: skip
        return FindingDecoder(32, cfg).train()

    queries, tokens = torch.randn(3, 32), torch.randn(2, 20, 32)
    outs = {}
    for mode in ("all", "projections"):
        dec = build(mode)
        t = tokens.clone().requires_grad_(True)
        out = dec(queries, t, 16)
        out.patch_attention[..., 0].sum().backward()  # a loss on the map alone
        outs[mode] = out
        assert dec.patch_query is not None and dec.patch_query.weight.grad is not None
        assert dec.patch_query.weight.grad.abs().sum() > 0
        blocks_grad = [p.grad for p in dec.blocks.parameters() if p.grad is not None]
        if mode == "all":
            assert t.grad is not None and t.grad.abs().sum() > 0 and blocks_grad
        else:  # the map's gradient stops at the projections
            assert t.grad is None or t.grad.abs().sum() == 0
            assert all(g.abs().sum() == 0 for g in blocks_grad)
    torch.testing.assert_close(outs["all"].logits, outs["projections"].logits)
    torch.testing.assert_close(outs["all"].patch_attention, outs["projections"].patch_attention)
    with pytest.raises(ConfigError, match="map_gradient must be one of all, projections, fusion"):
        DecoderConfig(patch_pooling=True, map_gradient="backbone")
