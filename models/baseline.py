"""The plain classifier every knowledge claim is measured against: a CNN, global average
pooling and one linear layer, with class activation maps for localisation.

``backbone = "densenet121"`` is MONAI's ``DenseNet121(spatial_dims=2, in_channels=1,
out_channels=K)`` itself (its ``features`` and its classifier ``class_layers.out``; the
logits equal the MONAI network's); the other backbones (``resnet18`` / ``34`` / ``50``,
``cnn`` for tests) are the feature extractors of :class:`~models.image_encoder.ImageEncoder`,
so a plain classifier on the kgdx recipe's own backbone is one setting away.

Class activation maps (Zhou et al., "Learning Deep Features for Discriminative Localization",
CVPR 2016): with ``F (B, C, h, w)`` the last (ReLU'd) feature map and ``W (K, C)``, ``b (K,)``
the classifier, ``CAM_k = sum_c W[k, c] F[:, c] + b[k]``; because the logits are
``W mean_hw(F) + b``, ``mean_hw(CAM_k)`` *is* logit ``k``. The CAM grid spans the model input
like the kgdx heat maps do (``S / 32`` per side for DenseNet-121 and the ResNets), so the
pointing game scores both the same way (:mod:`models.localisation`).

:func:`train_baseline` trains it with the kgdx recipe's data, augmentation, loss, optimiser
groups, schedule, early stopping and time budget (the helpers of :mod:`models.train_data`,
:mod:`models.losses`, :mod:`models.schedule`, :mod:`models.trainer`), since the kgdx loop
itself is built around :class:`~models.model.KgdxModel` (shared entity embeddings per step,
the fusion hook, its checkpoint format). A run writes ``OUT/model.safetensors`` +
``OUT/baseline.json`` (config, label names, preprocessing, data summary, the best epoch's
validation metrics with thresholds, the training config) and ``OUT/train_log.jsonl``; there
is no resumable state: a run stopped by its time budget keeps its best checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from models.box_supervision import training_boxes
from models.checkpoint import write_weights_and_info
from models.errors import CheckpointError, ConfigError, ModelError
from models.image_encoder import ImageEncoder, ImageEncoderConfig
from models.losses import auto_pos_weight, masked_bce
from models.metrics import MIN_POSITIVES, evaluate_classification, macro_auroc
from models.schedule import build_scheduler, warmup_steps_for
from models.train_config import TrainingConfig
from models.train_data import (
    ImageSource,
    augment_batch,
    build_datasets,
    draw_augmentation,
    normalise_batch,
)
from models.trainer import LOG_FILE, TrainResult, param_groups, resolve_device, seed_everything
from models.transforms import Geometry, Preprocess, PreprocessConfig, preprocess_images

log = logging.getLogger(__name__)

#: Backbones a plain classifier can use (CNNs: their feature maps give CAMs).
BASELINE_BACKBONES = ("densenet121", "resnet18", "resnet34", "resnet50", "cnn")
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "baseline.json"
FORMAT = "kgdx-baseline"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class BaselineConfig:
    """A plain classifier: backbone, global average pooling, one linear layer.

    Args:
        targets: the label names, in output order.
        backbone: one of :data:`BASELINE_BACKBONES` (default ``"densenet121"``, MONAI).
        image_size: side of the square single-channel input in pixels (default 224).
        name: model name in reports (default ``"plain-<backbone>"``).
        map_gradient: where a loss on the CAMs (the box loss) sends its gradient in
            training: ``"all"`` (default) into the classifier and the backbone;
            ``"projections"`` to the classifier's weights only (the CAM is recomputed from the
            detached feature map: the same values), as the kgdx decoder's option of that name.
    """

    targets: list[str]  # label names, output order
    backbone: str = "densenet121"  # densenet121 | resnet18 | resnet34 | resnet50 | cnn
    image_size: int = 224  # square input side in pixels
    name: str = ""  # model name in reports; "" -> plain-<backbone>
    map_gradient: str = "all"  # "all" | "projections": what a loss on the CAMs trains

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("baseline targets must name at least one label")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"baseline targets have duplicates: {self.targets}")
        if self.backbone not in BASELINE_BACKBONES:
            raise ConfigError(
                f"baseline backbone must be one of {', '.join(BASELINE_BACKBONES)}, got "
                f"{self.backbone!r}"
            )
        if self.image_size < 8:
            raise ConfigError(f"baseline image_size must be >= 8, got {self.image_size}")
        if self.map_gradient not in ("all", "projections"):
            raise ConfigError(
                f"baseline map_gradient must be 'all' or 'projections', got {self.map_gradient!r}"
            )
        if not self.name:
            self.name = f"plain-{self.backbone}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaselineConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown baseline config key(s): {', '.join(unknown)}")
        return cls(**{**data, "targets": list(data.get("targets") or [])})


@dataclass
class BaselineOutput:
    """Scores and class activation maps of :class:`BaselineClassifier`.

    Attributes:
        logits: (B, K) one logit per finding.
        probabilities: (B, K) ``sigmoid(logits)``.
        cam: (B, K, rows, cols) class activation maps (``mean`` over the grid = ``logits``).
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    cam: torch.Tensor

    def heatmaps(self) -> torch.Tensor:
        """The CAMs, shaped like :meth:`~models.outputs.KgdxOutput.heatmaps`.

        Shapes:
            returns (B, K, rows, cols).
        """
        return self.cam


