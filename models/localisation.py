"""Localisation: finding heat maps scored against radiologist bounding boxes.

Ground truth is ``BBox_List_2017.csv.gz`` of NIH ChestX-ray14 (984 boxes, 8 findings, on the
1024 x 1024 originals). Its ``Image Index`` (``00013118_008.png``) is the original file
name; the cxr/ images are named ``nih_`` + that name (their ``orig_repo_path`` ends with it),
and the box finding ``Infiltrate`` is the ``Infiltration`` column. 873 boxes on 784 images
land in cxr/ (866 on 256 px images, 7 on 64 px ones); every one of them agrees with a
positive label there.

Coordinates are continuous pixels, ``(x, y, w, h)``; pixel ``(row, col)`` covers
``[col, col + 1) x [row, row + 1)``. A heat map ``(rows, cols)`` spans the model input of
``size`` pixels evenly (cell ``(i, j)`` covers ``[j, j + 1) * size / cols`` ...), and boxes
are brought to model-input coordinates: :func:`scale_box` (1024 px -> the image's size), then
``Geometry.box_to_model`` (letterbox) from :mod:`models.transforms`.

Measures:

- **Pointing game** (Zhang et al., ECCV 2016): a hit when the centre of the heat map's
  highest cell (first in row-major order on ties) lies inside a box (edges included, grown
  by ``tolerance`` pixels). For an interior peak this is the argmax of the bilinearly
  upsampled map, which peaks at cell centres.
- **IoBB** (Wang et al., ChestX-ray8, CVPR 2017): the heat map is upsampled bilinearly to
  the model input, min-max normalised and thresholded at ``threshold`` (default 0.5 of its
  range); the predicted region is the largest 8-connected component (or the one holding the
  peak, or all of it), taken as its bounding box as in ChestX-ray8 (or as the pixel mask);
  IoBB = area(region ∩ box) / area(region). Accuracy at IoBB > 0.1 and > 0.25. With several
  boxes for one finding on one image, the best box counts.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import binomtest

from models.errors import DataError

#: Box finding names that differ from the label columns of the cxr CSV.
BBOX_LABEL_MAP: dict[str, str] = {"Infiltrate": "Infiltration"}
#: Side of the NIH ChestX-ray14 originals the boxes are drawn on.
NIH_ORIGINAL_SIZE = 1024
#: Prefix of NIH images in cxr/ (``nih_00013118_008.png``).
NIH_IMAGE_PREFIX = "nih_"
_BBOX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
_REGIONS = ("largest", "peak", "all")
_SHAPES = ("box", "mask")
IOBB_LEVELS = (0.1, 0.25)


@dataclass(frozen=True)
class Box:
    """An axis-aligned box ``(x, y, w, h)`` in continuous pixel coordinates."""

    x: float
    y: float
    w: float
    h: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.x, self.y, self.w, self.h)):
            raise ValueError(f"box values must be finite, got {self.as_tuple()}")
        if self.w < 0 or self.h < 0:
            raise ValueError(f"box width and height must be >= 0, got {self.as_tuple()}")

    @property
    def x2(self) -> float:
        return self.x + self.w

    @property
    def y2(self) -> float:
        return self.y + self.h

    @property
    def area(self) -> float:
        return self.w * self.h

    def as_tuple(self) -> tuple[float, float, float, float]:
        return self.x, self.y, self.w, self.h

    def scaled(self, sx: float, sy: float | None = None) -> Box:
        """Multiply x / w by ``sx`` and y / h by ``sy`` (default ``sx``)."""
        sy = sx if sy is None else sy
        return Box(self.x * sx, self.y * sy, self.w * sx, self.h * sy)

    def contains(self, x: float, y: float, tolerance: float = 0.0) -> bool:
        """Point inside, edges included, the box grown by ``tolerance`` on every side."""
        t = tolerance
        return self.x - t <= x <= self.x2 + t and self.y - t <= y <= self.y2 + t

    def intersection(self, other: Box) -> float:
        """Area shared with ``other``."""
        w = min(self.x2, other.x2) - max(self.x, other.x)
        h = min(self.y2, other.y2) - max(self.y, other.y)
        return max(w, 0.0) * max(h, 0.0)


@dataclass(frozen=True)
class BoxAnnotation:
    """One radiologist box: the cxr/ image name, the original NIH name, the label column."""

    image: str
    original: str
    finding: str
    box: Box  # on the original image (1024 x 1024 for NIH)


def cxr_image_name(original: str, prefix: str = NIH_IMAGE_PREFIX) -> str:
    """NIH ``Image Index`` (``00013118_008.png``) -> cxr/ image name
    (``nih_00013118_008.png``)."""
    return f"{prefix}{Path(original.strip()).name}"


def read_bbox_csv(
    path: str | Path,
    label_map: Mapping[str, str] | None = None,
    image_prefix: str = NIH_IMAGE_PREFIX,
) -> list[BoxAnnotation]:
    """Read ``BBox_List_2017.csv(.gz)``.

    Args:
        path: the CSV, gzip-compressed when it ends in ``.gz``.
        label_map: box finding name -> label column (default :data:`BBOX_LABEL_MAP`; names
            not in it are kept as they are).
        image_prefix: prepended to ``Image Index`` to form the cxr/ image name.

    Raises:
        DataError: missing file, missing columns or a bad number.
    """
    path = Path(path)
    mapping = BBOX_LABEL_MAP if label_map is None else dict(label_map)
    if not path.is_file():
        raise DataError(f"bounding-box file not found: {path}")
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read bounding-box file {path}: {e}") from e
    reader = csv.reader(io.StringIO(text))
    header = [c.strip() for c in next(reader, [])]
    missing = [c for c in _BBOX_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header)}"
        )
    col = {c: header.index(c) for c in _BBOX_COLUMNS}
    out: list[BoxAnnotation] = []
    for line, row in enumerate(reader, start=2):
        if not any(v.strip() for v in row):
            continue
        try:
            original = row[col["Image Index"]].strip()
            finding = row[col["Finding Label"]].strip()
            box = Box(*(float(row[col[c]]) for c in _BBOX_COLUMNS[2:]))
        except (IndexError, ValueError) as e:
            raise DataError(f"{path}, line {line}: bad row {row!r}: {e}") from e
        out.append(
            BoxAnnotation(
                image=cxr_image_name(original, image_prefix),
                original=original,
                finding=mapping.get(finding, finding),
                box=box,
            )
        )
    return out


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = (int(v) for v in size)
    return h, w


def scale_box(
    box: Box,
    orig_size: int | Sequence[int] = NIH_ORIGINAL_SIZE,
    image_size: int | Sequence[int] = 256,
) -> Box:
    """A box on an ``orig_size`` image -> the same box on the ``image_size`` resize of it.

    Sizes are a side or ``(height, width)``.
    """
    oh, ow = _hw(orig_size)
    ih, iw = _hw(image_size)
    if min(oh, ow, ih, iw) < 1:
        raise ValueError(f"sizes must be positive, got {orig_size} and {image_size}")
    return box.scaled(iw / ow, ih / oh)


def image_sizes_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """``{image: (height, width)}`` from rows with ``image``, ``h`` and ``w`` columns (the
    cxr labels.csv has them)."""
    out: dict[str, tuple[int, int]] = {}
    for row in rows:
        try:
            out[str(row["image"])] = (int(row["h"]), int(row["w"]))
        except (KeyError, ValueError) as e:
            raise DataError(f"row needs integer 'h' and 'w' columns: {e}") from e
    return out


def boxes_on_images(
    annotations: Iterable[BoxAnnotation],
    image_sizes: Mapping[str, tuple[int, int]],
    orig_size: int | Sequence[int] = NIH_ORIGINAL_SIZE,
) -> dict[tuple[str, str], list[Box]]:
    """``{(image, finding): [boxes on the image]}`` for the annotations whose image is in
    ``image_sizes`` (``{image: (height, width)}``), scaled from ``orig_size``."""
    out: dict[tuple[str, str], list[Box]] = defaultdict(list)
    for a in annotations:
        size = image_sizes.get(a.image)
        if size is not None:
            out[(a.image, a.finding)].append(scale_box(a.box, orig_size, size))
    return dict(out)


# ---------------------------------------------------------------------------------------------
# Heat map measures
# ---------------------------------------------------------------------------------------------


def _heatmap(heatmap: Any) -> np.ndarray:
    h = np.asarray(
        heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else heatmap,
        dtype=np.float64,
    )
    h = np.squeeze(h)
    if h.ndim != 2 or h.size == 0:
        raise ValueError(f"heat map must be 2-D (rows, cols), got shape {np.shape(heatmap)}")
    if not np.isfinite(h).all():
        raise ValueError("heat map contains NaN or infinite values")
    return h


def _boxes(boxes: Box | Sequence[Box]) -> list[Box]:
    out = [boxes] if isinstance(boxes, Box) else list(boxes)
    if not out:
        raise ValueError("give at least one box")
    return out


def upsample_heatmap(heatmap: Any, size: int | Sequence[int]) -> np.ndarray:
    """Bilinear upsampling (``align_corners=False``: cell centres at ``(j + 0.5) * size /
    cols``). Shapes: ``(rows, cols)`` -> ``(H, W)`` float64."""
    h = _heatmap(heatmap)
    out_h, out_w = _hw(size)
    t = torch.from_numpy(h)[None, None]
    up = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return up[0, 0].numpy()


def heatmap_peak(heatmap: Any) -> tuple[int, int]:
    """``(row, col)`` of the highest cell, the first in row-major order on ties."""
    h = _heatmap(heatmap)
    row, col = np.unravel_index(int(np.argmax(h)), h.shape)
    return int(row), int(col)


def cell_centre(
    row: int, col: int, grid: tuple[int, int], size: int | Sequence[int]
) -> tuple[float, float]:
    """``(x, y)`` of the centre of heat-map cell ``(row, col)`` of a ``grid`` spanning the
    model input of ``size`` pixels (a side or ``(height, width)``): the point the pointing
    game tests."""
    rows, cols = grid
    out_h, out_w = _hw(size)
    return (col + 0.5) * out_w / cols, (row + 0.5) * out_h / rows


def pointing_game(
    heatmap: Any,
    boxes: Box | Sequence[Box],
    size: int | Sequence[int],
    tolerance: float = 0.0,
) -> bool:
    """True when the centre of the heat map's peak cell lies in one of ``boxes``.

    Args:
        heatmap: ``(rows, cols)`` map spanning the model input.
        boxes: ground-truth box(es) in model-input pixel coordinates.
        size: the model input, a side or ``(height, width)`` in pixels.
        tolerance: pixels to grow each box by (default 0; the original pointing game used
            15 px at 224 px).
    """
    h = _heatmap(heatmap)
    x, y = cell_centre(*heatmap_peak(h), h.shape, size)
    return any(b.contains(x, y, tolerance) for b in _boxes(boxes))


def predicted_region(
    heatmap: Any,
    size: int | Sequence[int],
    threshold: float = 0.5,
    region: str = "largest",
) -> np.ndarray:
    """The thresholded region of the upsampled heat map, ``(H, W)`` bool.

    ``threshold`` is a fraction of the map's range after min-max normalisation (a flat map
    selects everything). ``region``: ``"largest"`` 8-connected component (ties: the one
    with the highest value), ``"peak"`` (the component holding the maximum) or ``"all"``.
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if region not in _REGIONS:
        raise ValueError(f"region must be one of {_REGIONS}, got {region!r}")
    up = upsample_heatmap(heatmap, size)
    lo, hi = float(up.min()), float(up.max())
    if hi <= lo:
        return np.ones(up.shape, dtype=bool)
    norm = (up - lo) / (hi - lo)
    mask = norm >= threshold
    if region == "all":
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    if region == "peak":
        peak = np.unravel_index(int(np.argmax(norm)), norm.shape)
        return np.asarray(labels == labels[peak])
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    maxima = np.asarray(ndimage.maximum(norm, labels, index=np.arange(1, n + 1)))
    best = max(range(n), key=lambda i: (sizes[i], maxima[i]))
    return np.asarray(labels == best + 1)


