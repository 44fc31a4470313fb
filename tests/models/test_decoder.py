from __future__ import annotations

import pytest
import torch

from models.decoder import DecoderConfig, FindingDecoder


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
