"""The training configuration: one TOML file, read and checked before any training starts.

Sections (every key optional unless noted; an unknown key anywhere is a :class:`ConfigError`
that names it and suggests the closest known one)::

    [data]        where the images and labels are, how train / val are chosen  (DataConfig)
    [ontology]    which graph, which label -> concept table                   (OntologyConfig)
    [model]       KgdxModelConfig fields (``targets`` come from the data's labels)
    [preprocess]  PreprocessConfig fields (``image_size`` comes from ``model.image``)
    [train]       optimisation, schedule, early stopping, devices             (TrainConfig)

Relative paths resolve against the TOML file's folder, after ``~`` and ``$VAR`` /
``${VAR}`` expansion (:func:`os.path.expandvars`). ``--set section.key=value`` overrides are
applied to the parsed TOML before it is checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

from models.config import KgdxModelConfig
from models.data import NIH_FINDINGS
from models.errors import ConfigError
from models.image_encoder import ImageEncoderConfig
from models.text_encoder import DEFAULT_TEXT_ENCODER
from models.transforms import PreprocessConfig

T = TypeVar("T")

DATA_KINDS = ("csv", "npz", "dicom")
FREEZE_MODES = ("none", "backbone", "head_only")
DEVICES = ("auto", "cpu", "cuda")
POS_WEIGHT_MODES = ("none", "auto")
SAVE_DTYPES = ("float32", "float16")
VERIFY_MODES = ("none", "exists", "header", "decode")
SECTIONS = ("data", "ontology", "model", "preprocess", "train")


@dataclass
class DataConfig:
    """``[data]``: the labelled images and how they are split.

    ``kind = "csv"`` reads a labels CSV in the format of ``../shared/data/cxr/labels.csv``
    with an image folder; ``"dicom"`` the same CSV naming DICOM files in ``images``;
    ``"npz"`` a MedMNIST file (its own ``train`` / ``val`` arrays). Train and val come from
    the CSV's ``split`` column (``train_split`` / ``val_split``), or, when ``val_fraction`` is
    set or the CSV has no ``split`` column, from a patient-wise split of the ``train_split``
    rows (of all rows without the column).
    """

    kind: str = "csv"  # "csv" | "npz" | "dicom"
    labels: str | None = None  # labels CSV (csv, dicom)
    images: str | None = None  # image folder (csv) or DICOM folder (dicom)
    npz: str | None = None  # MedMNIST .npz file (npz)
    label_names: list[str] = field(default_factory=lambda: list(NIH_FINDINGS))  # label columns
    train_split: str | list[str] = "train"  # split value(s) of the training rows
    val_split: str = "val"  # split value of the validation rows (early stopping)
    val_fraction: float | None = None  # patient-wise val share carved from the train rows
    split_seed: int = 0  # seed of the patient-wise split and of the label fraction
    stratify: str | None = None  # CSV column to stratify the patient-wise split by
    label_fraction: float = 1.0  # share of training patients kept (0.1: the 10%-labels runs)
    exclude_findings: list[str] = field(default_factory=list)  # not trained (zero-shot runs)
    sources: list[str] | None = None  # keep rows whose ``source`` starts with one of these
    cache_images: bool = False  # keep resized images in memory as uint8 (fast CPU epochs)
    verify: str = "header"  # image check when the dataset is built (none|exists|header|decode)
    boxes: str | None = None  # BBox_List_2017.csv(.gz): training boxes for train.box_weight

    def __post_init__(self) -> None:
        _choice("data.kind", self.kind, DATA_KINDS)
        _choice("data.verify", self.verify, VERIFY_MODES)
        if self.kind in ("csv", "dicom"):
            for key in ("labels", "images"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key} is required when data.kind = {self.kind!r}")
        elif not self.npz:
            raise ConfigError("data.npz is required when data.kind = 'npz'")
        if not self.label_names:
            raise ConfigError("data.label_names must name at least one label column")
        dupes = sorted({n for n in self.label_names if self.label_names.count(n) > 1})
        if dupes:
            raise ConfigError(f"data.label_names has duplicates: {', '.join(dupes)}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"data.label_fraction must be in (0, 1], got {self.label_fraction}")
        _check_seed("data.split_seed", self.split_seed)
        unknown = [n for n in self.exclude_findings if n not in self.label_names]
        if unknown:
            raise ConfigError(
                f"data.exclude_findings names {', '.join(map(repr, unknown))}, not in "
                f"data.label_names ({', '.join(self.label_names)})"
            )
        if set(self.label_names) <= set(self.exclude_findings):
            raise ConfigError("data.exclude_findings removes every label: nothing to train")
        if self.kind == "npz" and (self.val_fraction is not None or self.stratify):
            raise ConfigError(
                "data.val_fraction and data.stratify need patient ids; an npz file has its "
                "own train / val arrays (data.train_split / data.val_split)"
            )
        if self.boxes is not None and self.kind == "npz":
            raise ConfigError("data.boxes needs a labels CSV (data.kind 'csv' or 'dicom')")
        if self.sources is not None and not self.sources:
            raise ConfigError("data.sources is empty; leave it out to keep every source")

    @property
    def train_splits(self) -> list[str]:
        """``train_split`` as a list."""
        return [self.train_split] if isinstance(self.train_split, str) else list(self.train_split)

    @property
    def targets(self) -> list[str]:
        """The label names trained on: ``label_names`` less ``exclude_findings``."""
        return [n for n in self.label_names if n not in self.exclude_findings]


@dataclass
class OntologyConfig:
    """``[ontology]``: the graph the model reads and how dataset labels map into it."""

    spec: str | None = None  # None: the bundled chest graph; a file; or a store NAME[@VERSION]
    label_map: str | None = None  # label,concept_id CSV; None: the bundled NIH map; "": none
    feature_cache: str | None = None  # concept text feature cache (default $KGDX_HOME/features)


@dataclass
class TrainConfig:
    """``[train]``: optimisation, schedule, early stopping and devices."""

    epochs: int = 20  # passes over the training set
    batch_size: int = 32  # images per forward pass
    eval_batch_size: int | None = None  # validation batch (default 2 x batch_size)
    lr: float = 3e-4  # peak learning rate (AdamW)
    backbone_lr: float | None = None  # peak lr of the image backbone (default: lr)
    weight_decay: float = 0.05  # AdamW decay; never on norms, biases and embeddings
    warmup_steps: int | None = None  # linear warm-up in optimiser steps...
    warmup_fraction: float | None = None  # ...or as a share of all steps (default 0.05)
    min_lr_ratio: float = 0.0  # the cosine ends at min_lr_ratio x lr
    grad_accum: int = 1  # micro-batches per optimiser step
    clip_grad_norm: float | None = 1.0  # max gradient norm (None: no clipping)
    freeze: str = "none"  # "none" | "backbone" | "head_only" (only fusion + decoder train)
    patience: int | None = 5  # epochs without val improvement before stopping (None: never)
    pos_weight: str = "none"  # "none" | "auto" (negatives / positives per finding, <= 10)
    amp: bool = True  # mixed precision (CUDA only; bf16 when supported, else fp16)
    channels_last: bool = True  # channels_last memory format (CUDA only)
    seed: int = 0  # seeds torch, numpy, random, shuffling and augmentation
    num_workers: int = 0  # DataLoader workers (uncached data only)
    contrastive_weight: float = 0.0  # image-report loss weight (needs a ``report`` column)
    contrastive_temperature: float = 0.07  # softmax temperature of the contrastive loss
    box_weight: float = 0.0  # heat-map box loss weight (needs data.boxes; models/box_supervision)
    max_minutes: float | None = None  # wall-clock budget; stops after the step that passes it
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int | None = None  # CPU threads of torch (None: its default, one per core)
    bootstrap: int = 1000  # resamples for the CIs of the best epoch's val metrics
    save_dtype: str = "float32"  # checkpoint weights: "float32" | "float16" (half the size)
    out: str | None = None  # output folder (the CLI's --out wins; default runs/<config stem>)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"train.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        for key in ("lr", "backbone_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"train.{key} must be > 0, got {value}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ConfigError("give train.warmup_steps or train.warmup_fraction, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(
                f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"train.clip_grad_norm must be > 0, got {self.clip_grad_norm}")
        _choice("train.freeze", self.freeze, FREEZE_MODES)
        _choice("train.pos_weight", self.pos_weight, POS_WEIGHT_MODES)
        _choice("train.device", self.device, DEVICES)
        _choice("train.save_dtype", self.save_dtype, SAVE_DTYPES)
        if self.patience is not None and self.patience < 1:
            raise ConfigError(
                f"train.patience must be >= 1 (leave it out: never stop early), got {self.patience}"
            )
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"train.threads must be >= 1, got {self.threads}")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.contrastive_weight < 0:
            raise ConfigError(
                f"train.contrastive_weight must be >= 0, got {self.contrastive_weight}"
            )
        if not (math.isfinite(self.box_weight) and self.box_weight >= 0):
            raise ConfigError(
                f"train.box_weight must be a finite number >= 0, got {self.box_weight}"
            )
        if not self.contrastive_temperature > 0:
            raise ConfigError(
                f"train.contrastive_temperature must be > 0, got {self.contrastive_temperature}"
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train.max_minutes must be > 0, got {self.max_minutes}")
        if self.bootstrap < 0:
            raise ConfigError(f"train.bootstrap must be >= 0, got {self.bootstrap}")
        _check_seed("train.seed", self.seed)

    @property
    def warmup(self) -> float | int:
        """Warm-up as steps (int) or as a share of all steps (float)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return 0.05 if self.warmup_fraction is None else self.warmup_fraction


