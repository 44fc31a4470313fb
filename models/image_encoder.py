"""Image encoder: a single-channel image -> a grid of patch tokens.

CNN backbones (MONAI DenseNet121 / ResNet, or a tiny conv net for tests) keep their last
feature map, a 1x1 convolution projects its channels to the model width, and each spatial
position becomes a token; a ViT (transformers ``ViTModel``) gives its patch tokens directly.
The grid shape comes back with the tokens so a finding's attention over the ``P`` tokens can
be reshaped into a ``rows x cols`` heat map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from models.errors import ConfigError, EncoderError

log = logging.getLogger(__name__)

#: backbone name -> channels of its last feature map (``None`` for the ViT: its width).
_BACKBONES: dict[str, int | None] = {
    "densenet121": 1024,
    "resnet": 512,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "vit": None,
    "cnn": 64,
}


@dataclass
class ImageEncoderConfig:
    """Which backbone turns images into patch tokens.

    Args:
        backbone: ``"densenet121"`` (default, MONAI), ``"resnet18"`` (``"resnet"``),
            ``"resnet34"``, ``"resnet50"`` (MONAI), ``"vit"`` (transformers ViT, small) or
            ``"cnn"`` (three conv layers, for tests).
        image_size: side of the square input in pixels (default 224).
        out_dim: token width (default 256).
        pretrained_path: optional local ``.safetensors`` state dict for the backbone.
        dropout: dropout on the backbone's feature map before projection (default 0.1).
        patch_size: ViT patch side in pixels (default 16).
        vit_hidden: ViT width (default 384, ViT-S).
        vit_layers: ViT depth (default 6).
        vit_heads: ViT heads (default 6).
        resnet_stages: ResNet only: how many of its four stages run (default 4, total stride
            32); 3 stops after ``layer3`` (stride 16: an 8 x 8 token grid at 128 px instead
            of 4 x 4, for finer heat maps, at three quarters of the convolutions).
    """

    backbone: str = "densenet121"  # densenet121 | resnet18 | resnet34 | resnet50 | vit | cnn
    image_size: int = 224  # square input side in pixels
    out_dim: int = 256  # token width D
    pretrained_path: str | None = None  # local safetensors state dict of the backbone
    dropout: float = 0.1  # on the feature map before the 1x1 projection
    patch_size: int = 16  # ViT only: patch side in pixels
    vit_hidden: int = 384  # ViT only: width
    vit_layers: int = 6  # ViT only: depth
    vit_heads: int = 6  # ViT only: heads
    resnet_stages: int = 4  # ResNet only: 3 = stop after layer3 (stride 16)

    def __post_init__(self) -> None:
        if self.backbone not in _BACKBONES:
            raise ConfigError(
                f"image.backbone must be one of {sorted(_BACKBONES)}, got {self.backbone!r}"
            )
        if self.image_size < 8:
            raise ConfigError(f"image.image_size must be >= 8, got {self.image_size}")
        if self.out_dim < 1:
            raise ConfigError(f"image.out_dim must be >= 1, got {self.out_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"image.dropout must be in [0, 1), got {self.dropout}")
        if self.resnet_stages not in (3, 4):
            raise ConfigError(f"image.resnet_stages must be 3 or 4, got {self.resnet_stages}")
        if self.resnet_stages != 4 and not self.backbone.startswith("resnet"):
            raise ConfigError(
                f"image.resnet_stages applies to ResNet backbones only, not {self.backbone!r}"
            )
        if self.backbone == "vit" and self.image_size % self.patch_size:
            raise ConfigError(
                f"image.image_size={self.image_size} must be a multiple of "
                f"image.patch_size={self.patch_size} for the ViT"
            )


class PatchTokens(NamedTuple):
    """Output of :class:`ImageEncoder`.

    Attributes:
        tokens: (B, P, D) with ``P = rows * cols``, row-major.
        grid: (rows, cols) of the token grid.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]


class _TinyCNN(nn.Module):
    """Three stride-2 conv blocks (1 -> 16 -> 32 -> 64 channels, stride 8)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in (16, 32, 64):
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _MonaiResNetFeatures(nn.Module):
    """A MONAI ResNet up to ``layer4`` (or ``layer3`` with ``stages=3``): no pooling, no
    classifier."""

    def __init__(self, depth: str, stages: int = 4) -> None:
        super().__init__()
        self.stages = stages
        from monai.networks.nets import resnet18, resnet34, resnet50

        make = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}[depth]
        # conv1 stride 2 as in the ImageNet ResNet (MONAI's default of 1 is for 3D volumes),
        # giving the usual total stride of 32.
        self.net = make(
            spatial_dims=2,
            n_input_channels=1,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )
        if stages == 3:
            self.net.layer4 = nn.Sequential()  # no weights kept for a stage that never runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.act(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        return x if self.stages == 3 else n.layer4(x)


class _DenseNetFeatures(nn.Module):
    """MONAI ``DenseNet121(...).features`` followed by the ReLU MONAI puts in its head."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121

        self.features = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.features(x))


