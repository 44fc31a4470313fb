"""Datasets of labelled chest radiographs: a labels CSV + image folder, MedMNIST ``.npz``,
and a folder of DICOM files.

Every dataset yields ``(image, labels, mask, meta)``:

- ``image``: float32 tensor ``(1, H, W)``; the transform's output, or the decoded image in
  [0, 1] at its own size when ``transform`` is None;
- ``labels``: float32 ``(K,)`` 0/1 in the order of ``label_names``;
- ``mask``: float32 ``(K,)``, 1 where the label is known, 0 where it is UNKNOWN (masked in
  the loss and the metrics; the stored label is then 0);
- ``meta``: ``{"id", "patient", "path", "source", "report": str, "index", "height", "width":
  int}`` (``height`` / ``width``: the decoded image before the transform), so the default
  ``torch.utils.data.default_collate`` batches it.

The label arrays (``labels``, ``mask``), ids and patients are held in memory, so summaries,
splits and metrics never decode an image. With a training :class:`~models.transforms.
Preprocess`, a sample's augmentation is seeded by ``(seed, epoch, index)``: reproducible in
any number of worker processes; call :meth:`set_epoch` each epoch.
"""

from __future__ import annotations

import abc
import copy
import csv
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import numpy as np
import pydicom
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from models.dicom_pixels import dicom_to_array
from models.errors import DataError
from models.transforms import Preprocess

log = logging.getLogger(__name__)

#: The labels of ``../shared/data/cxr/labels.csv``: the 14 NIH ChestX-ray14 findings.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
#: All 15 label columns of the cxr CSV format (the findings and ``No_Finding``).
CXR_LABELS: tuple[str, ...] = (*NIH_FINDINGS, "No_Finding")

#: ``labeled_findings`` value meaning every label column is a real label.
ALL_LABELED = "ALL"
#: How a row's image is checked when the dataset is built: ``"none"``, ``"exists"`` (the file
#: is there), ``"header"`` (it opens as an image: cheap), ``"decode"`` (fully decoded).
VERIFY_MODES = ("none", "exists", "header", "decode")
_UNKNOWN_VALUES = frozenset({"", "-1", "-1.0", "nan", "NaN", "NA", "na"})
_POSITIVE_VALUES = frozenset({"1", "1.0", "True", "true"})
_NEGATIVE_VALUES = frozenset({"0", "0.0", "False", "false"})
_DICOM_MAGIC_OFFSET = 128

Transform = Callable[..., torch.Tensor]
Item = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]
_D = TypeVar("_D", bound="LabelledImageDataset")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image -> float32 ``(H, W)`` grayscale in [0, 1].

    EXIF orientation is applied. 8-bit, palette, RGB(A) and LA images go through
    ``convert("L")`` (ITU-R 601 luma; alpha dropped). 16/32-bit integer images (``I;16*``,
    ``I``) are divided by ``2**bits - 1`` with ``bits`` the effective bit depth of the data
    (at least 8: 12-bit values stored in 16-bit PNGs span the full range, as a 12-bit
    detector intends); negative integer and float (``F``) images are min-max scaled, NaN and
    infinite values becoming 0 first (as in :func:`models.dicom_pixels.dicom_to_array`).
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.ndim == 3:
            values = values[..., 0]
        if mode == "F":
            values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(values.min()), float(values.max())
        if mode == "F" or lo < 0:
            out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        else:
            bits = max(8, int(hi).bit_length())
            out = values / float(2**bits - 1)
        return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    return np.ascontiguousarray(gray / 255.0)