#: Keys newer than some saved runs and checkpoints (dotted, as in ``--set``): a config saved
#: without one was trained with this value.
ADDED_KEYS: dict[str, Any] = {
    "train.box_weight": 0.0,
    "data.boxes": None,
    "model.decoder.map_gradient": "all",
}


@dataclass
class TrainingConfig:
    """The whole TOML file, checked; paths absolute.

    ``model`` and ``preprocess`` stay dicts (checked against :class:`KgdxModelConfig` and
    :class:`PreprocessConfig`): the model's ``targets`` and ``gnn.in_dim`` are only known
    once the labels are mapped and the text encoder is chosen (see :mod:`models.builder`).
    """

    data: DataConfig
    ontology: OntologyConfig = field(default_factory=OntologyConfig)
    model: dict[str, Any] = field(default_factory=dict)  # KgdxModelConfig fields, no targets
    preprocess: dict[str, Any] = field(default_factory=dict)  # PreprocessConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None  # the TOML file it came from

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (what a checkpoint stores as ``train_config``)."""
        return dataclasses.asdict(self)

    def preprocess_config(self) -> PreprocessConfig:
        """The :class:`PreprocessConfig` at the model's image size."""
        image = self.model.get("image") or {}
        size = int(image.get("image_size", ImageEncoderConfig().image_size))
        return PreprocessConfig(**{**self.preprocess, "image_size": size})


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def load_training_config(
    path: str | Path, overrides: Sequence[str] = (), *, check_files: bool = True
) -> TrainingConfig:
    """Read, override, check and resolve a training TOML file.

    Args:
        path: the TOML file.
        overrides: ``section.key=value`` strings (``value`` in TOML syntax, bare strings
            allowed), e.g. ``train.epochs=2`` or ``data.exclude_findings=["Edema"]``.
        check_files: raise when a named file or folder does not exist (default True).

    Raises:
        ConfigError: unreadable TOML, unknown keys, bad values, missing files.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"training config not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read training config {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(
        raw, base_dir=path.resolve().parent, source=path, check_files=check_files
    )


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``section.key[.sub]=value`` in the parsed TOML ``raw`` (in place)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare string such as cpu or ../data/x.csv
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(
    raw: Mapping[str, Any],
    *,
    base_dir: str | Path | None = None,
    source: str | Path | None = None,
    check_files: bool = True,
) -> TrainingConfig:
    """Build a :class:`TrainingConfig` from a parsed TOML mapping (see
    :func:`load_training_config`); relative paths resolve against ``base_dir`` (default:
    the current folder)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"training config must be a table, got {type(raw).__name__}")
    _check_unknown(raw, SECTIONS, "")
    if "data" not in raw:
        raise ConfigError("training config needs a [data] section")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    data = _build(DataConfig, raw.get("data", {}), "data")
    ontology = _build(OntologyConfig, raw.get("ontology", {}), "ontology")
    train = _build(TrainConfig, raw.get("train", {}), "train")
    model = _check_model(raw.get("model", {}))
    preprocess = _check_preprocess(raw.get("preprocess", {}))

    resolve = _Resolver(base, check_files)
    data.labels = resolve.file(data.labels, "data.labels")
    data.npz = resolve.file(data.npz, "data.npz")
    data.images = resolve.folder(data.images, "data.images")
    data.boxes = resolve.file(data.boxes, "data.boxes")
    if train.box_weight > 0 and not data.boxes:
        raise ConfigError("train.box_weight > 0 needs data.boxes (the bounding-box CSV)")
    ontology.spec = resolve.ontology(ontology.spec)
    if ontology.label_map:
        ontology.label_map = resolve.file(ontology.label_map, "ontology.label_map")
    if ontology.feature_cache:
        ontology.feature_cache = str(resolve.path(ontology.feature_cache, "ontology.feature_cache"))
    if train.out:
        train.out = str(resolve.path(train.out, "train.out"))
    image = model.get("image") or {}
    if image.get("pretrained_path"):
        image["pretrained_path"] = resolve.file(
            image["pretrained_path"], "model.image.pretrained_path"
        )
    text = model.get("text") or {}
    name = text.get("name_or_path")
    if name and name != DEFAULT_TEXT_ENCODER:
        text["name_or_path"] = resolve.folder(name, "model.text.name_or_path")
    return TrainingConfig(
        data=data,
        ontology=ontology,
        model=model,
        preprocess=preprocess,
        train=train,
        source=str(Path(source).resolve()) if source is not None else None,
    )


