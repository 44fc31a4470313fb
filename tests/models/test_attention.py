from __future__ import annotations

import pytest
import torch
from torch import nn

from models.attention import MultiHeadAttention


def _reference(attn: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(attn.dim, attn.heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        ref.out_proj.weight.copy_(attn.out.weight)
        ref.out_proj.bias.copy_(attn.out.bias)
    return ref.eval()


@pytest.mark.parametrize("shared_keys", [True, False])
def test_matches_torch_multihead_attention(shared_keys: bool) -> None:
    attn = MultiHeadAttention(16, heads=4).eval()
    ref = _reference(attn)
    q = torch.randn(3, 5, 16)
    kv = torch.randn(7, 16) if shared_keys else torch.randn(3, 7, 16)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    out, w = attn(q, kv, mask)
    kv3 = kv.expand(3, -1, -1) if shared_keys else kv
    ref_out, ref_w = ref(q, kv3, kv3, key_padding_mask=mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))
    assert (w[1, :, 4:] == 0).all()


def test_fully_masked_row_is_zero_not_nan() -> None:
    attn = MultiHeadAttention(8, heads=2)
    out, w = attn(torch.randn(2, 3, 8), torch.randn(4, 8), torch.ones(4, dtype=torch.bool))
    assert torch.isfinite(out).all()
    assert (w == 0).all()


def test_unbatched() -> None:
    attn = MultiHeadAttention(8, heads=2)
    out, w = attn(torch.randn(3, 8), torch.randn(5, 8))
    assert out.shape == (3, 8) and w.shape == (1, 3, 5)


def test_top_k_keeps_each_heads_best_keys_and_is_checked() -> None:
    mha = MultiHeadAttention(16, heads=2, top_k=3).eval()
    out, w = mha(torch.randn(2, 4, 16), torch.randn(9, 16))
    assert out.shape == (2, 4, 16) and ((w > 0).sum(-1) <= 6).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="top_k"):
        MultiHeadAttention(16, heads=2, top_k=0)
