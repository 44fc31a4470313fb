"""Image preprocessing: a grayscale image in [0, 1] -> the model's square input tensor.

Steps, in order (``Preprocess``):

1. **Letterbox** (``resize="pad"``, default): resize keeping the aspect ratio so the longer
   side is ``image_size`` (``area`` when shrinking, ``bilinear`` when enlarging, e.g. the
   64 px NIH images: what MONAI's ``Resize`` computes, without its metadata), then zero-pad
   the shorter side symmetrically (``floor`` of the margin at the top / left). Nothing is
   cropped, so every finding stays in view and a heat map maps back to the original pixels
   exactly. ``resize="stretch"``
   resizes straight to ``image_size`` x ``image_size`` instead (aspect ratio lost). The
   square NIH images (256 or 64 px) are unaffected by the choice; Kermany and covid images
   are not square.
2. **Augmentation** (``train=True`` only): a random affine (rotation, translation, isotropic
   scale) through MONAI's ``Affine`` and brightness / contrast jitter, with every parameter
   drawn from a ``torch.Generator``, so a sample's augmentation depends only on that
   generator's seed, never on worker processes or global random state.
3. **Normalisation** (``normalize``): ``"image"`` (default) standardises each image to zero
   mean and unit standard deviation over all its pixels (padding included), which removes
   exposure differences between sources; ``"fixed"`` uses ``(x - mean) / std``; ``"none"``
   keeps [0, 1].

:class:`Geometry` records step 1, so a point or box moves between original-image and model-
input coordinates (augmentation is never applied where geometry matters: evaluation).
Coordinates are continuous pixel coordinates: pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``; boxes are ``(x, y, w, h)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine

from models.errors import ConfigError, DataError

_RESIZE_MODES = ("pad", "stretch")
_NORMALIZE_MODES = ("image", "fixed", "none")


@dataclass
class PreprocessConfig:
    """How images become model inputs; stored in checkpoints so serving matches training.

    Args:
        image_size: side of the square model input in pixels (default 224).
        resize: ``"pad"`` (default, keep aspect ratio and zero-pad) or ``"stretch"``.
        normalize: ``"image"`` (default, per-image zero mean / unit std), ``"fixed"`` or
            ``"none"`` (keep [0, 1]).
        mean: mean subtracted when ``normalize="fixed"`` (default 0.5).
        std: divisor when ``normalize="fixed"`` (default 0.25).
        rotate_deg: training only, rotation drawn uniformly in +-rotate_deg (default 7).
        translate: training only, shift drawn in +-translate x image_size per axis
            (default 0.05).
        scale: training only, isotropic zoom drawn in [1 - scale, 1 + scale] (default 0.07).
        brightness: training only, offset drawn in +-brightness, on [0, 1] (default 0.1).
        contrast: training only, contrast factor drawn in [1 - contrast, 1 + contrast]
            around the image mean (default 0.15).
    """

    image_size: int = 224  # model input side, pixels
    resize: str = "pad"  # "pad": keep aspect ratio + zero-pad; "stretch": plain resize
    normalize: str = "image"  # "image" | "fixed" | "none"
    mean: float = 0.5  # for normalize="fixed"
    std: float = 0.25  # for normalize="fixed"
    rotate_deg: float = 7.0  # augmentation: max rotation, degrees
    translate: float = 0.05  # augmentation: max shift, fraction of image_size
    scale: float = 0.07  # augmentation: max zoom change, fraction
    brightness: float = 0.1  # augmentation: max brightness offset on [0, 1]
    contrast: float = 0.15  # augmentation: max contrast change, fraction

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 8:
            raise ConfigError(f"image_size must be an integer >= 8, got {self.image_size!r}")
        if self.resize not in _RESIZE_MODES:
            raise ConfigError(f"resize must be one of {_RESIZE_MODES}, got {self.resize!r}")
        if self.normalize not in _NORMALIZE_MODES:
            raise ConfigError(
                f"normalize must be one of {_NORMALIZE_MODES}, got {self.normalize!r}"
            )
        if self.std <= 0:
            raise ConfigError(f"std must be > 0, got {self.std}")
        for name in ("rotate_deg", "translate", "scale", "brightness", "contrast"):
            value = getattr(self, name)
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if self.scale >= 1 or self.contrast >= 1:
            raise ConfigError(
                f"scale and contrast must be < 1, got scale={self.scale}, contrast={self.contrast}"
            )


@dataclass(frozen=True)
class Geometry:
    """Where the original image sits inside the model input (step 1 of :class:`Preprocess`).

    ``model = original * scale + pad`` per axis, in continuous pixel coordinates.

    Attributes:
        orig_height, orig_width: original image size in pixels.
        size: side of the square model input.
        scale_y, scale_x: model pixels per original pixel (equal up to rounding with
            ``resize="pad"``).
        pad_top, pad_left: zero rows above / columns left of the resized image.
    """

    orig_height: int
    orig_width: int
    size: int
    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int

    @property
    def content_height(self) -> int:
        """Rows of the model input covered by the image (not padding)."""
        return round(self.orig_height * self.scale_y)

    @property
    def content_width(self) -> int:
        """Columns of the model input covered by the image (not padding)."""
        return round(self.orig_width * self.scale_x)

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Model-input point ``(x, y)`` -> original-image point ``(x, y)``."""
        return (x - self.pad_left) / self.scale_x, (y - self.pad_top) / self.scale_y

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """Original-image point ``(x, y)`` -> model-input point ``(x, y)``."""
        return x * self.scale_x + self.pad_left, y * self.scale_y + self.pad_top

    def box_to_model(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Original-image box ``(x, y, w, h)`` -> model-input box ``(x, y, w, h)``."""
        x, y, w, h = _box(box)
        mx, my = self.to_model(x, y)
        return mx, my, w * self.scale_x, h * self.scale_y

    def box_to_original(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """Model-input box ``(x, y, w, h)`` -> original-image box ``(x, y, w, h)``."""
        x, y, w, h = _box(box)
        ox, oy = self.to_original(x, y)
        return ox, oy, w / self.scale_x, h / self.scale_y

    def cell_to_original(self, row: int, col: int, grid: tuple[int, int]) -> tuple[float, float]:
        """Centre of heat-map cell ``(row, col)`` of a ``grid = (rows, cols)`` map spanning
        the model input, as an original-image point ``(x, y)``."""
        rows, cols = grid
        x = (col + 0.5) * self.size / cols
        y = (row + 0.5) * self.size / rows
        return self.to_original(x, y)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def _box(box: Sequence[float]) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"box must be (x, y, w, h), got {tuple(box)!r}")
    x, y, w, h = (float(v) for v in box)
    if w < 0 or h < 0:
        raise ValueError(f"box width and height must be >= 0, got {(x, y, w, h)!r}")
    return x, y, w, h


class Preprocess:
    """Grayscale image in [0, 1] -> model input ``(1, S, S)`` float32 (see module docstring).

    Args:
        config: a :class:`PreprocessConfig`, or an int meaning ``PreprocessConfig(image_size=
            config)``.
        train: apply random augmentation (default False: deterministic evaluation path).

    Shapes:
        input: ``(H, W)`` numpy array or tensor, or ``(1, H, W)`` tensor, values in [0, 1].
        output: ``(1, S, S)`` float32 tensor, ``S = config.image_size``.
    """

    def __init__(self, config: PreprocessConfig | int = 224, train: bool = False):
        self.config = (
            config if isinstance(config, PreprocessConfig) else PreprocessConfig(image_size=config)
        )
        self.train = train

    def __repr__(self) -> str:
        return f"Preprocess({self.config!r}, train={self.train})"

    @property
    def size(self) -> int:
        return self.config.image_size

    def geometry(self, height: int, width: int) -> Geometry:
        """The letterbox geometry for an original image of ``height`` x ``width``."""
        if height < 1 or width < 1:
            raise DataError(f"image size must be positive, got {height}x{width}")
        s = self.size
        if self.config.resize == "stretch":
            new_h, new_w = s, s
        else:
            # the same rounding as monai.transforms.Resize(size_mode="longest")
            ratio = s / max(height, width)
            new_h = max(1, round(height * ratio))
            new_w = max(1, round(width * ratio))
        return Geometry(
            orig_height=height,
            orig_width=width,
            size=s,
            scale_y=new_h / height,
            scale_x=new_w / width,
            pad_top=(s - new_h) // 2,
            pad_left=(s - new_w) // 2,
        )

    def base(self, image: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """Deterministic resize + pad. Returns ``(1, S, S)`` float32 in [0, 1] and geometry."""
        x = _as_chw(image)  # (1, H, W)
        _, h, w = x.shape
        geo = self.geometry(h, w)
        new_h, new_w = geo.content_height, geo.content_width
        if (new_h, new_w) != (h, w):
            x = _resize(x, new_h, new_w)
        bottom = self.size - new_h - geo.pad_top
        right = self.size - new_w - geo.pad_left
        if geo.pad_top or bottom or geo.pad_left or right:
            x = F.pad(x, (geo.pad_left, right, geo.pad_top, bottom), value=0.0)
        return x.clamp_(0.0, 1.0).contiguous(), geo

    def augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random affine + brightness/contrast on a ``(1, S, S)`` tensor in [0, 1]."""
        c = self.config

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        angle = math.radians(uniform(-c.rotate_deg, c.rotate_deg))
        shift = c.translate * self.size
        tx, ty = uniform(-shift, shift), uniform(-shift, shift)
        zoom = uniform(1.0 - c.scale, 1.0 + c.scale)
        if angle or tx or ty or zoom != 1.0:
            affine = Affine(
                rotate_params=angle,
                translate_params=(ty, tx),  # spatial axes are (rows, cols)
                scale_params=(zoom, zoom),
                mode="bilinear",
                padding_mode="zeros",
                image_only=True,
            )
            x = _plain(affine(x))
        factor = uniform(1.0 - c.contrast, 1.0 + c.contrast)
        offset = uniform(-c.brightness, c.brightness)
        mean = x.mean()
        x = (x - mean) * factor + mean + offset
        return x.clamp_(0.0, 1.0)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the configured normalisation to a ``(1, S, S)`` tensor."""
        mode = self.config.normalize
        if mode == "image":
            return (x - x.mean()) / x.std().clamp_min(1e-6)
        if mode == "fixed":
            return (x - self.config.mean) / self.config.std
        return x

    def with_geometry(
        self, image: np.ndarray | torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Geometry]:
        """Like ``__call__`` but also returns the letterbox :class:`Geometry`."""
        x, geo = self.base(image)
        if self.train:
            x = self.augment(x, generator)
        return self.normalise(x).to(torch.float32), geo

    def __call__(
        self, image: np.ndarray | torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return self.with_geometry(image, generator)[0]


def preprocess_images(
    preprocess: Preprocess, images: Sequence[np.ndarray | torch.Tensor]
) -> tuple[torch.Tensor, list[Geometry]]:
    """Decoded grayscale images in [0, 1] -> a model's input batch and their geometries.

    Shapes:
        images: ``B`` arrays ``(H, W)`` or ``(1, H, W)`` in [0, 1] (sizes may differ);
        returns ``(B, 1, S, S)`` float32 and ``B`` :class:`Geometry`.

    Raises:
        DataError: no images, one that is not a 2-D grayscale image, an empty one, integer
            pixels, NaN or infinite pixels, or values outside [0, 1] (8-bit pixels not
            divided by 255, say), which the model would score without complaint and wrongly.
    """
    if len(images) == 0:
        raise DataError("no images to preprocess")
    tensors: list[torch.Tensor] = []
    geometries: list[Geometry] = []
    for i, image in enumerate(images):
        shape = tuple(image.shape)
        if len(shape) != 2 and not (len(shape) == 3 and shape[0] == 1):
            raise DataError(f"image {i}: expected a grayscale (H, W) array, got {shape}")
        values: torch.Tensor | None
        if isinstance(image, torch.Tensor):
            values, floating, dtype = image, image.is_floating_point(), str(image.dtype)[6:]
        else:
            array = np.asarray(image)
            floating, dtype = array.dtype.kind == "f", str(array.dtype)
            values = torch.from_numpy(np.ascontiguousarray(array, np.float32)) if floating else None
        if not floating or values is None:
            raise DataError(
                f"image {i}: expected float pixel values in [0, 1], got {dtype} "
                "(divide 8-bit pixels by 255, 16-bit ones by 65535)"
            )
        if not values.numel():
            raise DataError(f"image {i}: is empty, shape {shape}")
        # one pass: the extremes are NaN or infinite when a pixel is
        lo, hi = (float(v) for v in torch.aminmax(values.float()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataError(f"image {i}: contains NaN or infinite values")
        if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
            raise DataError(f"image {i}: pixel values must lie in [0, 1], got [{lo:g}, {hi:g}]")
        x, geo = preprocess.with_geometry(values)
        tensors.append(x)
        geometries.append(geo)
    return torch.stack(tensors), geometries


#: float rounding a decoder may leave outside [0, 1] (windowing, rescaling)
_RANGE_SLACK = 1e-3


def _as_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) or (1, H, W) array/tensor -> (1, H, W) float32 tensor (a copy)."""
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] != 1:
        raise DataError(
            f"expected a grayscale image (H, W) or (1, H, W), got shape {tuple(x.shape)}"
        )
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise DataError(f"image is empty, shape {tuple(x.shape)}")
    return x.to(torch.float32).clone()


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(1, H, W)`` -> ``(1, height, width)``: ``area`` when shrinking, ``bilinear`` when
    enlarging, bit for bit what ``monai.transforms.Resize(spatial_size=(height, width),
    mode=...)`` returns (its defaults: no anti-aliasing, ``align_corners=None``), which calls
    this same ``interpolate`` after about a thousand Python calls of metadata bookkeeping per
    image. The service preprocesses on its batch worker, where that Python held the GIL
    against the request threads (tests/models/test_transforms.py holds the two equal)."""
    shrinking = height * width < x.shape[1] * x.shape[2]
    return F.interpolate(
        x[None], size=(height, width), mode="area" if shrinking else "bilinear", align_corners=None
    )[0]


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; batches and models want plain tensors."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else torch.as_tensor(x)