class _Resolver:
    """Expand ``~`` and ``$VAR``, resolve against the TOML's folder, check existence."""

    def __init__(self, base: Path, check: bool):
        self.base = base
        self.check = check

    def path(self, value: str, key: str) -> Path:
        if "\x00" in value:  # the OS refuses it with a bare "embedded null byte"
            raise ConfigError(f"{key}: the path holds a NUL character")
        p = Path(os.path.expanduser(os.path.expandvars(value)))
        return p if p.is_absolute() else (self.base / p).resolve()

    def file(self, value: str | None, key: str) -> str | None:
        if value is None:
            return None
        p = self.path(value, key)
        if self.check and not p.is_file():
            what = "is a folder, not a file" if p.is_dir() else "not found"
            raise ConfigError(f"{key}: {p} {what}")
        return str(p)

    def folder(self, value: str | None, key: str) -> str | None:
        if value is None:
            return None
        p = self.path(value, key)
        if self.check and not p.is_dir():
            what = "is a file, not a folder" if p.is_file() else "not found"
            raise ConfigError(f"{key}: {p} {what}")
        return str(p)

    def ontology(self, spec: str | None) -> str | None:
        """A file path when ``spec`` names one (relative to the TOML), else the store
        reference as given."""
        if spec is None or not spec.strip():
            return None
        p = self.path(spec, "ontology.spec")
        if p.is_file():
            return str(p)
        looks_like_path = any(s in spec for s in ("/", "\\")) or Path(spec).suffix.lower() in (
            ".obo",
            ".owl",
            ".json",
            ".csv",
            ".tsv",
        )
        if looks_like_path and self.check:
            raise ConfigError(f"ontology.spec: {p} not found")
        return spec


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_seed(where: str, seed: int) -> None:
    # torch takes seeds below 2**64, numpy's generators only non-negative ones
    if not 0 <= seed < 2**64:
        raise ConfigError(f"{where} must be in [0, 2**64), got {seed}")


