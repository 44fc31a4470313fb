"""A finding's heat map drawn over its image, as PNG bytes (``/v1/results/{id}/overlay.png``).

The ``(rows, cols)`` map is resampled bilinearly onto the output pixels (cell centres at
``(j + 0.5) / cols`` of its span, the ``align_corners=False`` convention of
:func:`models.explain.heatmap_on_original`), coloured with a perceptually uniform
matplotlib colormap (``inferno`` by default; the LUT only, no pyplot), and blended over the
gray image with a per-pixel weight ``alpha * heat``: where the model did not look the image
shows unchanged, where it looked most the colour covers ``alpha`` of it.

Without a geometry the map spans the whole image. With the
:class:`~models.transforms.Geometry` of the letterbox that made the model input, the map
spans the square model input, and only the part over the image (not the padding) is drawn,
so a peak lands on the pixels the model saw there.
"""

from __future__ import annotations

from functools import lru_cache
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from models.transforms import Geometry

#: Default colormap: perceptually uniform, dark (cold) to bright yellow (hot).
COLORMAP = "inferno"


def heatmap_overlay_png(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    *,
    alpha: float = 0.45,
    max_side: int = 1024,
    geometry: Geometry | None = None,
    colormap: str = COLORMAP,
) -> bytes:
    """Blend ``heatmap`` in colour over the gray ``pixels`` and encode the result as PNG.

    Args:
        pixels: ``(H, W)`` gray image in [0, 1] (values outside are clipped, NaN is 0).
        heatmap: ``(rows, cols)`` map in [0, 1] (clipped likewise).
        alpha: colour weight at heat 1 (default 0.45); the weight is ``alpha * heat``.
        max_side: the output's longer side is at most this many pixels (default 1024); the
            image is only ever shrunk, keeping its aspect ratio.
        geometry: the letterbox :class:`~models.transforms.Geometry` when the map spans the
            model input rather than the image (its ``orig_*`` size may differ from
            ``pixels``, e.g. a thumbnail: the mapping is relative).
        colormap: a name in ``matplotlib.colormaps`` (default ``"inferno"``).

    Returns:
        PNG bytes of an RGB image of ``(round(H * s), round(W * s))`` pixels,
        ``s = min(1, max_side / max(H, W))``.

    Raises:
        ValueError: an argument of the wrong shape or out of range (named in the message).
    """
    image = _unit_2d(pixels, "pixels")
    heat = _unit_2d(heatmap, "heatmap")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    height, width = image.shape
    scale = min(1.0, max_side / max(height, width))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))

    gray = Image.fromarray(np.rint(image * 255.0).astype(np.uint8))
    if (out_w, out_h) != (width, height):
        gray = gray.resize((out_w, out_h), Image.Resampling.BILINEAR)
    base = np.asarray(gray, dtype=np.float32)[..., None]  # (h, w, 1)

    level = heat_on_image(heat, out_h, out_w, geometry)  # (h, w)
    colour = _lut(colormap)[np.rint(level * 255.0).astype(np.uint8)]  # (h, w, 3)
    weight = (alpha * level)[..., None]  # (h, w, 1)
    blended = base + weight * (colour - base)
    rgb = np.clip(np.rint(blended), 0, 255).astype(np.uint8)

    out = BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", compress_level=3)
    return out.getvalue()


def heat_on_image(
    heatmap: np.ndarray, height: int, width: int, geometry: Geometry | None = None
) -> np.ndarray:
    """Resample a ``(rows, cols)`` map bilinearly onto a ``height x width`` image.

    Without ``geometry`` the map spans the image; with it, the map spans the square model
    input and the image is the letterboxed region ``geometry.to_model(0, 0)`` to
    ``geometry.to_model(orig_width, orig_height)``.

    Shapes:
        ``(rows, cols)`` -> ``(height, width)`` float32 in [0, 1].
    """
    heat = _unit_2d(heatmap, "heatmap")
    rows, cols = heat.shape
    if geometry is None:
        box = (0.0, 0.0, float(cols), float(rows))
    else:
        x0, y0 = geometry.to_model(0.0, 0.0)
        x1, y1 = geometry.to_model(float(geometry.orig_width), float(geometry.orig_height))
        sx, sy = cols / geometry.size, rows / geometry.size
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    # Pillow's box resize samples output pixel centres inside `box` (continuous source
    # coordinates, pixel i covering [i, i + 1)) and clamps at the border.
    resized = Image.fromarray(heat).resize(  # float32 -> mode "F"
        (width, height), Image.Resampling.BILINEAR, box=box
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


@lru_cache(maxsize=8)
def _lut(name: str) -> np.ndarray:
    """``(256, 3)`` float32 RGB in [0, 255] of a matplotlib colormap (cached)."""
    from matplotlib import colormaps

    try:
        cmap = colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}") from None
    rgba = cmap(np.linspace(0.0, 1.0, 256), bytes=True)
    lut = np.asarray(rgba[:, :3], dtype=np.float32)
    lut.flags.writeable = False
    return lut


def _unit_2d(values: np.ndarray, name: str) -> np.ndarray:
    """A 2-D float32 array with NaN -> 0 and values clipped to [0, 1]."""
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(arr, 0.0, 1.0)