def _coverage(lo: float, hi: float, n: int) -> np.ndarray:
    """Length of ``[lo, hi)`` inside each unit pixel ``[i, i + 1)``, ``i < n``."""
    edges = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0.0, 1.0)


def iobb(
    heatmap: Any,
    boxes: Box | Sequence[Box],
    size: int | Sequence[int],
    threshold: float = 0.5,
    region: str = "largest",
    shape: str = "box",
) -> float:
    """Intersection over the predicted region's area (ChestX-ray8), best over ``boxes``.

    Args:
        heatmap: ``(rows, cols)`` map spanning the model input.
        boxes: ground-truth box(es) in model-input pixel coordinates.
        size: the model input, a side or ``(height, width)``.
        threshold: fraction of the normalised map's range kept (default 0.5).
        region: ``"largest"`` (default), ``"peak"`` or ``"all"`` (see
            :func:`predicted_region`).
        shape: ``"box"`` (default, the region's bounding box, as ChestX-ray8 draws it) or
            ``"mask"`` (the region's pixels).

    Returns:
        IoBB in [0, 1].
    """
    if shape not in _SHAPES:
        raise ValueError(f"shape must be one of {_SHAPES}, got {shape!r}")
    gts = _boxes(boxes)
    mask = predicted_region(heatmap, size, threshold, region)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if shape == "box":
        pred = Box(
            float(cols[0]),
            float(rows[0]),
            float(cols[-1] + 1 - cols[0]),
            float(rows[-1] + 1 - rows[0]),
        )
        return max(pred.intersection(b) / pred.area for b in gts)
    area = float(mask.sum())
    out_h, out_w = mask.shape
    best = 0.0
    for b in gts:
        cover = np.outer(_coverage(b.y, b.y2, out_h), _coverage(b.x, b.x2, out_w))
        best = max(best, float((cover * mask).sum()) / area)
    return best