def is_dicom(source: str | Path | IO[bytes]) -> bool:
    """True when the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    else:
        pos = source.tell()
        head = source.read(_DICOM_MAGIC_OFFSET + 4)
        source.seek(pos)
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def load_dicom(source: str | Path | IO[bytes], frame: int = 0) -> np.ndarray:
    """Read a DICOM file and decode ``frame`` with :func:`~models.dicom_pixels.dicom_to_array`.

    Returns a float32 ``(H, W)`` array in [0, 1]; raises :class:`DataError` when unreadable.
    """
    try:
        ds = pydicom.dcmread(source, force=True)
    except Exception as e:  # pydicom raises several types on corrupt input
        raise DataError(f"not a readable DICOM file: {e}") from e
    return dicom_to_array(ds, frame=frame)


def load_image(source: str | Path | IO[bytes]) -> np.ndarray:
    """Decode a PNG / JPEG / other PIL-readable file, or a DICOM file (by its preamble or a
    ``.dcm`` suffix), to a float32 ``(H, W)`` grayscale array in [0, 1].

    Raises:
        DataError: the file cannot be read or decoded.
    """
    try:
        suffix = Path(source).suffix.lower() if isinstance(source, (str, Path)) else ""
        if suffix in (".dcm", ".dicom") or is_dicom(source):
            return load_dicom(source)
        with Image.open(source) as image:
            return pil_to_array(image)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image: {e}") from e


def _check_image(path: Path, verify: str, dicom: bool) -> str | None:
    """Why ``path`` is unusable under the ``verify`` level, or None when it is fine."""
    if verify == "none":
        return None
    if not path.is_file():
        return "missing file"
    if verify == "exists":
        return None
    try:
        if verify == "decode":
            if dicom:
                load_dicom(path)
            else:
                load_image(path)
        elif dicom:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                return "unreadable: not a DICOM image (no Rows/Columns)"
        elif is_dicom(path):
            pydicom.dcmread(path, stop_before_pixels=True)
        else:
            with Image.open(path) as image:
                image.size  # noqa: B018 - the header parse is the check
    except DataError as e:
        return f"unreadable: {e}"
    except Exception as e:  # any decoder failure means the row is skipped, not the run
        return f"unreadable: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Base dataset
# ---------------------------------------------------------------------------------------------


class LabelledImageDataset(Dataset[Item], abc.ABC):
    """Common machinery: label arrays, per-sample seeding, transform, meta.

    Attributes:
        label_names: the ``K`` target label names, in output order.
        labels: ``(N, K)`` float32 0/1 (0 where unknown).
        mask: ``(N, K)`` float32, 1 where the label is known.
        ids, patients, paths, sources, reports: per-sample strings.
        skipped: ``(image, reason)`` of every row left out (missing or unreadable files).
    """

    def __init__(
        self,
        label_names: Sequence[str],
        transform: Transform | None = None,
        seed: int = 0,
        strict: bool = False,
    ):
        self.label_names = _check_label_names(label_names)
        self.transform = transform
        self.seed = int(seed)
        self.strict = strict
        self.epoch = 0
        self.labels = np.zeros((0, len(self.label_names)), dtype=np.float32)
        self.mask = np.zeros((0, len(self.label_names)), dtype=np.float32)
        self.ids: list[str] = []
        self.patients: list[str] = []
        self.paths: list[str] = []
        self.sources: list[str] = []
        self.reports: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    # -- subclasses ----------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, index: int) -> np.ndarray:
        """Decode sample ``index`` to a float32 ``(H, W)`` array in [0, 1]."""

    def _take(self: _D, indices: np.ndarray) -> _D:
        """A shallow copy keeping ``indices`` of every per-sample field."""
        out = copy.copy(self)
        out.labels = self.labels[indices]
        out.mask = self.mask[indices]
        for name in ("ids", "patients", "paths", "sources", "reports"):
            values = getattr(self, name)
            setattr(out, name, [values[i] for i in indices])
        return out

    # -- public --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_skipped(self) -> int:
        """How many rows were left out (see :attr:`skipped`)."""
        return len(self.skipped)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws: sample ``i`` of epoch ``e`` is seeded by
        ``(seed, e, i)``. Call it before creating the epoch's DataLoader iterator; workers
        of a ``persistent_workers=True`` loader keep the epoch they started with."""
        self.epoch = int(epoch)

    def subset(self: _D, indices: Iterable[int]) -> _D:
        """A dataset of the given sample positions (e.g. one side of :func:`~models.splits.
        patient_split`), sharing files and settings with this one."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"subset indices must be in [0, {len(self) - 1}]")
        return self._take(idx)

    def generator(self, index: int) -> torch.Generator:
        """The random generator that drives sample ``index``'s augmentation this epoch."""
        state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(2)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def meta(self, index: int) -> dict[str, Any]:
        """The ``meta`` dict of sample ``index`` without its image size (no decoding)."""
        return {
            "id": self.ids[index],
            "patient": self.patients[index],
            "path": self.paths[index],
            "source": self.sources[index],
            "report": self.reports[index],
            "index": int(index),
        }

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        image, used = self._load_or_replace(index)
        meta = self.meta(used)
        meta["height"], meta["width"] = int(image.shape[0]), int(image.shape[1])
        if self.transform is None:
            x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        elif isinstance(self.transform, Preprocess):
            x = self.transform(image, generator=self.generator(used))
        else:
            x = self.transform(image)
        labels = torch.from_numpy(self.labels[used].copy())
        mask = torch.from_numpy(self.mask[used].copy())
        return x, labels, mask, meta

    def _load_or_replace(self, index: int) -> tuple[np.ndarray, int]:
        """Decode ``index``; if it fails (a file changed after the dataset was built), record
        it in ``skipped`` and use the next readable sample unless ``strict``."""
        n = len(self)
        for step in range(min(n, 16)):
            i = (index + step) % n
            try:
                return self.load(i), i
            except DataError as e:
                reason = f"unreadable at load time: {e}"
                if self.strict:
                    raise DataError(f"{self.ids[i]}: {reason}") from e
                self.skipped.append((self.ids[i], reason))
                log.warning("%s: %s; using the next sample instead", self.ids[i], reason)
        raise DataError(f"16 consecutive samples from index {index} could not be read")


