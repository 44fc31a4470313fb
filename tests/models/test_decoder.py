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
