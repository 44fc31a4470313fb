"""Training data: the train / val datasets a ``[data]`` section names, an in-memory image
cache, seeded batches and batched augmentation.

Datasets here yield the *letterboxed* image in [0, 1] (step 1 of
:class:`~models.transforms.Preprocess`); augmentation and normalisation (steps 2 and 3)
run on whole batches on the training device (:func:`augment_batch`,
:func:`normalise_batch`). Per-sample MONAI affines cost about 3 ms an image on this CPU, a
batched ``grid_sample`` about 0.3 ms; the parameters are still drawn per sample from the
dataset's ``(seed, epoch, index)`` generator in the order ``Preprocess.augment`` draws them,
so a run is reproducible whatever the batch composition, worker count or device.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from models.data import (
    CsvImageDataset,
    DicomFolderDataset,
    LabelledImageDataset,
    NpzDataset,
    labels_summary,
)
from models.errors import DataError
from models.splits import label_fraction_subset, patient_split
from models.train_config import DataConfig
from models.transforms import Preprocess, PreprocessConfig

log = logging.getLogger(__name__)

#: Images per batch when filling the cache.
_CACHE_BATCH = 64


@dataclass
class Batch:
    """One training or validation batch.

    Attributes:
        images: (B, 1, S, S) float32 letterboxed images in [0, 1] (not yet normalised).
        labels: (B, K) float32 0/1.
        mask: (B, K) float32, 1 where the label is known.
        indices: (B,) int64 positions in the dataset (for augmentation draws and reports).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor


@dataclass
class TrainData:
    """The two sides of a training run and where they came from."""

    train: LabelledImageDataset
    val: LabelledImageDataset
    label_names: list[str]  # the training targets, in output order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    notes: list[str] = field(default_factory=list)  # how train / val were chosen

    def summary(self) -> dict[str, Any]:
        """Counts for the checkpoint's ``data`` entry (no image decoded)."""
        return {
            "train": labels_summary(self.train),
            "val": labels_summary(self.val),
            "skipped_images": [list(s) for s in self.skipped[:100]],
            "n_skipped": len(self.skipped),
            "notes": list(self.notes),
        }


def base_preprocess(config: PreprocessConfig) -> Preprocess:
    """The deterministic letterbox step only (no augmentation, no normalisation)."""
    return Preprocess(
        PreprocessConfig(image_size=config.image_size, resize=config.resize, normalize="none")
    )


def _csv_columns(path: str) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels CSV {path}: {e}") from e
    return [c.strip() for c in header]