class BaselineClassifier(nn.Module):
    """Backbone -> ReLU'd feature map -> global average pool -> linear (+ CAMs).

    Args:
        config: :class:`BaselineConfig`.

    Shapes:
        images: (B, 1, S, S) -> :class:`BaselineOutput` (logits (B, K), cam (B, K, h, w)).
    """

    def __init__(self, config: BaselineConfig):
        super().__init__()
        self.config = config
        k = len(config.targets)
        self.backbone: nn.Module
        self.classifier: nn.Linear
        if config.backbone == "densenet121":
            from monai.networks.nets import DenseNet121

            net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=k)
            # MONAI's head is ReLU -> adaptive average pool -> flatten -> Linear: forward()
            # below computes the same logits and keeps the feature map for the CAMs.
            self.backbone = net.features
            out = net.class_layers.out
            assert isinstance(out, nn.Linear)
            self.classifier = out
        else:
            encoder = ImageEncoder(
                ImageEncoderConfig(backbone=config.backbone, image_size=config.image_size)
            )
            self.backbone = encoder.backbone
            self.classifier = nn.Linear(encoder.feature_channels, k)
        #: ``baseline.json`` contents once loaded by :func:`load_baseline`.
        self.info: dict[str, Any] = {}

    def forward(self, images: torch.Tensor) -> BaselineOutput:
        """Logits, probabilities and CAMs of a batch.

        Shapes:
            images: (B, 1, H, W) -> logits (B, K), cam (B, K, rows, cols).
        """
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (B, 1, H, W), got {tuple(images.shape)}")
        fmap = torch.relu(self.backbone(images))  # (B, C, h, w)
        logits = self.classifier(fmap.mean(dim=(2, 3)))  # (B, K)
        w, b = self.classifier.weight, self.classifier.bias
        if self.config.map_gradient == "projections" and self.training and torch.is_grad_enabled():
            fmap = fmap.detach()  # a loss on the CAMs then trains the classifier alone
        cam = torch.einsum("kc,bchw->bkhw", w.to(fmap.dtype), fmap)  # (B, K, h, w)
        cam = cam + b.to(fmap.dtype).view(1, -1, 1, 1)
        return BaselineOutput(logits=logits, probabilities=torch.sigmoid(logits), cam=cam)


# ---------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------