def _check_label_names(label_names: Sequence[str]) -> list[str]:
    if isinstance(label_names, str):
        label_names = [label_names]
    names = [str(n) for n in label_names]
    if not names:
        raise DataError("label_names is empty: name at least one label column")
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise DataError(f"label_names has duplicates: {', '.join(dupes)}")
    return names


# ---------------------------------------------------------------------------------------------
# CSV + image folder
# ---------------------------------------------------------------------------------------------


class CsvImageDataset(LabelledImageDataset):
    """Images named by a labels CSV in the format of ``../shared/data/cxr/labels.csv``.

    Columns used: ``image`` (file name or relative path under ``images_dir``; required), the
    ``label_names`` columns (``1`` / ``0``; blank, ``-1`` or ``nan`` mean unknown),
    ``labeled_findings`` (``ALL`` or ``;``-separated columns that carry information, others
    unknown; without the column every label is known), ``patient_id`` (without it each image
    is its own patient, and a warning says so), ``split``, ``source``, ``report``. Other
    columns are kept in :attr:`rows`.

    Args:
        labels_csv: the CSV file.
        images_dir: folder the ``image`` column is relative to.
        label_names: the target label columns, in output order.
        split: keep rows whose ``split`` is this value (or one of these values); None keeps
            all rows.
        transform: applied to the ``(H, W)`` [0, 1] array; a training
            :class:`~models.transforms.Preprocess` receives a per-sample generator.
        strict: raise :class:`DataError` on any missing or unreadable image instead of
            skipping it (default False: skipped, counted and listed in :attr:`skipped`).
        verify: how images are checked up front, one of :data:`VERIFY_MODES` (default
            ``"header"``: opened, not decoded).
        seed: augmentation seed (see :meth:`generator`).

    Attributes:
        rows: the kept CSV rows (dicts of strings, ``patient_id`` filled in), aligned with
            the samples; pass them to :func:`models.splits.patient_split`.

    Raises:
        DataError: missing file or columns, bad label values, an unknown name in
            ``labeled_findings``, no rows selected, ``strict`` with bad images.
    """

    dicom = False

    def __init__(
        self,
        labels_csv: str | Path,
        images_dir: str | Path,
        label_names: Sequence[str],
        split: str | Sequence[str] | None = None,
        transform: Transform | None = None,
        strict: bool = False,
        verify: str = "header",
        seed: int = 0,
    ):
        super().__init__(label_names, transform=transform, seed=seed, strict=strict)
        if verify not in VERIFY_MODES:
            raise DataError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.labels_csv = Path(labels_csv)
        self.images_dir = Path(images_dir)
        if not self.labels_csv.is_file():
            raise DataError(f"labels CSV not found: {self.labels_csv}")
        if not self.images_dir.is_dir():
            raise DataError(f"images folder not found: {self.images_dir}")

        columns, rows = _read_csv(self.labels_csv)
        self._check_columns(columns, split)
        if split is not None:
            wanted = {split} if isinstance(split, str) else set(split)
            rows = [(n, r) for n, r in rows if r.get("split", "").strip() in wanted]
            if not rows:
                raise DataError(f"{self.labels_csv}: no rows with split in {sorted(wanted)}")
        if not rows:
            raise DataError(f"{self.labels_csv}: no data rows")
        self.has_patients = "patient_id" in columns
        if not self.has_patients:
            log.warning(
                "%s has no patient_id column: each image counts as its own patient, so "
                "splits cannot keep a patient's images together",
                self.labels_csv,
            )
        labels, mask = _parse_labels(rows, self.label_names, columns, self.labels_csv)

        keep: list[int] = []
        self.rows: list[dict[str, str]] = []
        for pos, (line, row) in enumerate(rows):
            image = row["image"].strip()
            if not image:
                self.skipped.append((f"line {line}", "empty image name"))
                continue
            reason = _check_image(self._path(image), verify, self.dicom)
            if reason is not None:
                self.skipped.append((image, reason))
                continue
            row = dict(row)
            row["image"] = image
            patient = row.get("patient_id", "").strip() or self._fallback_patient(image)
            row["patient_id"] = patient
            keep.append(pos)
            self.rows.append(row)
            self.ids.append(image)
            self.patients.append(patient)
            self.paths.append(str(self._path(image)))
            self.sources.append(row.get("source", "") or "")
            self.reports.append(row.get("report", "") or "")
        self.labels = labels[keep]
        self.mask = mask[keep]

        if self.skipped:
            shown = "; ".join(f"{name} ({why})" for name, why in self.skipped[:10])
            more = f" and {len(self.skipped) - 10} more" if len(self.skipped) > 10 else ""
            message = f"{len(self.skipped)} image(s) missing or unreadable: {shown}{more}"
            if strict:
                raise DataError(f"{self.labels_csv}: {message}")
            log.warning("%s: skipped %s", self.labels_csv, message)
        if not self.ids:
            raise DataError(
                f"{self.labels_csv}: none of the {len(rows)} selected images could be used "
                f"(first problem: {self.skipped[0][0]}: {self.skipped[0][1]})"
            )

    def _check_columns(self, columns: list[str], split: str | Sequence[str] | None) -> None:
        required = ["image", *self.label_names]
        if split is not None:
            required.append("split")
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{self.labels_csv}: missing column(s) {', '.join(missing)}; "
                f"available columns: {', '.join(columns)}"
            )

    def _path(self, image: str) -> Path:
        return self.images_dir / image

    def _fallback_patient(self, image: str) -> str:
        return image

    def _take(self, indices: np.ndarray) -> CsvImageDataset:
        out = super()._take(indices)
        out.rows = [self.rows[i] for i in indices]
        return out

    def load(self, index: int) -> np.ndarray:
        return load_image(self.paths[index])


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs; raises DataError on an unreadable file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = [
                (reader.line_num, {k: (v or "") for k, v in r.items() if k is not None})
                for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels CSV {path}: {e}") from e
    if not columns:
        raise DataError(f"{path}: empty file, no header row")
    return columns, rows


def _parse_labels(
    rows: Sequence[tuple[int, Mapping[str, str]]],
    label_names: Sequence[str],
    columns: Sequence[str],
    where: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, K)`` labels and mask from the label columns and ``labeled_findings``."""
    column_set = set(columns)
    has_labeled = "labeled_findings" in column_set
    labels = np.zeros((len(rows), len(label_names)), dtype=np.float32)
    mask = np.zeros((len(rows), len(label_names)), dtype=np.float32)
    for i, (line, row) in enumerate(rows):
        known: set[str] | None = None  # None: every column is known
        if has_labeled:
            spec = row.get("labeled_findings", "").strip()
            if spec.upper() != ALL_LABELED:
                known = {s.strip() for s in spec.split(";") if s.strip()}
                unknown_names = sorted(known - column_set)
                if unknown_names:
                    raise DataError(
                        f"{where}, line {line}: labeled_findings names column(s) not in the "
                        f"file: {', '.join(unknown_names)}"
                    )
        for k, name in enumerate(label_names):
            value = row.get(name, "").strip()
            if value in _POSITIVE_VALUES:
                labels[i, k] = 1.0
            elif value not in _NEGATIVE_VALUES and value not in _UNKNOWN_VALUES:
                raise DataError(
                    f"{where}, line {line}: column {name!r} must be 0 or 1 (blank or -1 for "
                    f"unknown), got {value!r}"
                )
            if value in _UNKNOWN_VALUES or (known is not None and name not in known):
                labels[i, k] = 0.0
            else:
                mask[i, k] = 1.0
    return labels, mask


# ---------------------------------------------------------------------------------------------
# DICOM folder
# ---------------------------------------------------------------------------------------------


class DicomFolderDataset(CsvImageDataset):
    """A folder of DICOM files and a labels CSV whose ``image`` column names the files.

    Pixels are decoded by :func:`~models.dicom_pixels.dicom_to_array` (modality LUT, VOI
    LUT / window, MONOCHROME1 inversion, colour -> gray, first frame). Without a
    ``patient_id`` column the DICOM PatientID is read from each header (unless
    ``verify="none"``). Other arguments as for :class:`CsvImageDataset`.
    """

    dicom = True

    def __init__(
        self,
        folder: str | Path,
        labels_csv: str | Path,
        label_names: Sequence[str],
        split: str | Sequence[str] | None = None,
        transform: Transform | None = None,
        strict: bool = False,
        verify: str = "header",
        seed: int = 0,
    ):
        self._verify = verify
        super().__init__(
            labels_csv,
            folder,
            label_names,
            split=split,
            transform=transform,
            strict=strict,
            verify=verify,
            seed=seed,
        )

    def _fallback_patient(self, image: str) -> str:
        if self._verify == "none":
            return image
        try:
            ds = pydicom.dcmread(self._path(image), stop_before_pixels=True, force=True)
        except Exception:
            return image
        patient = str(ds.get("PatientID", "") or "").strip()
        return patient or image

    def load(self, index: int) -> np.ndarray:
        return load_dicom(self.paths[index])


# ---------------------------------------------------------------------------------------------
# MedMNIST .npz
# ---------------------------------------------------------------------------------------------


class NpzDataset(LabelledImageDataset):
    """A MedMNIST-style ``.npz``: ``{split}_images`` ``(N, H, W)`` or ``(N, H, W, C)`` uint8
    and ``{split}_labels`` ``(N, K)`` or ``(N,)`` 0/1.

    Every label is known (mask all ones). The file carries no patient ids, so each image is
    its own patient; use the file's own splits. Colour images are averaged to gray.

    Args:
        path: the ``.npz`` file.
        split: ``"train"``, ``"val"`` or ``"test"`` (any prefix with both keys works).
        label_names: one name per label column (default ``["Pneumonia"]``).
        transform, seed: as for :class:`CsvImageDataset`.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        label_names: Sequence[str] = ("Pneumonia",),
        transform: Transform | None = None,
        seed: int = 0,
    ):
        super().__init__(label_names, transform=transform, seed=seed)
        self.path = Path(path)
        self.split = split
        if not self.path.is_file():
            raise DataError(f"npz file not found: {self.path}")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                keys = list(data.keys())
                img_key, lab_key = f"{split}_images", f"{split}_labels"
                if img_key not in keys or lab_key not in keys:
                    raise DataError(
                        f"{self.path}: split {split!r} needs keys {img_key!r} and {lab_key!r}; "
                        f"available keys: {', '.join(keys)}"
                    )
                images = np.asarray(data[img_key])
                raw = np.asarray(data[lab_key])
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read npz file {self.path}: {e}") from e
        scale = 255.0 if images.dtype == np.uint8 else max(float(images.max(initial=0)), 1.0)
        if images.ndim == 4:
            images = images.mean(axis=-1)
        if images.ndim != 3:
            raise DataError(f"{self.path}: {img_key} must be (N, H, W), got {images.shape}")
        raw = raw.reshape(len(raw), -1)
        if len(raw) != len(images):
            raise DataError(
                f"{self.path}: {len(images)} images but {len(raw)} label rows in split {split!r}"
            )
        if raw.shape[1] != len(self.label_names):
            raise DataError(
                f"{self.path}: {lab_key} has {raw.shape[1]} label column(s) but "
                f"label_names has {len(self.label_names)}: {self.label_names}"
            )
        bad = np.setdiff1d(np.unique(raw), [0, 1])
        if bad.size:
            raise DataError(
                f"{self.path}: {lab_key} must be 0/1 (multi-label), found values {bad.tolist()}"
            )
        if len(images) == 0:
            raise DataError(f"{self.path}: split {split!r} is empty")
        self.images = images
        self.scale = scale
        self.labels = raw.astype(np.float32)
        self.mask = np.ones_like(self.labels)
        self.ids = [f"{split}_{i}" for i in range(len(images))]
        self.patients = list(self.ids)
        self.paths = [f"{self.path}::{img_key}[{i}]" for i in range(len(images))]
        self.sources = [self.path.stem] * len(images)
        self.reports = [""] * len(images)
        self._rows = np.arange(len(images))

    def _take(self, indices: np.ndarray) -> NpzDataset:
        out = super()._take(indices)
        out._rows = self._rows[indices]
        return out

    def load(self, index: int) -> np.ndarray:
        image = self.images[self._rows[index]].astype(np.float32) / self.scale
        return np.clip(image, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


class _HasLabels(Protocol):
    label_names: list[str]
    labels: np.ndarray
    mask: np.ndarray


def labels_summary(dataset: _HasLabels | Subset[Any]) -> dict[str, Any]:
    """Counts for a checkpoint's data summary, without decoding images.

    Returns:
        ``{"n", "label_names", "positives": {name: int}, "negatives": {name: int},
        "unknown": {name: int}, "patients", "skipped", "sources": {source: int}}``
        (``patients`` / ``sources`` when the dataset has them).
    """
    indices: np.ndarray | None = None
    base: Any = dataset
    if isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)
        base = dataset.dataset
    labels = np.asarray(base.labels)
    mask = np.asarray(base.mask)
    if indices is not None:
        labels, mask = labels[indices], mask[indices]
    names = list(base.label_names)
    known = mask > 0
    pos = ((labels > 0) & known).sum(axis=0)
    neg = ((labels <= 0) & known).sum(axis=0)
    out: dict[str, Any] = {
        "n": int(labels.shape[0]),
        "label_names": names,
        "positives": {n: int(v) for n, v in zip(names, pos, strict=True)},
        "negatives": {n: int(v) for n, v in zip(names, neg, strict=True)},
        "unknown": {n: int(v) for n, v in zip(names, (~known).sum(axis=0), strict=True)},
    }
    patients = getattr(base, "patients", None)
    if patients is not None:
        chosen = patients if indices is None else [patients[i] for i in indices]
        out["patients"] = len(set(chosen))
    out["skipped"] = len(getattr(base, "skipped", []))
    sources = getattr(base, "sources", None)
    if sources is not None:
        chosen = sources if indices is None else [sources[i] for i in indices]
        out["sources"] = dict(sorted(Counter(chosen).items()))
    return out