def build_datasets(
    config: DataConfig, preprocess: PreprocessConfig, *, seed: int = 0, strict: bool = False
) -> TrainData:
    """Train and val datasets for a ``[data]`` section (see :class:`DataConfig`).

    Args:
        config: the ``[data]`` section.
        preprocess: gives the letterbox size and mode.
        seed: augmentation seed of the training set.
        strict: missing or unreadable images are fatal (default: skipped and listed).

    Raises:
        DataError: missing files or columns, bad labels, an empty train or val split,
            ``strict`` with a bad image.
    """
    transform = base_preprocess(preprocess)
    targets = config.targets
    notes: list[str] = []
    train: LabelledImageDataset
    val: LabelledImageDataset
    if config.kind == "npz":
        assert config.npz is not None
        if len(config.train_splits) != 1:
            raise DataError("data.train_split must be one name for an npz file")
        train_all = NpzDataset(
            config.npz, config.train_splits[0], config.label_names, transform=transform, seed=seed
        )
        val_all = NpzDataset(
            config.npz, config.val_split, config.label_names, transform=transform, seed=seed
        )
        train = _keep_columns(train_all, targets)
        val = _keep_columns(val_all, targets)
        train_idx = _source_filter(train, config.sources)
        val_idx = _source_filter(val, config.sources)
        notes.append(f"npz arrays {config.train_splits[0]!r} / {config.val_split!r}")
    else:
        assert config.labels is not None and config.images is not None
        columns = _csv_columns(config.labels)
        has_split = "split" in columns
        use_column = has_split and config.val_fraction is None
        splits: list[str] | None
        if use_column:
            splits = [*config.train_splits, config.val_split]
        else:
            splits = config.train_splits if has_split else None
        kwargs: dict[str, Any] = dict(
            split=splits, transform=transform, strict=strict, verify=config.verify, seed=seed
        )
        if config.kind == "dicom":
            ds: CsvImageDataset = DicomFolderDataset(
                config.images, config.labels, targets, **kwargs
            )
        else:
            ds = CsvImageDataset(config.labels, config.images, targets, **kwargs)
        keep = _source_filter(ds, config.sources)
        if use_column:
            wanted = set(config.train_splits)
            train_idx = [i for i in keep if ds.rows[i].get("split", "").strip() in wanted]
            val_idx = [i for i in keep if ds.rows[i].get("split", "").strip() == config.val_split]
            notes.append(f"split column: train = {config.train_splits}, val = {config.val_split!r}")
        else:
            fraction = config.val_fraction if config.val_fraction is not None else 0.2
            if not keep:
                raise DataError(f"{config.labels}: no rows left after data.sources")
            rows = [ds.rows[i] for i in keep]
            parts = patient_split(
                rows,
                (1.0 - fraction, fraction),
                seed=config.split_seed,
                stratify_key=config.stratify,
            )
            train_idx = [keep[i] for i in parts["train"]]
            val_idx = [keep[i] for i in parts["val"]]
            where = f"rows with split in {config.train_splits}" if has_split else "all rows"
            notes.append(
                f"patient-wise split of {where}: val fraction {fraction}, seed "
                f"{config.split_seed}"
                + (f", stratified by {config.stratify}" if config.stratify else "")
            )
        train, val = ds, ds
    if not train_idx:
        raise DataError(f"the training split is empty ({_describe(config)})")
    if not val_idx:
        raise DataError(f"the validation split is empty ({_describe(config)})")
    if config.label_fraction < 1:
        rows_for = getattr(train, "rows", None)
        train_idx = label_fraction_subset(
            train_idx, config.label_fraction, seed=config.split_seed, rows=rows_for
        )
        notes.append(
            f"label fraction {config.label_fraction}: {len(train_idx)} training images "
            "(patient-wise)"
        )
    if config.exclude_findings:
        notes.append(f"excluded from training: {', '.join(config.exclude_findings)}")
    skipped = list(train.skipped) + (list(val.skipped) if val is not train else [])
    return TrainData(
        train=train.subset(train_idx),
        val=val.subset(val_idx),
        label_names=list(targets),
        skipped=skipped,
        notes=notes,
    )


def _describe(config: DataConfig) -> str:
    if config.kind == "npz":
        return f"{config.npz}, arrays {config.train_split!r} / {config.val_split!r}"
    parts = [str(config.labels)]
    if config.sources:
        parts.append(f"sources {config.sources}")
    return ", ".join(parts)


def _source_filter(ds: LabelledImageDataset, sources: Sequence[str] | None) -> list[int]:
    if not sources:
        return list(range(len(ds)))
    prefixes = tuple(sources)
    return [i for i, s in enumerate(ds.sources) if s.startswith(prefixes)]