def _check_unknown(data: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    for key in data:
        if key in known:
            continue
        close = _closest(str(key), known)
        if not prefix:
            hint = f"; did you mean [{close[0]}]?" if close else ""
            sections = ", ".join(f"[{s}]" for s in known)
            raise ConfigError(f"unknown section [{key}]{hint} (sections: {sections})")
        hint = f"; did you mean {prefix}{close[0]}?" if close else f" (known: {', '.join(known)})"
        raise ConfigError(f"{prefix}{key} unknown{hint}")


def _closest(key: str, known: Sequence[str]) -> list[str]:
    """The known key ``key`` was most likely meant to be (``lr_max`` -> ``lr``)."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    if close:
        return close
    related = [k for k in known if key.startswith(k) or k.startswith(key)]
    return sorted(related, key=len, reverse=True)[:1]


def _build(cls: type[T], data: Any, section: str) -> T:
    """Instantiate dataclass ``cls`` from a TOML table, checking keys and value types."""
    kwargs = _checked_fields(cls, data, section)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from e


def _checked_fields(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a table, got {data!r}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_unknown(data, names, f"{prefix}.")
    out: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        where = f"{prefix}.{key}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out[key] = _checked_fields(hint, value, where)
        else:
            out[key] = _coerce(value, hint, where)
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (int -> float allowed)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        errors: list[str] = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        wanted = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{where} must be {wanted}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _check_model(data: Any) -> dict[str, Any]:
    """``[model]`` checked against :class:`KgdxModelConfig` (keys, types, values)."""
    fields = _checked_fields(KgdxModelConfig, data, "model")
    if "targets" in fields:
        raise ConfigError(
            "model.targets is filled from data.label_names (less data.exclude_findings); remove it"
        )
    try:  # the values' own checks (dims, heads, choices), with a placeholder target
        KgdxModelConfig.from_dict({**fields, "targets": ["placeholder"]})
    except ConfigError as e:
        raise ConfigError(f"[model]: {e}") from e
    except TypeError as e:
        raise ConfigError(f"[model]: {e}") from e
    return fields


def _check_preprocess(data: Any) -> dict[str, Any]:
    fields = _checked_fields(PreprocessConfig, data, "preprocess")
    if "image_size" in fields:
        raise ConfigError("preprocess.image_size comes from model.image.image_size; set it there")
    try:
        PreprocessConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"[preprocess]: {e}") from e
    return fields