@dataclass
class LocalisationResult:
    """One (image, finding) scored against its boxes."""

    image: str
    finding: str
    pointing: bool
    iobb: float


def localise(
    image: str,
    finding: str,
    heatmap: Any,
    boxes: Box | Sequence[Box],
    size: int | Sequence[int],
    threshold: float = 0.5,
    region: str = "largest",
    shape: str = "box",
    tolerance: float = 0.0,
) -> LocalisationResult:
    """Pointing game and IoBB of one heat map (arguments as for :func:`pointing_game` and
    :func:`iobb`)."""
    return LocalisationResult(
        image=image,
        finding=finding,
        pointing=pointing_game(heatmap, boxes, size, tolerance),
        iobb=iobb(heatmap, boxes, size, threshold, region, shape),
    )


def wilson_ci(successes: int, n: int, level: float = 0.95) -> list[float | None]:
    """Wilson score interval of a proportion (``[None, None]`` when ``n == 0``)."""
    if n == 0:
        return [None, None]
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def _summary(results: Sequence[LocalisationResult], level: float) -> dict[str, Any]:
    n = len(results)
    hits = sum(r.pointing for r in results)
    out: dict[str, Any] = {
        "pointing": hits / n if n else None,
        "pointing_ci": wilson_ci(hits, n, level),
    }
    for t in IOBB_LEVELS:
        key = "iobb_" + str(t).replace(".", "_")
        k = sum(r.iobb > t for r in results)
        out[key] = k / n if n else None
        out[key + "_ci"] = wilson_ci(k, n, level)
    out["mean_iobb"] = float(np.mean([r.iobb for r in results])) if n else None
    out["n"] = n
    return out


def localisation_report(
    results: Iterable[LocalisationResult],
    ci: float = 0.95,
    include_overall: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per finding: ``{"pointing", "pointing_ci": [lo, hi], "iobb_0_1", "iobb_0_1_ci",
    "iobb_0_25", "iobb_0_25_ci", "mean_iobb", "n"}`` with Wilson CIs at level ``ci``; plus
    ``"overall"`` pooled over every result when ``include_overall``."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    by_finding: dict[str, list[LocalisationResult]] = defaultdict(list)
    everything: list[LocalisationResult] = []
    for r in results:
        by_finding[r.finding].append(r)
        everything.append(r)
    out = {name: _summary(rs, ci) for name, rs in sorted(by_finding.items())}
    if include_overall:
        out["overall"] = _summary(everything, ci)
    return out
