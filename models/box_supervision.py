"""Radiologist boxes of the training images as targets for the findings' heat maps.

Classification labels alone left the heat maps (the patch-pooling weights) pointing at a
location prior rather than at the findings (MODEL_CARD.md). With ``train.box_weight > 0`` and
``data.boxes`` naming ``BBox_List_2017.csv(.gz)``, every training image that has boxes adds,
for each boxed finding that is not a known negative, the loss ``-log(mass of the finding's
heat map on the box's cells)`` (:func:`box_attention_loss`), weighted by ``box_weight``.

A box's cells are those whose centres lie inside it, edges included, exactly as the pointing
game counts a hit (each cell centre is taken back through the image's augmentation,
:func:`~models.train_data.affine_theta`); a box too small to hold a cell centre targets the
cell it covers most (the box rasterised and warped with the image,
:func:`~models.train_data.warp_batch`). Boxes are scaled from the 1,024 px originals to the
image, then through its letterbox (:meth:`~models.transforms.Geometry.box_to_model`). Only
training rows get boxes here; the validation and test rows' boxes stay for measuring.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.data import CsvImageDataset
from models.errors import ConfigError, DataError
from models.localisation import NIH_ORIGINAL_SIZE, Box, cell_centre, read_bbox_csv, scale_box
from models.train_config import TrainingConfig
from models.train_data import TrainData, affine_theta, base_preprocess, warp_batch
from models.transforms import Preprocess

__all__ = ["BoxTargets", "box_attention_loss", "box_targets_for", "training_boxes"]

log = logging.getLogger(__name__)


@dataclass
class BoxTargets:
    """The boxes of a training dataset, in model-input pixels.

    Attributes:
        boxes: per dataset index, ``(column, box)`` pairs: the finding's column in the labels
            and one of its boxes (a finding may have several).
        size: side of the model input the boxes are on.
        skipped_negative: boxes dropped because their finding is a known negative there.
    """

    boxes: list[list[tuple[int, Box]]]
    size: int
    skipped_negative: int = 0

    @property
    def n_images(self) -> int:
        """Images with at least one box."""
        return sum(1 for found in self.boxes if found)

    @property
    def n_boxes(self) -> int:
        """Boxes kept."""
        return sum(len(found) for found in self.boxes)

    def cell_targets(
        self,
        indices: torch.Tensor,
        num_labels: int,
        grid: tuple[int, int],
        params: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The target cells of a batch's boxed findings.

        Args:
            indices: (B,) dataset indices of the batch.
            num_labels: ``K``, the label columns.
            grid: (rows, cols) of the heat maps.
            params: (B, 6) augmentation parameters of the batch
                (:func:`~models.train_data.draw_augmentation`), or ``None`` (no augmentation).
            device: where the results go.

        Returns:
            ``target`` (B, K, rows * cols) bool, the cells a finding's heat map should weigh,
            and ``has`` (B, K) bool, the findings with a box in the image.
        """
        rows, cols = grid
        s = self.size
        target = torch.zeros(len(indices), num_labels, rows * cols, dtype=torch.bool)
        has = torch.zeros(len(indices), num_labels, dtype=torch.bool)
        pairs: list[tuple[int, int, list[Box]]] = []  # (batch row, column, its boxes)
        for row, i in enumerate(indices.tolist()):
            by_column: dict[int, list[Box]] = defaultdict(list)
            for column, box in self.boxes[i]:
                by_column[column].append(box)
            pairs += [(row, column, found) for column, found in by_column.items()]
        if not pairs:
            return target.to(device), has.to(device)
        # a hit needs a cell centre inside a box, as the pointing game counts it: each centre
        # is taken back through the augmentation to the letterboxed image's pixels
        centres = torch.tensor(
            [cell_centre(r, c, grid, s) for r in range(rows) for c in range(cols)]
        )  # (P, 2)
        which = torch.tensor([row for row, _, _ in pairs])
        if params is not None:
            theta = affine_theta(params.cpu()[which], s, s)  # (n, 2, 3)
            normal = torch.cat([2.0 * centres / s - 1.0, torch.ones(len(centres), 1)], 1)
            sources = (normal @ theta.transpose(1, 2) + 1.0) * s / 2.0  # (n, P, 2)
        else:
            sources = centres.expand(len(pairs), -1, -1)
        small: list[int] = []  # boxes too small to hold a centre
        for n, (row, column, found) in enumerate(pairs):
            hit = torch.tensor(
                [any(b.contains(x, y) for b in found) for x, y in sources[n].tolist()]
            )
            if bool(hit.any()):
                target[row, column], has[row, column] = hit, True
            else:
                small.append(n)
        if small:  # the cell each covers most, its mask warped with the image
            masks = torch.stack([_raster(pairs[n][2], s) for n in small]).unsqueeze(1)
            if params is not None:
                masks = warp_batch(masks, params.cpu()[which[small]], mode="nearest")
            cover = F.adaptive_avg_pool2d(masks, (rows, cols)).flatten(1)  # (m, P)
            for n, c in zip(small, cover, strict=True):
                if float(c.max()) > 0:  # else augmented out of view
                    row, column, _ = pairs[n]
                    target[row, column], has[row, column] = c == c.max(), True
        return target.to(device), has.to(device)

    def loss(
        self,
        attention: torch.Tensor,
        grid: tuple[int, int],
        indices: torch.Tensor,
        params: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`box_attention_loss` of a batch's heat maps (B, K, rows * cols) against its
        boxes (see :meth:`cell_targets`)."""
        target, has = self.cell_targets(
            indices, attention.shape[1], grid, params, device=attention.device
        )
        return box_attention_loss(attention, target, has)


def _raster(boxes: Sequence[Box], size: int) -> torch.Tensor:
    """A ``(size, size)`` mask of the pixels the boxes touch."""
    mask = torch.zeros(size, size)
    for b in boxes:
        r0, c0 = int(np.floor(b.y)), int(np.floor(b.x))
        r1, c1 = max(int(np.ceil(b.y2)), r0 + 1), max(int(np.ceil(b.x2)), c0 + 1)
        mask[max(r0, 0) : min(r1, size), max(c0, 0) : min(c1, size)] = 1
    return mask


def box_targets_for(
    dataset: CsvImageDataset,
    boxes_csv: str | Path,
    preprocess: Preprocess,
    label_names: Sequence[str] | None = None,
) -> BoxTargets:
    """The boxes of ``boxes_csv`` that fall on ``dataset``'s images, in model-input pixels.

    Args:
        dataset: the training rows (a labels CSV with ``h`` and ``w`` columns; otherwise each
            boxed image is decoded for its size).
        boxes_csv: ``BBox_List_2017.csv(.gz)`` (boxes on the 1,024 px NIH originals).
        preprocess: the letterbox of the training images.
        label_names: the dataset's label columns (default ``dataset.label_names``); boxes of
            other findings are ignored.

    Raises:
        DataError: an unreadable box file, or no box on any of the dataset's images.
    """
    names = list(label_names if label_names is not None else dataset.label_names)
    annotations = read_bbox_csv(boxes_csv)
    by_image: dict[str, list[tuple[str, Box]]] = defaultdict(list)
    for a in annotations:
        by_image[a.image].append((a.finding, a.box))
    out: list[list[tuple[int, Box]]] = [[] for _ in dataset.ids]
    skipped = 0
    for i, image in enumerate(dataset.ids):
        found = by_image.get(image)
        if not found:
            continue
        height, width = _image_size(dataset, i)
        geometry = preprocess.geometry(height, width)
        for finding, box in found:
            if finding not in names:
                continue
            k = names.index(finding)
            if dataset.mask[i, k] > 0 and dataset.labels[i, k] <= 0:
                skipped += 1
                continue
            on_image = scale_box(box, NIH_ORIGINAL_SIZE, (height, width))
            out[i].append((k, Box(*geometry.box_to_model(on_image.as_tuple()))))
    targets = BoxTargets(out, preprocess.size, skipped)
    if not targets.n_images:
        raise DataError(
            f"{boxes_csv}: no box of the findings {', '.join(names)} falls on a training image"
        )
    return targets


def training_boxes(config: TrainingConfig, data: TrainData) -> BoxTargets | None:
    """The training rows' boxes when ``train.box_weight > 0``, else ``None``.

    Raises:
        ConfigError: box supervision without a labels CSV; DataError: see
            :func:`box_targets_for`.
    """
    if config.train.box_weight <= 0:
        return None
    if config.data.boxes is None or not isinstance(data.train, CsvImageDataset):
        raise ConfigError("train.box_weight > 0 needs data.boxes and a labels CSV")
    preprocess = base_preprocess(config.preprocess_config())
    boxes = box_targets_for(data.train, config.data.boxes, preprocess, data.label_names)
    log.info(
        "box supervision: %d boxes on %d training images (%d on known negatives skipped)",
        boxes.n_boxes,
        boxes.n_images,
        boxes.skipped_negative,
    )
    return boxes


def box_attention_loss(
    attention: torch.Tensor, target: torch.Tensor, has: torch.Tensor
) -> torch.Tensor:
    """``-log`` of each boxed finding's heat-map mass on its target cells, averaged.

    Args:
        attention: (B, K, P) each finding's heat map over the patches (sums to 1).
        target: (B, K, P) bool target cells (:meth:`BoxTargets.cell_targets`).
        has: (B, K) bool, the findings that have a box.

    Shapes:
        returns a scalar tensor (0, still attached to ``attention``, when nothing is boxed).
    """
    if attention.shape != target.shape or attention.shape[:2] != has.shape:
        raise ValueError(
            f"attention {tuple(attention.shape)}, target {tuple(target.shape)} and has "
            f"{tuple(has.shape)} do not match"
        )
    if not bool(has.any()):
        return attention.sum() * 0.0
    mass = (attention.float() * target.to(torch.float32)).sum(-1)[has]  # (n,)
    return -torch.log(mass.clamp_min(1e-6)).mean()


def _image_size(dataset: CsvImageDataset, index: int) -> tuple[int, int]:
    row = dataset.rows[index]
    try:
        return int(row["h"]), int(row["w"])
    except (KeyError, ValueError):
        image = dataset.load(index)
        return int(image.shape[0]), int(image.shape[1])