def save_baseline(
    directory: str | Path,
    model: BaselineClassifier,
    extra: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> Path:
    """Write ``model.safetensors`` + ``baseline.json`` to ``directory`` (atomic renames).

    Args:
        directory: target folder (created).
        model: the classifier.
        extra: JSON-able entries for ``baseline.json`` (``preprocess``, ``data``,
            ``metrics``, ``train_config``, ...).
        dtype: ``"float32"`` or ``"float16"`` (half the size; :func:`load_baseline` casts
            back).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": model.config.name,
        "config": model.config.to_dict(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": dtype,
        **(extra or {}),
    }
    text = json.dumps(info, indent=2, allow_nan=False)
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().cpu().contiguous()
        if dtype == "float16" and t.is_floating_point():
            t = t.half()
        tensors[key] = t
    write_weights_and_info(
        directory,
        tensors,
        {"format": FORMAT},
        text,
        weights_file=WEIGHTS_FILE,
        info_file=INFO_FILE,
    )
    return directory


def read_baseline_info(directory: str | Path) -> dict[str, Any]:
    """The parsed ``baseline.json`` of ``directory``."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a baseline checkpoint (no {INFO_FILE})")
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from e
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: not a {FORMAT} version {FORMAT_VERSION} checkpoint "
            f"(format={info.get('format')!r}, version={info.get('format_version')!r})"
        )
    return info


def load_baseline(directory: str | Path, device: str | torch.device = "cpu") -> BaselineClassifier:
    """Rebuild the classifier saved in ``directory`` (float32, eval mode, on ``device``)."""
    directory = Path(directory)
    info = read_baseline_info(directory)
    try:
        config = BaselineConfig.from_dict(info["config"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory}: bad config in {INFO_FILE}: {e}") from e
    model = BaselineClassifier(config)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device="cpu")
    except Exception as e:  # a missing, torn or foreign file
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable: {e}") from e
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: weights do not fit the config: {e}") from e
    model.info = info
    return model.to(device).eval()


class BaselinePredictor:
    """A loaded baseline with the ``preprocess -> predict`` stages of
    :class:`~models.inference.Predictor` (same letterbox and normalisation as training).

    Attributes:
        model: the classifier, eval mode, on :attr:`device`.
        names: the ``K`` label names of the outputs.
        thresholds: decision thresholds chosen on the validation data, by name, or None.
    """

    def __init__(
        self, model: BaselineClassifier, preprocess: PreprocessConfig, device: torch.device
    ):
        self.model = model.eval()
        self.device = device
        self.preprocessor = Preprocess(preprocess, train=False)
        self.names = list(model.config.targets)
        val = ((model.info.get("metrics") or {}).get("val")) or {}
        thresholds = val.get("thresholds") if isinstance(val, dict) else None
        self.thresholds: dict[str, float] | None = (
            {n: float(thresholds[n]) for n in self.names}
            if isinstance(thresholds, dict) and all(n in thresholds for n in self.names)
            else None
        )

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> BaselinePredictor:
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device
        )
        model = load_baseline(directory, dev)
        stored = model.info.get("preprocess")
        try:
            pre = (
                PreprocessConfig(**stored)
                if isinstance(stored, dict)
                else PreprocessConfig(image_size=model.config.image_size)
            )
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{directory}: bad preprocess settings: {e}") from e
        return cls(model, pre, dev)

    @property
    def image_size(self) -> int:
        return self.preprocessor.size

    def describe(self) -> dict[str, Any]:
        return {
            "model": {
                "name": self.model.config.name,
                "backbone": self.model.config.backbone,
                "image_size": self.image_size,
                "findings": list(self.names),
            }
        }

    def preprocess(
        self, images: Sequence[np.ndarray | torch.Tensor]
    ) -> tuple[torch.Tensor, list[Geometry]]:
        """Decoded grayscale images in [0, 1] -> ``(B, 1, S, S)`` batch and geometries."""
        return preprocess_images(self.preprocessor, images)

    def predict(self, batch: torch.Tensor) -> BaselineOutput:
        """Scores and CAMs of a preprocessed batch, float32 on the CPU."""
        with torch.inference_mode():
            out = self.model(batch.to(self.device))
        return BaselineOutput(
            logits=out.logits.float().cpu(),
            probabilities=out.probabilities.float().cpu(),
            cam=out.cam.float().cpu(),
        )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _monitor(labels: np.ndarray, mask: np.ndarray) -> str:
    """As the kgdx trainer: val macro AUROC when a finding has >= 5 known positives and a
    negative in the val split, else the val loss."""
    known = mask > 0
    pos = ((labels > 0) & known).sum(0)
    neg = ((labels <= 0) & known).sum(0)
    return "val_macro_auroc" if ((pos >= MIN_POSITIVES) & (neg > 0)).any() else "val_loss"


