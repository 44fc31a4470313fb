from __future__ import annotations

import pytest
import torch

from models.errors import ConfigError
from models.fusion import FusionConfig, KnowledgeFusion


@pytest.mark.parametrize("layers", [1, 2])
def test_shapes_and_attention(layers: int) -> None:
    fusion = KnowledgeFusion(32, FusionConfig(layers=layers, heads=4, dropout=0.0)).eval()
    tokens, entities = torch.randn(2, 10, 32), torch.randn(6, 32)
    fused, attn = fusion(tokens, entities)
    assert fused.shape == (2, 10, 32)
    assert attn.shape == (2, 10, 6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 10))


def test_entity_mask_hides_entities() -> None:
    fusion = KnowledgeFusion(32, FusionConfig(heads=4, dropout=0.0)).eval()
    tokens, entities = torch.randn(2, 10, 32), torch.randn(6, 32)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    fused, attn = fusion(tokens, entities, mask)
    assert (attn[0, :, :3] == 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 10))
    # a masked entity's content cannot reach the tokens
    changed = entities.clone()
    changed[:3] += 5.0
    fused2, _ = fusion(tokens, changed, mask)
    torch.testing.assert_close(fused2[0], fused[0])
    assert not torch.allclose(fused2[1], fused[1])


def test_heads_must_divide_dim() -> None:
    with pytest.raises(ConfigError, match="heads"):
        KnowledgeFusion(30, FusionConfig(heads=4))


def test_top_k_fusion_attends_to_few_entities_and_others_cannot_reach_the_tokens() -> None:
    """With top_k each head keeps each token's k best entities: the heads-averaged weights
    have at most heads * k non-zeros, and changing an entity no head kept changes nothing."""
    torch.manual_seed(0)
    fusion = KnowledgeFusion(32, FusionConfig(heads=4, dropout=0.0, top_k=2)).eval()
    tokens, entities = torch.randn(1, 3, 32), torch.randn(12, 32)
    fused, attn = fusion(tokens, entities)
    assert ((attn > 0).sum(-1) <= 8).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 3))
    unused = int((attn[0] == 0).all(0).nonzero()[0])
    changed = entities.clone()
    changed[unused] += 0.01  # small: the top-2 sets stay the same
    fused2, attn2 = fusion(tokens, changed)
    assert torch.equal(attn2 > 0, attn > 0)
    torch.testing.assert_close(fused2, fused)
    dense = KnowledgeFusion(32, FusionConfig(heads=4, dropout=0.0)).eval()
    dense.load_state_dict(fusion.state_dict())
    assert (dense(tokens, entities)[1] > 0).all()


def test_top_k_is_checked() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        FusionConfig(top_k=-1)
