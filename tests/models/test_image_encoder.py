from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.errors import ConfigError, EncoderError
from models.image_encoder import ImageEncoder, ImageEncoderConfig


@pytest.mark.parametrize(
    ("backbone", "size", "grid"),
    [
        ("cnn", 32, (4, 4)),
        ("cnn", 48, (6, 6)),
        ("densenet121", 64, (2, 2)),
        ("resnet18", 64, (2, 2)),
        ("vit", 32, (2, 2)),
    ],
)
def test_patch_tokens(backbone: str, size: int, grid: tuple[int, int]) -> None:
    cfg = ImageEncoderConfig(backbone=backbone, image_size=size, out_dim=32, vit_layers=2)
    _check_tokens(cfg, size, grid)


def test_three_resnet_stages_halve_the_stride() -> None:
    cfg = ImageEncoderConfig(backbone="resnet18", image_size=64, out_dim=32, resnet_stages=3)
    enc = _check_tokens(cfg, 64, (4, 4))  # stride 16, not 32
    assert not any(name.startswith("backbone.net.layer4") for name, _ in enc.named_parameters())


def _check_tokens(cfg: ImageEncoderConfig, size: int, grid: tuple[int, int]) -> ImageEncoder:
    enc = ImageEncoder(cfg).eval()
    out = enc(torch.randn(2, 1, size, size))
    assert out.grid == grid
    assert out.tokens.shape == (2, grid[0] * grid[1], 32)
    assert torch.isfinite(out.tokens).all()
    return enc


def test_tokens_are_row_major() -> None:
    """Token ``r * cols + c`` comes from feature-map position (r, c)."""
    enc = ImageEncoder(ImageEncoderConfig(backbone="cnn", image_size=32, out_dim=8)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        fmap = enc.proj(enc.backbone(x))  # (1, 8, 4, 4)
        tokens = enc(x).tokens  # (1, 16, 8)
    expected = enc.norm(fmap[0, :, 1, 2])
    torch.testing.assert_close(tokens[0, 1 * 4 + 2], expected)


def test_rejects_rgb() -> None:
    enc = ImageEncoder(ImageEncoderConfig(backbone="cnn", image_size=32, out_dim=8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        enc(torch.randn(1, 3, 32, 32))


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        ImageEncoderConfig(backbone="vgg")
    with pytest.raises(ConfigError, match="patch_size"):
        ImageEncoderConfig(backbone="vit", image_size=40, patch_size=16)
    with pytest.raises(ConfigError, match="resnet_stages must be 3 or 4"):
        ImageEncoderConfig(backbone="resnet18", resnet_stages=2)
    with pytest.raises(ConfigError, match="ResNet backbones only"):
        ImageEncoderConfig(backbone="densenet121", resnet_stages=3)


def test_pretrained_safetensors(tmp_path: Path) -> None:
    cfg = ImageEncoderConfig(backbone="cnn", image_size=32, out_dim=8)
    donor = ImageEncoder(cfg)
    with torch.no_grad():
        for p in donor.backbone.parameters():
            p.add_(1.0)
    path = tmp_path / "cnn.safetensors"
    # prefixed keys, an RGB first conv, and a classifier head the backbone lacks
    state = {f"model.{k}": v.clone() for k, v in donor.backbone.state_dict().items()}
    w0 = state["model.body.0.weight"]
    state["model.body.0.weight"] = torch.cat([w0, w0, w0], 1) / 3
    state["model.fc.weight"] = torch.zeros(2, 64)
    save_file(state, str(path))
    enc = ImageEncoder(
        ImageEncoderConfig(backbone="cnn", image_size=32, out_dim=8, pretrained_path=str(path))
    )
    for (name, a), b in zip(
        enc.backbone.state_dict().items(), donor.backbone.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_pretrained_refuses_pickles_and_foreign_files(tmp_path: Path) -> None:
    pt = tmp_path / "weights.pt"
    pt.write_bytes(b"\x80\x04")
    with pytest.raises(EncoderError, match="safetensors"):
        ImageEncoder(ImageEncoderConfig(backbone="cnn", image_size=32, pretrained_path=str(pt)))
    other = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(other))
    with pytest.raises(EncoderError, match="no tensor matches"):
        ImageEncoder(ImageEncoderConfig(backbone="cnn", image_size=32, pretrained_path=str(other)))