class _ViTFeatures(nn.Module):
    """transformers ``ViTModel`` on one channel; patch tokens without the CLS token."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.vit = ViTModel(
            ViTConfig(
                image_size=config.image_size,
                patch_size=config.patch_size,
                num_channels=1,
                hidden_size=config.vit_hidden,
                num_hidden_layers=config.vit_layers,
                num_attention_heads=config.vit_heads,
                intermediate_size=4 * config.vit_hidden,
            ),
            add_pooling_layer=False,
        )
        self.image_size = config.image_size
        self.patch_size = config.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = self.vit(
            pixel_values=x, interpolate_pos_encoding=(h, w) != (self.image_size,) * 2
        ).last_hidden_state  # (B, 1 + P, H)
        tokens = out[:, 1:]  # (B, P, H)
        rows, cols = h // self.patch_size, w // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, rows, cols)  # (B, H, rows, cols)


class ImageEncoder(nn.Module):
    """Backbone feature map -> 1x1 conv to ``out_dim`` -> LayerNorm'd patch tokens.

    Args:
        config: :class:`ImageEncoderConfig`.

    Shapes:
        images: (B, 1, H, W) -> tokens (B, P, D), ``P = rows * cols`` (``H / 32`` per side
        for DenseNet121 and ResNet, ``H / 16`` for a ResNet with ``resnet_stages = 3``,
        ``H / 8`` for ``"cnn"``, ``H / patch_size`` for the ViT).
    """

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        name = config.backbone
        channels = _BACKBONES[name]
        self.backbone: nn.Module
        if name == "densenet121":
            self.backbone = _DenseNetFeatures()
        elif name in ("resnet", "resnet18", "resnet34", "resnet50"):
            self.backbone = _MonaiResNetFeatures(
                "resnet18" if name == "resnet" else name, config.resnet_stages
            )
            if config.resnet_stages == 3:
                assert channels is not None
                channels //= 2  # layer3 has half of layer4's channels
        elif name == "vit":
            self.backbone = _ViTFeatures(config)
            channels = config.vit_hidden
        else:
            self.backbone = _TinyCNN()
        assert channels is not None
        self.feature_channels = channels
        self.dropout = nn.Dropout2d(config.dropout)
        self.proj = nn.Conv2d(channels, config.out_dim, kernel_size=1)
        self.norm = nn.LayerNorm(config.out_dim)
        self.reset_parameters()
        if config.pretrained_path:
            load_backbone_weights(self.backbone, Path(config.pretrained_path))

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, images: torch.Tensor) -> PatchTokens:
        """Patch tokens of a batch of single-channel images.

        Shapes:
            images: (B, 1, H, W) -> tokens (B, rows * cols, D), grid (rows, cols).
        """
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (B, 1, H, W), got {tuple(images.shape)}")
        fmap = self.proj(self.dropout(self.backbone(images)))  # (B, D, rows, cols)
        rows, cols = fmap.shape[-2:]
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, rows * cols, D)
        return PatchTokens(self.norm(tokens), (int(rows), int(cols)))


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Load a local safetensors state dict into ``backbone`` (never a pickle).

    Keys may carry a leading ``features.``/``backbone.``/``model.`` prefix or lack the
    wrapper's own prefix; a 3-channel first convolution is summed to one channel (the usual
    way to start a grey-scale model from RGB weights). Tensors whose shapes do not fit
    (a classifier head) are skipped with a log line; no key fitting at all is an error.
    """
    if path.suffix != ".safetensors":
        raise EncoderError(
            f"pretrained_path={str(path)!r}: only .safetensors state dicts are loaded"
        )
    if not path.is_file():
        raise EncoderError(f"pretrained_path={str(path)!r}: no such file")
    source = load_file(str(path))
    target = backbone.state_dict()
    by_suffix = {k.split(".", 1)[1] if "." in k else k: k for k in target}
    matched: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = key
        for prefix in ("module.", "backbone.", "model."):
            name = name.removeprefix(prefix)
        dest = name if name in target else by_suffix.get(name)
        if dest is None or dest in matched:
            continue
        want = target[dest]
        if value.dim() == 4 and want.dim() == 4 and value.shape[1] == 3 and want.shape[1] == 1:
            value = value.sum(1, keepdim=True)  # RGB first conv -> grey
        if value.shape != want.shape:
            log.info(
                "pretrained %s: skipping %s %s (model has %s)",
                path.name,
                key,
                tuple(value.shape),
                tuple(want.shape),
            )
            continue
        matched[dest] = value
    if not matched:
        raise EncoderError(
            f"pretrained_path={str(path)!r}: no tensor matches the {type(backbone).__name__} "
            "backbone's keys"
        )
    missing = [k for k in target if k not in matched]
    backbone.load_state_dict(matched, strict=False)
    log.info(
        "pretrained %s: loaded %d tensors, %d left at init", path.name, len(matched), len(missing)
    )