@dataclass
class _Run:
    """Counters of one baseline run."""

    epoch: int = 0
    step: int = 0
    best: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    best_metrics: dict[str, Any] = field(default_factory=dict)


def train_baseline(
    config: TrainingConfig,
    out_dir: str | Path,
    *,
    backbone: str | None = None,
    strict: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a plain classifier with the recipe of ``config``; the best epoch goes to
    ``out_dir``.

    Uses the recipe's data and splits (``[data]``), preprocessing and batched augmentation,
    image size (``model.image.image_size``), and ``[train]``: epochs, batch size, AdamW with
    ``backbone_lr`` on the backbone and ``lr`` on the classifier (no decay on biases and
    norms), warm-up + cosine per optimiser step, gradient accumulation and clipping,
    ``pos_weight``, ``freeze`` (``backbone`` / ``head_only``: only the classifier trains),
    early stopping on the val macro AUROC with ``patience``, ``max_minutes``, ``seed``,
    ``bootstrap``, ``save_dtype``, ``threads``, AMP on CUDA, and the box loss on the CAMs
    (``train.box_weight``, :mod:`models.box_supervision`). The contrastive loss does not apply.

    Args:
        config: a checked training config (the kgdx recipe).
        out_dir: output folder.
        backbone: one of :data:`BASELINE_BACKBONES` (default: the recipe's
            ``model.image.backbone``).
        strict: missing or unreadable images are fatal.
        progress: progress bars on stderr (terminals only).
        echo: receives one line per epoch; None logs them.

    Raises:
        ConfigError, DataError: before training; ModelError: a NaN / infinite loss.
    """
    started = time.monotonic()
    tc = config.train
    image = dict(config.model.get("image") or {})
    chosen = backbone or str(image.get("backbone", ImageEncoderConfig().backbone))
    preprocess = config.preprocess_config()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a folder")
    device = resolve_device(tc.device)
    if tc.threads is not None:
        torch.set_num_threads(tc.threads)  # as the kgdx trainer: fewer threads on a busy CPU
    data = build_datasets(config.data, preprocess, seed=tc.seed, strict=strict)
    names = list(data.label_names)
    boxes = training_boxes(config, data)
    seed_everything(tc.seed)
    model = BaselineClassifier(
        BaselineConfig(
            targets=names,
            backbone=chosen,
            image_size=preprocess.image_size,
            map_gradient=cam_map_gradient(config),
        )
    ).to(device)
    if tc.contrastive_weight > 0:
        log.warning("train.contrastive_weight ignored: the plain classifier has no text side")
    frozen = tc.freeze != "none"
    if frozen:
        model.backbone.requires_grad_(False)
    groups = param_groups(model.classifier, tc.lr, None, tc.weight_decay)
    if not frozen:
        backbone_lr = tc.backbone_lr if tc.backbone_lr is not None else tc.lr
        groups = param_groups(model.backbone, backbone_lr, None, tc.weight_decay) + groups
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)

    cuda = device.type == "cuda"
    show = progress and sys.stderr.isatty()
    cache = config.data.cache_images
    train_src = ImageSource(
        data.train, cache=cache, num_workers=tc.num_workers, progress=show, pin_memory=cuda
    )
    val_src = ImageSource(
        data.val, cache=cache, num_workers=tc.num_workers, progress=show, pin_memory=cuda
    )
    drop_last = len(data.train) >= tc.batch_size
    n_batches = train_src.num_batches(tc.batch_size, drop_last)
    total_steps = tc.epochs * -(-n_batches // tc.grad_accum)
    scheduler = build_scheduler(
        optimizer, total_steps, warmup_steps_for(total_steps, tc.warmup), tc.min_lr_ratio
    )
    pos_weight = (
        auto_pos_weight(data.train.labels, data.train.mask).to(device)
        if tc.pos_weight == "auto"
        else None
    )
    amp: torch.dtype | None = None
    if cuda and tc.amp:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)

    def autocast() -> AbstractContextManager[Any]:
        return nullcontext() if amp is None else torch.autocast("cuda", dtype=amp)

    def prepare(x: torch.Tensor, params: torch.Tensor | None) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        if params is not None:
            x = augment_batch(x, params)
        return normalise_batch(x, preprocess)

    say = echo or (lambda line: log.info("%s", line))
    monitor = _monitor(data.val.labels, data.val.mask)
    deadline = started + tc.max_minutes * 60 if tc.max_minutes else None
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log_path.write_text("")
    run = _Run()
    stopped = "completed"
    eval_batch = tc.eval_batch_size or 2 * tc.batch_size
    while run.epoch < tc.epochs:
        epoch_started = time.monotonic()
        data.train.set_epoch(run.epoch)
        model.train()
        if frozen:
            model.backbone.eval()
        total, seen, group_left, group_size = 0.0, 0, 0, 1
        out_of_time = False
        bar = tqdm(
            total=n_batches,
            desc=f"epoch {run.epoch + 1}/{tc.epochs}",
            unit="batch",
            file=sys.stderr,
            disable=not show,
            leave=False,
        )
        batches = train_src.batches(
            tc.batch_size, shuffle=True, seed=tc.seed, epoch=run.epoch, drop_last=drop_last
        )
        with bar:
            for i, batch in enumerate(batches):
                if group_left == 0:
                    group_left = group_size = min(tc.grad_accum, n_batches - i)
                    optimizer.zero_grad(set_to_none=True)
                params = draw_augmentation(data.train, batch.indices, preprocess)
                x = prepare(batch.images, params)
                with autocast():
                    output = model(x)
                    loss = masked_bce(
                        output.logits.float(),
                        batch.labels.to(device),
                        batch.mask.to(device),
                        pos_weight,
                    )
                    if boxes is not None:  # the CAM's softmax over cells is its heat map
                        cam = output.cam.float()  # (B, K, rows, cols)
                        maps = torch.softmax(cam.flatten(2), dim=-1)  # (B, K, rows * cols)
                        grid = (cam.shape[-2], cam.shape[-1])
                        loss = loss + tc.box_weight * boxes.loss(maps, grid, batch.indices, params)
                value = float(loss.detach())
                if not np.isfinite(value):
                    kept = f"; the best checkpoint is kept at {out}" if run.best_epoch else ""
                    raise ModelError(f"loss became NaN at epoch {run.epoch + 1} step {i + 1}{kept}")
                scaler.scale(loss / group_size).backward()
                group_left -= 1
                if group_left == 0:
                    if tc.clip_grad_norm is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    run.step += 1
                total += value * len(batch.indices)
                seen += len(batch.indices)
                bar.update(1)
                if group_left == 0 and deadline is not None and time.monotonic() > deadline:
                    out_of_time = True
                    break
        train_seconds = time.monotonic() - epoch_started

        probs, val_loss = _validate(model, val_src, eval_batch, prepare, autocast, pos_weight)
        run.epoch += 1
        ds = data.val
        macro = macro_auroc(probs, ds.labels, ds.mask, names, n_boot=0).value
        value_now = macro if monitor == "val_macro_auroc" else val_loss
        improved = value_now is not None and (
            run.best is None
            or (value_now > run.best if monitor == "val_macro_auroc" else value_now < run.best)
        )
        if improved:
            assert value_now is not None
            run.best, run.best_epoch, run.bad_epochs = float(value_now), run.epoch, 0
            report = evaluate_classification(
                probs, ds.labels, ds.mask, names, n_boot=tc.bootstrap, seed=tc.seed
            ).as_dict()
            run.best_metrics = {
                "monitor": monitor,
                "epoch": run.epoch,
                "val_loss": val_loss,
                "train_loss": total / max(seen, 1),
                "val": report,
            }
            save_baseline(
                out,
                model,
                extra={
                    "labels": names,
                    "preprocess": asdict(preprocess),
                    "data": data.summary(),
                    "metrics": run.best_metrics,
                    "train_config": config.to_dict(),
                },
                dtype=tc.save_dtype,
            )
        else:
            run.bad_epochs += 1
        record = {
            "epoch": run.epoch,
            "step": run.step,
            "train_loss": total / max(seen, 1),
            "train_images": seen,
            "images_per_s": seen / train_seconds if train_seconds > 0 else 0.0,
            "val_loss": val_loss,
            "val_macro_auroc": macro,
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": time.monotonic() - epoch_started,
            "monitor": monitor,
            "best": bool(improved),
            "best_epoch": run.best_epoch,
            "partial": out_of_time,
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        shown = "n/a" if macro is None else f"{macro:.4f}"
        say(
            f"epoch {run.epoch}/{tc.epochs}  train loss {record['train_loss']:.4f}  val loss "
            f"{val_loss:.4f}  val macro AUROC {shown}  {record['images_per_s']:.1f} img/s  "
            f"{record['epoch_seconds']:.0f} s" + ("  (best, saved)" if improved else "")
        )
        if tc.patience is not None and run.bad_epochs >= tc.patience:
            stopped = "early stopping"
            break
        if out_of_time:
            stopped = "time budget"
            break
    return TrainResult(
        out_dir=out,
        checkpoint=out if run.best_epoch is not None else None,
        log_path=log_path,
        monitor=monitor,
        best_epoch=run.best_epoch,
        best_metric=run.best,
        metrics=run.best_metrics,
        epochs_run=run.epoch,
        seconds=time.monotonic() - started,
        stopped=stopped,
        skipped=list(data.skipped),
    )


@torch.no_grad()
def _validate(
    model: BaselineClassifier,
    source: ImageSource,
    batch_size: int,
    prepare: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    autocast: Callable[[], AbstractContextManager[Any]],
    pos_weight: torch.Tensor | None,
) -> tuple[np.ndarray, float]:
    """Validation probabilities ``(N, K)`` and the masked BCE over the known labels."""
    model.eval()
    device = next(model.parameters()).device
    probs: list[np.ndarray] = []
    loss_sum = known = 0.0
    for batch in source.batches(batch_size):
        with autocast():
            logits = model(prepare(batch.images, None)).logits.float()
        m = batch.mask.to(device)
        k = float(m.sum())
        loss_sum += float(masked_bce(logits, batch.labels.to(device), m, pos_weight)) * k
        known += k
        probs.append(torch.sigmoid(logits).cpu().numpy())
    p = np.concatenate(probs)
    if not np.isfinite(p).all():
        raise ModelError("validation scores became NaN")
    return p, loss_sum / max(known, 1.0)


def cam_map_gradient(config: TrainingConfig) -> str:
    """The recipe's ``decoder.map_gradient`` for the CAMs: the kgdx heat map's choice holds
    for them too, and ``"fusion"`` (no box gradient into the CNN) is ``"projections"`` here,
    nothing lying between a plain classifier's CNN and its class weights."""
    chosen = str((config.model.get("decoder") or {}).get("map_gradient", "all"))
    return "projections" if chosen == "fusion" else chosen
