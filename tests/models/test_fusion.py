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