def _keep_columns(ds: NpzDataset, names: Sequence[str]) -> NpzDataset:
    if list(names) == ds.label_names:
        return ds
    cols = [ds.label_names.index(n) for n in names]
    ds.labels = ds.labels[:, cols]
    ds.mask = ds.mask[:, cols]
    ds.label_names = list(names)
    return ds


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of ``epoch``: a function of ``(seed, epoch)`` only, so a resumed run
    sees the same order."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class ImageSource:
    """Batches of letterboxed images from a dataset, decoded on the fly or from memory.

    Args:
        dataset: a dataset whose transform is :func:`base_preprocess`.
        cache: decode every image once now and keep it as uint8 (``(N, S, S)``, 16 KB an
            image at 128 px).
        num_workers: DataLoader workers for on-the-fly decoding.
        progress: progress bar while filling the cache.
        pin_memory: pin batches (CUDA).
    """

    def __init__(
        self,
        dataset: LabelledImageDataset,
        *,
        cache: bool = False,
        num_workers: int = 0,
        progress: bool = False,
        pin_memory: bool = False,
        desc: str = "caching images",
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.images: torch.Tensor | None = None
        # with the cache: the dataset position whose image fills each slot (a file unreadable
        # at caching time is replaced by the next readable one, as on-the-fly decoding does)
        self.origin = torch.arange(len(dataset))
        if cache:
            self.images = self._fill(progress, desc)

    def __len__(self) -> int:
        return len(self.dataset)

    def _fill(self, progress: bool, desc: str) -> torch.Tensor:
        n = len(self.dataset)
        workers = 0 if n < 4 * _CACHE_BATCH else min(4, os.cpu_count() or 1)
        loader = DataLoader(
            self.dataset, batch_size=_CACHE_BATCH, shuffle=False, num_workers=workers
        )
        out: torch.Tensor | None = None
        bar = tqdm(
            total=n,
            desc=desc,
            unit="img",
            file=sys.stderr,
            disable=not progress or not sys.stderr.isatty(),
            leave=False,
        )
        with bar:
            start = 0
            for x, _, _, meta in loader:
                if out is None:
                    out = torch.empty((n, *x.shape[-2:]), dtype=torch.uint8)
                out[start : start + len(x)] = (
                    (x[:, 0] * 255.0).round_().clamp_(0, 255).to(torch.uint8)
                )
                self.origin[start : start + len(x)] = meta["index"]
                start += len(x)
                bar.update(len(x))
        assert out is not None
        return out

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches in a seeded order (a function of ``(seed, epoch)``) or in dataset order."""
        n = len(self.dataset)
        if shuffle:
            g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if drop_last and n >= batch_size:
            order = order[: n - n % batch_size]
        if self.images is not None:
            labels = torch.from_numpy(np.ascontiguousarray(self.dataset.labels))
            mask = torch.from_numpy(np.ascontiguousarray(self.dataset.mask))
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                x = self.images[idx].unsqueeze(1).float().div_(255.0)  # (B, 1, S, S)
                used = self.origin[idx]  # labels, boxes and augmentation follow the image
                yield Batch(x, labels[used], mask[used], used)
            return
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )
        for x, y, m, meta in loader:
            yield Batch(x, y, m, meta["index"].long())

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self.dataset)
        if drop_last and n >= batch_size:
            return n // batch_size
        return math.ceil(n / batch_size)


# ---------------------------------------------------------------------------------------------
# Batched augmentation and normalisation
# ---------------------------------------------------------------------------------------------


def draw_augmentation(
    dataset: LabelledImageDataset, indices: torch.Tensor, config: PreprocessConfig
) -> torch.Tensor:
    """Per-sample augmentation parameters from each sample's ``(seed, epoch, index)``
    generator, drawn in the order of :meth:`Preprocess.augment`.

    Shapes:
        returns (B, 6): rotation (radians), shift x, shift y (pixels), zoom, contrast
        factor, brightness offset.
    """
    c = config
    shift = c.translate * c.image_size
    lo = torch.tensor(
        [-c.rotate_deg, -shift, -shift, 1 - c.scale, 1 - c.contrast, -c.brightness],
        dtype=torch.float64,
    )
    hi = torch.tensor(
        [c.rotate_deg, shift, shift, 1 + c.scale, 1 + c.contrast, c.brightness],
        dtype=torch.float64,
    )
    u = torch.empty(len(indices), 6, dtype=torch.float64)
    for row, i in enumerate(indices.tolist()):
        g = dataset.generator(int(i))
        u[row] = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for _ in range(6)])
    params = lo + (hi - lo) * u
    params[:, 0] = torch.deg2rad(params[:, 0])
    return params.float()


def affine_theta(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The augmentation's ``affine_grid`` matrices: each maps a point of the augmented image to
    the point of the original it is sampled from, in ``[-1, 1]`` coordinates
    (``align_corners=False``: a continuous pixel coordinate ``u`` is ``2 u / size - 1``).

    Shapes:
        params: (B, 6) from :func:`draw_augmentation`; returns (B, 2, 3) float32.
    """
    p = params.to(torch.float32)
    angle, tx, ty, zoom = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coordinates to input ones: the inverse transform
    tx_n, ty_n = 2.0 * tx / width, 2.0 * ty / height
    return torch.stack(
        [
            torch.stack([cos, -sin, -(cos * tx_n - sin * ty_n)], 1),
            torch.stack([sin, cos, -(sin * tx_n + cos * ty_n)], 1),
        ],
        1,
    )  # (B, 2, 3)


def warp_batch(images: torch.Tensor, params: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """The geometric part of :func:`augment_batch` (rotation, shift, zoom about the centre,
    zero padding), on any number of channels: images, or masks that must follow them.

    Shapes:
        images: (B, C, S, S); params: (B, 6) from :func:`draw_augmentation`;
        returns (B, C, S, S).
    """
    b, c, h, w = images.shape
    theta = affine_theta(params.to(images.device), h, w)
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    return F.grid_sample(
        images.to(torch.float32), grid, mode=mode, padding_mode="zeros", align_corners=False
    )


def augment_batch(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Random affine (about the centre, zero padding, bilinear) and brightness / contrast,
    as :meth:`Preprocess.augment` does per image, on a whole batch.

    Shapes:
        images: (B, 1, S, S) in [0, 1]; params: (B, 6) from :func:`draw_augmentation`;
        returns (B, 1, S, S) in [0, 1].
    """
    b = images.shape[0]
    x = warp_batch(images, params)
    _, _, _, _, factor, offset = params.to(device=images.device, dtype=torch.float32).unbind(1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (x - mean) * factor.view(b, 1, 1, 1) + mean + offset.view(b, 1, 1, 1)
    return x.clamp_(0.0, 1.0)


def normalise_batch(images: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """The normalisation of :meth:`Preprocess.normalise`, per image of a batch.

    Shapes:
        images: (B, 1, S, S) -> (B, 1, S, S).
    """
    if config.normalize == "image":
        flat = images.flatten(1)  # (B, S * S)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
        return (images - mean) / std
    if config.normalize == "fixed":
        return (images - config.mean) / config.std
    return images


# ---------------------------------------------------------------------------------------------
# Reports (contrastive loss)
# ---------------------------------------------------------------------------------------------


@dataclass
class ReportFeatures:
    """Sentence vectors of the training reports.

    Attributes:
        features: (N, H) one row per training sample (zeros where it has no report).
        groups: (N,) id of the report text (equal texts share an id; -1 without report).
    """

    features: torch.Tensor
    groups: torch.Tensor

    @property
    def available(self) -> bool:
        return bool((self.groups >= 0).any())


def report_features(dataset: LabelledImageDataset, encoder: Any, progress: bool) -> ReportFeatures:
    """Encode each distinct non-empty report of ``dataset`` once with ``encoder`` (anything
    with ``encode(texts, progress)``)."""
    texts = [r.strip() for r in dataset.reports]
    distinct = sorted({t for t in texts if t})
    ids = {t: i for i, t in enumerate(distinct)}
    groups = torch.tensor([ids.get(t, -1) for t in texts], dtype=torch.long)
    if not distinct:
        return ReportFeatures(torch.zeros(len(texts), 1), groups)
    vectors = encoder.encode(distinct, progress=progress).float()  # (U, H)
    features = torch.zeros(len(texts), vectors.shape[1])
    has = groups >= 0
    features[has] = vectors[groups[has]]
    return ReportFeatures(features, groups)


def has_reports(dataset: LabelledImageDataset) -> bool:
    """Whether any sample carries a report text."""
    return any(r.strip() for r in dataset.reports)
