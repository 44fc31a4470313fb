"""The training loop behind ``kgdx train``.

:func:`train_model` runs ``prepare -> (train epoch -> validate -> keep best -> save state)*``:

- **prepare** (everything that can fail on the user's input, before the first step): the
  output folder, the device, the ontology and the label -> concept map, the datasets and
  their splits, the concept features, the model, the optimiser; and, with ``resume``, the
  saved state.
- **train epoch**: masked BCE (+ image-report contrastive loss when reports exist), AdamW
  (no decay on norms, biases and embeddings), warm-up + cosine per optimiser step, gradient
  accumulation and clipping, AMP and ``channels_last`` on CUDA. The entity embeddings ``E``
  are computed once per optimiser step, not per sample nor per micro-batch: ``E`` is
  detached into a leaf the micro-batches share, and its accumulated gradient is pushed
  back through the GNN once, before the optimiser step.
- **validate**: probabilities on the val split, macro AUROC over the findings with >= 5
  val positives (:mod:`models.metrics`); the best epoch's checkpoint is written to ``OUT/``
  with per-finding AUROCs, bootstrap CIs and validation-chosen thresholds.
- **save state**: ``OUT/state/`` (latest weights, optimiser, scheduler, RNG states, counters;
  safetensors + JSON, no pickle) after every epoch, so ``resume`` continues where the run
  stopped, as far as the hardware allows bit for bit. A run that ends normally (all epochs
  or early stopping) deletes ``OUT/state/``; one stopped by ``max_minutes``, a NaN loss or an
  interruption keeps it.

A NaN or infinite loss stops the run with :class:`ModelError`; the best checkpoint in ``OUT/``
and the state of the last finished epoch are left as they were.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from kg.tensors import GraphArrays, to_arrays
from models.box_supervision import BoxTargets, training_boxes
from models.builder import (
    build_model,
    load_graph,
    map_targets,
    model_config,
    ontology_identity,
    prepare_graph,
    text_encoder_for,
)
from models.checkpoint import INFO_FILE, save_checkpoint
from models.config import KgdxModelConfig
from models.errors import ConfigError, ModelError
from models.losses import auto_pos_weight, contrastive_loss, masked_bce
from models.metrics import (
    MIN_POSITIVES,
    evaluate_classification,
    macro_auroc,
    per_finding_auroc,
)
from models.model import KgdxModel
from models.schedule import build_scheduler, warmup_steps_for
from models.text_encoder import SupportsEncode
from models.train_config import ADDED_KEYS, TrainingConfig
from models.train_data import (
    ImageSource,
    ReportFeatures,
    TrainData,
    augment_batch,
    build_datasets,
    draw_augmentation,
    has_reports,
    normalise_batch,
    report_features,
)
from models.transforms import PreprocessConfig

log = logging.getLogger(__name__)

STATE_DIR = "state"
LOG_FILE = "train_log.jsonl"
STATE_FORMAT = "kgdx-train-state"
STATE_VERSION = 1
#: Config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "train.max_minutes",
    "train.num_workers",
    "train.device",
    "train.out",
    "train.threads",
)
#: Parameters that act as embeddings: no weight decay, whatever their shape.
_NO_DECAY_NAMES = ("modality", "query_bias", "label_embeddings", "relation_embedding")


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path  # the run's folder
    checkpoint: Path | None  # the best checkpoint (OUT itself), None if no epoch finished
    log_path: Path  # train_log.jsonl
    monitor: str  # "val_macro_auroc" (higher is better) or "val_loss" (lower)
    best_epoch: int | None  # 1-based epoch of the best checkpoint
    best_metric: float | None  # its monitored value
    metrics: dict[str, Any]  # the best checkpoint's metrics (val report with CIs)
    epochs_run: int  # epochs finished, counting those before a resume
    seconds: float  # wall time of this invocation
    stopped: str  # "completed" | "early stopping" | "time budget" | "stop_after_epochs"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images
    resumed_from: int | None = None  # epochs already done when this invocation started

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("out_dir", "checkpoint", "log_path"):
            out[key] = None if out[key] is None else str(out[key])
        out["skipped"] = [list(s) for s in self.skipped]
        return out


class _NonFinite(Exception):
    def __init__(self, epoch: int, step: int):
        self.epoch = epoch
        self.step = step


# ---------------------------------------------------------------------------------------------
# Set-up helpers
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def apply_freeze(model: KgdxModel, mode: str) -> list[nn.Module]:
    """Freeze parameters by strategy; returns the frozen modules (kept in eval mode).

    ``"none"``: everything trains. ``"backbone"``: the image backbone is frozen (its
    projection to tokens still trains). ``"head_only"``: only the knowledge fusion and the
    finding decoder (with its per-target biases) train; image encoder, GNN, projections and
    label embeddings are frozen.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    if mode == "none":
        return []
    if mode == "backbone":
        frozen: list[nn.Module] = [model.image_encoder.backbone]
    elif mode == "head_only":
        keep = {"fusion", "decoder"}
        frozen = [m for name, m in model.named_children() if name not in keep]
        for name in ("modality", "label_embeddings"):
            param = getattr(model, name, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(False)
    else:
        raise ConfigError(f"unknown freeze mode {mode!r}")
    for m in frozen:
        m.requires_grad_(False)
    return frozen


def param_groups(
    model: nn.Module, lr: float, backbone_lr: float | None, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups: (backbone | rest) x (decay | no decay), empty groups left out.

    No decay on 1-D parameters (norm weights, biases) and on embedding-like tables
    (modality, per-target query / logit biases, label and relation embeddings).
    """
    buckets: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = name.startswith("image_encoder.backbone.")
        decay = p.ndim >= 2 and not any(k in name for k in _NO_DECAY_NAMES)
        buckets.setdefault((backbone, decay), []).append((name, p))
    groups = []
    for (backbone, decay), items in sorted(buckets.items()):
        part = "backbone" if backbone else "model"
        groups.append(
            {
                "params": [p for _, p in items],
                "names": [n for n, _ in items],
                "lr": backbone_lr if backbone and backbone_lr is not None else lr,
                "weight_decay": weight_decay if decay else 0.0,
                "group": f"{part}/{'decay' if decay else 'no_decay'}",
            }
        )
    if not groups:
        raise ConfigError("no trainable parameters (check train.freeze)")
    return groups


class EntityStep:
    """The entity embeddings ``E`` of one optimiser step, shared by its micro-batches.

    ``E`` is computed once and cached in the model as a detached leaf; every micro-batch's
    backward accumulates into the leaf's gradient, and :meth:`finish` pushes that sum back
    through the GNN in a single backward. The parameter gradients equal those of
    recomputing ``E`` in every micro-batch, at the cost of one GNN pass per step. With the
    entity parameters frozen, ``E`` is computed without a graph.

    Args:
        model: the model (its entity cache is set until :meth:`finish`).
        trainable: whether any GNN / label-embedding parameter trains.
    """

    def __init__(self, model: KgdxModel, trainable: bool):
        self.model = model
        model.clear_entity_cache()
        self.entities: torch.Tensor | None = None
        self.leaf: torch.Tensor | None = None
        if not trainable:
            with torch.no_grad():
                model._entity_cache = model.entity_embeddings().detach()
            return
        self.entities = model.entity_embeddings()  # (N, D), with the GNN's graph
        self.leaf = self.entities.detach().requires_grad_(True)
        model._entity_cache = self.leaf

    def finish(self) -> None:
        """Backpropagate the micro-batches' summed gradient of ``E`` through the GNN once."""
        if self.entities is not None and self.leaf is not None and self.leaf.grad is not None:
            self.entities.backward(self.leaf.grad)
        self.model.clear_entity_cache()
        self.entities = self.leaf = None


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    config: TrainingConfig
    out: Path
    device: torch.device
    data: TrainData
    labels: dict[str, str]  # training label -> concept, output order
    excluded: dict[str, str]  # excluded label -> concept (zero-shot)
    model_config: KgdxModelConfig
    model: KgdxModel
    ontology_name: str
    ontology_version: str
    encoder_id: str | None
    preprocess: PreprocessConfig
    reports: ReportFeatures | None
    boxes: BoxTargets | None = None  # training boxes for the heat-map loss (train.box_weight)


def _check_out(out: Path, resume: bool) -> None:
    state = out / STATE_DIR
    if resume:
        if not (state / "state.json").is_file():
            raise ConfigError(f"nothing to resume: {state} holds no saved training state")
        return
    if state.exists():
        raise ConfigError(
            f"{out} holds an unfinished run ({STATE_DIR}/): pass --resume to continue it, or "
            f"choose another --out (or delete {state} to start over there)"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")


def prepare(
    config: TrainingConfig,
    out: Path,
    *,
    no_kg: bool = False,
    resume: bool = False,
    strict: bool = False,
    progress: bool = True,
    encoder: SupportsEncode | None = None,
) -> _Prepared:
    """Everything before the first training step; all user errors surface here."""
    _check_out(out, resume)
    tc = config.train
    device = resolve_device(tc.device)
    if tc.threads is not None:
        # on a CPU shared with other work, fewer threads than cores avoids OpenMP threads
        # waiting on each other for a busy core (several times faster there)
        torch.set_num_threads(tc.threads)
    preprocess = config.preprocess_config()
    ontology = load_graph(config.ontology.spec)
    name, version = ontology_identity(ontology)
    label_map: str | None = config.ontology.label_map
    all_labels = map_targets(ontology, config.data.label_names, label_map)
    targets = config.data.targets
    labels = {n: all_labels[n] for n in targets}
    excluded = {n: all_labels[n] for n in config.data.exclude_findings}
    if len(set(labels.values())) != len(labels):
        dupes = sorted(
            {f"{n} -> {c}" for n, c in labels.items() if list(labels.values()).count(c) > 1}
        )
        raise ConfigError(f"two training labels map to one concept: {', '.join(dupes)}")

    data = build_datasets(config.data, preprocess, seed=tc.seed, strict=strict)
    use_kg = not no_kg and bool(config.model.get("use_kg", True))
    draft = model_config(config.model, list(labels.values()), None, use_kg=use_kg)
    arrays: GraphArrays
    encoder_id: str | None = None
    features: torch.Tensor | None = None
    if use_kg:
        arrays, features, encoder_id = prepare_graph(
            ontology,
            draft.text,
            config.ontology.feature_cache,
            progress=progress,
            encoder=encoder,
        )
        final = model_config(
            config.model, list(labels.values()), int(features.shape[1]), use_kg=True
        )
    else:
        arrays = to_arrays(ontology)
        final = draft

    reports: ReportFeatures | None = None
    if tc.contrastive_weight > 0:
        if has_reports(data.train):
            enc = encoder or text_encoder_for(final.text)
            reports = report_features(data.train, enc, progress)
            if reports.features.shape[1] != final.text_dim:
                raise ConfigError(
                    f"report vectors are {reports.features.shape[1]}-dim but model.text_dim = "
                    f"{final.text_dim}; set model.text_dim to the text encoder's width"
                )
        else:
            log.warning("train.contrastive_weight ignored: the training rows have no report")

    boxes = training_boxes(config, data)

    seed_everything(tc.seed)
    model = build_model(final, arrays, features)
    return _Prepared(
        config=config,
        out=out,
        device=device,
        data=data,
        labels=labels,
        excluded=excluded,
        model_config=final,
        model=model,
        ontology_name=name,
        ontology_version=version,
        encoder_id=encoder_id,
        preprocess=preprocess,
        reports=reports,
        boxes=boxes,
    )


def default_out_dir(config: TrainingConfig) -> Path:
    """``train.out``, else ``runs/<config file stem>`` in the current folder."""
    if config.train.out:
        return Path(config.train.out)
    stem = Path(config.source).stem if config.source else "run"
    return Path("runs") / stem


def train_model(
    config: TrainingConfig,
    out_dir: str | Path | None = None,
    *,
    no_kg: bool = False,
    resume: bool = False,
    strict: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    encoder: SupportsEncode | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train a model as ``config`` says and write its best checkpoint to ``out_dir``.

    Args:
        config: a checked :class:`~models.train_config.TrainingConfig`.
        out_dir: output folder (default :func:`default_out_dir`).
        no_kg: the ablation: free label embeddings instead of the ontology GNN.
        resume: continue the run saved in ``out_dir/state``.
        strict: missing or unreadable images are fatal instead of skipped.
        progress: progress bars on stderr (terminals only).
        echo: receives one line per epoch (e.g. ``typer.echo`` to stderr); None logs them.
        encoder: text encoder override (tests); default from the model config.
        stop_after_epochs: stop (keeping the state) after this many epochs in this
            invocation, as an interruption would.

    Raises:
        ConfigError, DataError, kg.errors.MappingError: before training starts.
        ModelError: a NaN / infinite loss (the best checkpoint so far is kept).
    """
    started = time.monotonic()
    out = Path(out_dir) if out_dir is not None else default_out_dir(config)
    prep = prepare(
        config, out, no_kg=no_kg, resume=resume, strict=strict, progress=progress, encoder=encoder
    )
    return _Loop(prep, progress=progress, echo=echo).run(resume, stop_after_epochs, started)


class _Loop:
    """One training run over a :class:`_Prepared` set-up."""

    def __init__(self, prep: _Prepared, progress: bool, echo: Callable[[str], None] | None):
        self.p = prep
        self.tc = prep.config.train
        self.progress = progress and sys.stderr.isatty()
        self.echo = echo or (lambda line: log.info("%s", line))
        self.device = prep.device
        model = prep.model.to(self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.tc.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = model
        self.frozen = apply_freeze(model, self.tc.freeze)
        self.entity_trainable = any(
            p.requires_grad for n, p in model.named_parameters() if _is_entity_param(n)
        )
        self.amp_dtype: torch.dtype | None = None
        if self.cuda and self.tc.amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        data = prep.data
        cache = prep.config.data.cache_images
        self.train_src = ImageSource(
            data.train,
            cache=cache,
            num_workers=self.tc.num_workers,
            progress=self.progress,
            pin_memory=self.cuda,
            desc="caching train images",
        )
        self.val_src = ImageSource(
            data.val,
            cache=cache,
            num_workers=self.tc.num_workers,
            progress=self.progress,
            pin_memory=self.cuda,
            desc="caching val images",
        )
        self.batch_size = self.tc.batch_size
        self.eval_batch_size = self.tc.eval_batch_size or 2 * self.tc.batch_size
        self.drop_last = len(data.train) >= self.batch_size
        self.n_batches = self.train_src.num_batches(self.batch_size, self.drop_last)
        self.steps_per_epoch = -(-self.n_batches // self.tc.grad_accum)
        self.total_steps = self.tc.epochs * self.steps_per_epoch
        self.warmup_steps = warmup_steps_for(self.total_steps, self.tc.warmup)
        groups = param_groups(model, self.tc.lr, self.tc.backbone_lr, self.tc.weight_decay)
        self.group_names = [(g["group"], g.pop("names")) for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=self.tc.lr)
        self.scheduler = build_scheduler(
            self.optimizer, self.total_steps, self.warmup_steps, self.tc.min_lr_ratio
        )
        self.pos_weight = (
            auto_pos_weight(data.train.labels, data.train.mask).to(self.device)
            if self.tc.pos_weight == "auto"
            else None
        )
        self.names = list(data.label_names)
        self.monitor = _monitor_for(data.val.labels, data.val.mask)
        self.fused: torch.Tensor | None = None
        self._hook: Any = None
        if prep.reports is not None:
            self._hook = model.fusion.register_forward_hook(self._keep_fused)

        # counters (restored on resume)
        self.epoch = 0  # epochs finished
        self.step = 0  # optimiser steps taken
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_metrics: dict[str, Any] = {}
        self.bad_epochs = 0
        self.elapsed_before = 0.0
        self.last_auroc: float | None = None

    # -- hooks ------------------------------------------------------------------------------

    def _keep_fused(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.fused = output[0]  # (B, S, D)

    # -- run --------------------------------------------------------------------------------

    def run(self, resume: bool, stop_after: int | None, started: float) -> TrainResult:
        p = self.p
        p.out.mkdir(parents=True, exist_ok=True)
        log_path = p.out / LOG_FILE
        resumed_from: int | None = None
        if resume:
            self._load_state(p.out / STATE_DIR)
            resumed_from = self.epoch
            self.echo(f"resuming after epoch {self.epoch} (step {self.step})")
        else:
            log_path.write_text("")
        if p.data.skipped:
            self.echo(f"skipped {len(p.data.skipped)} unreadable or missing image(s)")
        deadline = (
            started + self.tc.max_minutes * 60 - self.elapsed_before
            if self.tc.max_minutes
            else None
        )
        stopped = "completed"
        done_here = 0
        if self._patience_exhausted():
            stopped = "early stopping"
        while stopped == "completed" and self.epoch < self.tc.epochs:
            epoch_started = time.monotonic()
            try:
                train_stats, out_of_time = self._train_epoch(deadline)
            except _NonFinite as e:
                raise ModelError(self._nan_message(e.epoch, e.step)) from None
            val = self._validate()
            self.epoch += 1
            done_here += 1
            record = self._after_epoch(train_stats, val, time.monotonic() - epoch_started)
            record["partial"] = out_of_time
            with log_path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            self._echo_epoch(record)
            if self._patience_exhausted():
                stopped = "early stopping"
            elif out_of_time:
                stopped = "time budget"
            elif stop_after is not None and done_here >= stop_after and self.epoch < self.tc.epochs:
                stopped = "stop_after_epochs"
            self._save_state(p.out / STATE_DIR, time.monotonic() - started)
        if stopped in ("completed", "early stopping"):
            shutil.rmtree(p.out / STATE_DIR, ignore_errors=True)
        checkpoint = p.out if (p.out / INFO_FILE).is_file() and self.best_epoch else None
        return TrainResult(
            out_dir=p.out,
            checkpoint=checkpoint,
            log_path=log_path,
            monitor=self.monitor,
            best_epoch=self.best_epoch,
            best_metric=self.best,
            metrics=self.best_metrics,
            epochs_run=self.epoch,
            seconds=time.monotonic() - started,
            stopped=stopped,
            skipped=list(p.data.skipped),
            resumed_from=resumed_from,
        )

    def _nan_message(self, epoch: int, step: int) -> str:
        where = f"loss became NaN at epoch {epoch} step {step}"
        if self.best_epoch is not None:
            return f"{where}; the last good checkpoint is kept at {self.p.out}"
        return f"{where}; no checkpoint of this run had been saved yet"

    def _patience_exhausted(self) -> bool:
        return self.tc.patience is not None and self.bad_epochs >= self.tc.patience

    # -- one epoch --------------------------------------------------------------------------

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _prepare_images(self, images: torch.Tensor, augment: torch.Tensor | None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if augment is not None:
            x = augment_batch(x, augment)
        x = normalise_batch(x, self.p.preprocess)
        if self.cuda and self.tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _set_train_mode(self) -> None:
        self.model.train()
        for m in self.frozen:
            m.eval()

    def _begin_step(self) -> EntityStep:
        return EntityStep(self.model, self.entity_trainable)

    def _train_epoch(self, deadline: float | None) -> tuple[dict[str, float], bool]:
        ds = self.p.data.train
        ds.set_epoch(self.epoch)
        self._set_train_mode()
        accum = self.tc.grad_accum
        total_loss = total_bce = total_con = total_box = 0.0
        seen = 0
        out_of_time = False
        t0 = time.monotonic()
        shown = "" if self.last_auroc is None else f" (val AUROC {self.last_auroc:.3f})"
        bar = tqdm(
            total=self.n_batches,
            desc=f"epoch {self.epoch + 1}/{self.tc.epochs}{shown}",
            unit="batch",
            file=sys.stderr,
            disable=not self.progress,
            leave=False,
            dynamic_ncols=True,
        )
        batches: Iterator[Any] = self.train_src.batches(
            self.batch_size,
            shuffle=True,
            seed=self.tc.seed,
            epoch=self.epoch,
            drop_last=self.drop_last,
        )
        entity_step: EntityStep | None = None
        group_left = 0
        with bar:
            for i, batch in enumerate(batches):
                if group_left == 0:
                    group_left = min(accum, self.n_batches - i)
                    group_size = group_left
                    self.optimizer.zero_grad(set_to_none=True)
                    entity_step = self._begin_step()
                params = draw_augmentation(ds, batch.indices, self.p.preprocess)
                x = self._prepare_images(batch.images, params)
                y = batch.labels.to(self.device, non_blocking=True)
                m = batch.mask.to(self.device, non_blocking=True)
                with self._autocast():
                    out = self.model(x)
                    bce = masked_bce(out.logits.float(), y, m, self.pos_weight)
                    con = self._contrastive(batch.indices)
                    loss = bce if con is None else bce + self.tc.contrastive_weight * con
                    box = self._box_loss(out.patch_attention, out.grid, batch.indices, params)
                    if box is not None:
                        loss = loss + self.tc.box_weight * box
                # one device-to-host read a step (each read waits for the GPU's queue)
                extra = [t for t in (con, box) if t is not None]
                value, bce_value, *extra_values = torch.stack(
                    [t.detach().float() for t in [loss, bce, *extra]]
                ).tolist()
                con_value = extra_values[:1] if con is not None else []
                box_value = extra_values[-1:] if box is not None else []
                if not np.isfinite(value):
                    raise _NonFinite(self.epoch + 1, i + 1)
                self.scaler.scale(loss / group_size).backward()
                group_left -= 1
                if group_left == 0:
                    assert entity_step is not None
                    entity_step.finish()
                    self._optimiser_step()
                n = len(batch.indices)
                seen += n
                total_loss += value * n
                total_bce += bce_value * n
                if con_value:
                    total_con += con_value[0] * n
                if box_value:
                    total_box += box_value[0] * n
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
                if group_left == 0 and deadline is not None and time.monotonic() > deadline:
                    out_of_time = True
                    break
        seconds = time.monotonic() - t0
        stats = {
            "train_loss": total_loss / max(seen, 1),
            "train_bce": total_bce / max(seen, 1),
            "train_images": seen,
            "train_seconds": seconds,
            "images_per_s": seen / seconds if seconds > 0 else 0.0,
        }
        if self.p.reports is not None:
            stats["train_contrastive"] = total_con / max(seen, 1)
        if self.p.boxes is not None:
            stats["train_box"] = total_box / max(seen, 1)
        return stats, out_of_time

    def _box_loss(
        self,
        attention: torch.Tensor,
        grid: tuple[int, int],
        indices: torch.Tensor,
        params: torch.Tensor,
    ) -> torch.Tensor | None:
        boxes = self.p.boxes
        return None if boxes is None else boxes.loss(attention, grid, indices, params)

    def _contrastive(self, indices: torch.Tensor) -> torch.Tensor | None:
        reports = self.p.reports
        if reports is None or self.fused is None:
            return None
        groups = reports.groups[indices]
        has = groups >= 0
        if int(has.sum()) < 2:
            return None
        rows = has.to(self.device)
        image = self.fused.mean(1)[rows]  # (b, D): mean of the fused image tokens
        text = self.model.text_proj(reports.features[indices][has].to(self.device))  # (b, D)
        return contrastive_loss(
            image, text, groups[has].to(self.device), self.tc.contrastive_temperature
        )

    def _optimiser_step(self) -> None:
        if self.tc.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.tc.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1

    # -- validation -------------------------------------------------------------------------

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        model = self.model
        model.eval()
        model.cache_entities()
        probs: list[np.ndarray] = []
        loss_sum = 0.0
        known = 0.0
        for batch in self.val_src.batches(self.eval_batch_size):
            x = self._prepare_images(batch.images, None)
            y = batch.labels.to(self.device)
            m = batch.mask.to(self.device)
            with self._autocast():
                logits = model(x).logits.float()
            k = float(m.sum())
            loss_sum += float(masked_bce(logits, y, m, self.pos_weight)) * k
            known += k
            probs.append(torch.sigmoid(logits).cpu().numpy())
        model.clear_entity_cache()
        p = np.concatenate(probs)
        if not np.isfinite(p).all():
            raise ModelError(self._nan_message(self.epoch + 1, self.n_batches) + " (val scores)")
        return {"probs": p, "loss": loss_sum / max(known, 1.0)}

    def _after_epoch(
        self, train: dict[str, float], val: dict[str, Any], seconds: float
    ) -> dict[str, Any]:
        ds = self.p.data.val
        probs = val["probs"]
        macro = macro_auroc(probs, ds.labels, ds.mask, self.names, n_boot=0)
        per = per_finding_auroc(probs, ds.labels, ds.mask, self.names, n_boot=0)
        self.last_auroc = macro.value
        value = macro.value if self.monitor == "val_macro_auroc" else val["loss"]
        improved = value is not None and (
            self.best is None
            or (value > self.best if self.monitor == "val_macro_auroc" else value < self.best)
        )
        if improved:
            assert value is not None
            self.best = float(value)
            self.best_epoch = self.epoch
            self.bad_epochs = 0
            self.best_metrics = self._save_checkpoint(probs, train, val["loss"])
        else:
            self.bad_epochs += 1
        return {
            "epoch": self.epoch,
            "step": self.step,
            **{k: (int(v) if k == "train_images" else float(v)) for k, v in train.items()},
            "val_loss": val["loss"],
            "val_macro_auroc": macro.value,
            "val_auroc": {n: r.auroc for n, r in per.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "epoch_seconds": seconds,
            "monitor": self.monitor,
            "best": bool(improved),
            "best_epoch": self.best_epoch,
        }

    def _save_checkpoint(
        self, probs: np.ndarray, train: dict[str, float], val_loss: float
    ) -> dict[str, Any]:
        p = self.p
        ds = p.data.val
        report = evaluate_classification(
            probs, ds.labels, ds.mask, self.names, n_boot=self.tc.bootstrap, seed=self.tc.seed
        ).as_dict()
        metrics = {
            "monitor": self.monitor,
            "epoch": self.epoch,
            "val_loss": val_loss,
            "train_loss": train["train_loss"],
            "val": report,
        }
        extra = {
            "ontology_name": p.ontology_name,
            "ontology_version": p.ontology_version,
            "encoder_id": p.encoder_id,
            "labels": dict(p.labels),
            "data": p.data.summary(),
            "metrics": metrics,
            "train_config": p.config.to_dict(),
            "no_kg": not p.model_config.use_kg,
            "preprocess": asdict(p.preprocess),
            "excluded_findings": dict(p.excluded),
        }
        model = self.model
        if self.tc.save_dtype == "float16":
            # a half-precision copy: the checkpoint is half the size, the training weights
            # stay in float32; load_checkpoint casts back when it loads
            if self._hook is not None:  # the hook holds the loop; copy the model alone
                self._hook.remove()
            model = copy.deepcopy(model).half()
            if self._hook is not None:
                self._hook = self.model.fusion.register_forward_hook(self._keep_fused)
        save_checkpoint(p.out, model, extra=extra)
        return metrics

    def _echo_epoch(self, r: dict[str, Any]) -> None:
        auroc = r["val_macro_auroc"]
        shown = "n/a" if auroc is None else f"{auroc:.4f}"
        mark = "  (best, saved)" if r["best"] else ""
        partial = "  [time budget reached mid-epoch]" if r.get("partial") else ""
        self.echo(
            f"epoch {r['epoch']}/{self.tc.epochs}  train loss {r['train_loss']:.4f}  val loss "
            f"{r['val_loss']:.4f}  val macro AUROC {shown}  {r['images_per_s']:.1f} img/s  "
            f"{r['epoch_seconds']:.0f} s{mark}{partial}"
        )

    # -- state ------------------------------------------------------------------------------

    def _config_for_state(self) -> dict[str, Any]:
        return self.p.config.to_dict()

    def _save_state(self, folder: Path, seconds: float) -> None:
        """Write the resumable state atomically (a new folder renamed over the old one)."""
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(model_state, str(tmp / "model.safetensors"))
        opt = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, Any] = {}
        for pid, st in opt["state"].items():
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}.{key}"] = value
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng: dict[str, torch.Tensor] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and self.cuda:
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        np_state: Any = np.random.get_state()
        rng["numpy.keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
        save_file(rng, str(tmp / "rng.safetensors"))
        py_state = random.getstate()
        meta = {
            "format": STATE_FORMAT,
            "format_version": STATE_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "best_metrics": self.best_metrics,
            "bad_epochs": self.bad_epochs,
            "monitor": self.monitor,
            "elapsed_seconds": seconds + self.elapsed_before,
            "config": self._config_for_state(),
            "no_kg": not self.p.model_config.use_kg,
            "param_groups": [
                {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
                for g in opt["param_groups"]
            ],
            "group_names": self.group_names,
            "optimizer_scalars": scalars,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": {
                "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": [py_state[0], list(py_state[1]), py_state[2]],
            },
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, allow_nan=False) + "\n")
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    def _load_state(self, folder: Path) -> None:
        try:
            meta = json.loads((folder / "state.json").read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{folder}/state.json is unreadable: {e}") from e
        if meta.get("format") != STATE_FORMAT or meta.get("format_version") != STATE_VERSION:
            raise ConfigError(f"{folder} is not a kgdx training state this version reads")
        if bool(meta.get("no_kg")) != (not self.p.model_config.use_kg):
            was = "--no-kg" if meta.get("no_kg") else "the knowledge graph"
            raise ConfigError(f"the saved run used {was}; resume it with the same switch")
        changed = _config_changes(meta.get("config") or {}, self._config_for_state())
        if changed:
            raise ConfigError(
                "the config changed since the run started, so it cannot be resumed: "
                + "; ".join(changed)
            )
        if [g for g, _ in self.group_names] != [g for g, _ in meta.get("group_names", [])]:
            raise ConfigError(f"{folder}: the optimiser groups do not fit this model")
        try:
            self.model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
            tensors = load_file(str(folder / "optimizer.safetensors"))
            rng = load_file(str(folder / "rng.safetensors"))
        except Exception as e:  # a torn or foreign file
            raise ConfigError(f"{folder}: cannot read the saved state: {e}") from e
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = (
                value.to(self.device) if name != "step" else value
            )
        for key, value in (meta.get("optimizer_scalars") or {}).items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        groups = []
        for g in meta["param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        torch.set_rng_state(rng["torch"])
        if self.cuda:
            cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
            if cuda_states:
                torch.cuda.set_rng_state_all(cuda_states)
        np_meta = meta["rng"]["numpy"]
        np.random.set_state(
            (
                np_meta[0],
                rng["numpy.keys"].numpy().astype(np.uint32),
                np_meta[1],
                np_meta[2],
                np_meta[3],
            )
        )
        py = meta["rng"]["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        self.best = meta.get("best")
        self.best_epoch = meta.get("best_epoch")
        self.best_metrics = meta.get("best_metrics") or {}
        self.bad_epochs = int(meta.get("bad_epochs", 0))
        self.monitor = meta.get("monitor", self.monitor)
        self.elapsed_before = float(meta.get("elapsed_seconds", 0.0))


def _is_entity_param(name: str) -> bool:
    return name.startswith(("gnn.", "entity_proj.")) or name == "label_embeddings"


def _monitor_for(labels: np.ndarray, mask: np.ndarray) -> str:
    """``val_macro_auroc`` when some finding has >= 5 known positives and a negative in the
    val split; otherwise early stopping watches the val loss."""
    known = mask > 0
    pos = ((labels > 0) & known).sum(0)
    neg = ((labels <= 0) & known).sum(0)
    if ((pos >= MIN_POSITIVES) & (neg > 0)).any():
        return "val_macro_auroc"
    return "val_loss"


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        if where == "source" or where in RESUMABLE_CHANGES:
            continue
        a, b = old.get(key, ADDED_KEYS.get(where)), new.get(key, ADDED_KEYS.get(where))
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_config_changes(a, b, f"{where}."))
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out
