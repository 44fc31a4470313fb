"""The plain classifier: MONAI DenseNet-121 equivalence, class activation maps, checkpoints,
the predictor's stages, and training with the recipe's helpers on the tiny set-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121
from safetensors.torch import load_file

import models.baseline as baseline_module
from models.baseline import (
    INFO_FILE,
    WEIGHTS_FILE,
    BaselineClassifier,
    BaselineConfig,
    BaselinePredictor,
    load_baseline,
    read_baseline_info,
    save_baseline,
    train_baseline,
)
from models.errors import CheckpointError, ConfigError, ModelError
from tests.models.train_fixtures import make_setup, tiny_training_config

NAMES = ["Consolidation", "Effusion", "Opacity"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory.mktemp("baseline"))


def log_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# -- model ------------------------------------------------------------------------------------


def test_densenet121_is_monai_densenet121() -> None:
    """Same constructor, same initial weights, same logits as MONAI's network."""
    torch.manual_seed(0)
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    torch.manual_seed(0)
    model = BaselineClassifier(BaselineConfig(NAMES, "densenet121", image_size=64)).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x))
    assert model.config.name == "plain-densenet121"


@pytest.mark.parametrize(
    ("backbone", "size", "grid"),
    [("densenet121", 64, (2, 2)), ("resnet18", 64, (2, 2)), ("cnn", 32, (4, 4))],
)
def test_cam_is_the_logit_before_pooling(backbone: str, size: int, grid: tuple[int, int]) -> None:
    """Shapes, and CAM_k averaged over the grid equals logit k (Zhou et al. 2016)."""
    model = BaselineClassifier(BaselineConfig(NAMES, backbone, image_size=size)).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 1, size, size))
    assert out.logits.shape == out.probabilities.shape == (3, 3)
    assert out.cam.shape == (3, 3, *grid)
    assert out.heatmaps() is out.cam
    torch.testing.assert_close(out.cam.mean(dim=(2, 3)), out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.probabilities, torch.sigmoid(out.logits))


def test_cam_of_a_hand_made_classifier() -> None:
    """The CAM is the classifier weights applied at every position of the feature map."""
    model = BaselineClassifier(BaselineConfig(["a", "b"], "cnn", image_size=32)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        fmap = torch.relu(model.backbone(x))[0]  # (C, h, w)
        out = model(x)
    w, b = model.classifier.weight, model.classifier.bias
    expected = torch.einsum("kc,chw->khw", w, fmap) + b[:, None, None]
    torch.testing.assert_close(out.cam[0], expected.detach())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": []}, "at least one label"),
        ({"targets": ["a", "a"]}, "duplicates"),
        ({"targets": ["a"], "backbone": "vit"}, "backbone must be one of"),
        ({"targets": ["a"], "image_size": 4}, "image_size must be >= 8"),
    ],
)
def test_config_is_checked(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BaselineConfig(**kwargs)


def test_images_must_be_single_channel() -> None:
    model = BaselineClassifier(BaselineConfig(NAMES, "cnn", image_size=32))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 32, 32))


# -- checkpoint -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_save_and_load_round_trip(tmp_path: Path, dtype: str) -> None:
    model = BaselineClassifier(BaselineConfig(NAMES, "cnn", image_size=32)).eval()
    save_baseline(tmp_path, model, extra={"labels": NAMES}, dtype=dtype)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    want = torch.float16 if dtype == "float16" else torch.float32
    assert weights["classifier.weight"].dtype == want
    loaded = load_baseline(tmp_path)
    assert loaded.info["labels"] == NAMES and loaded.info["weights_dtype"] == dtype
    assert next(loaded.parameters()).dtype == torch.float32
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        tol = 1e-2 if dtype == "float16" else 1e-6
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=tol, rtol=tol)


def test_foreign_or_missing_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a baseline checkpoint"):
        read_baseline_info(tmp_path)
    (tmp_path / INFO_FILE).write_text(json.dumps({"format": "kgdx-checkpoint"}))
    with pytest.raises(CheckpointError, match="not a kgdx-baseline"):
        load_baseline(tmp_path)
    model = BaselineClassifier(BaselineConfig(NAMES, "cnn", image_size=32))
    save_baseline(tmp_path, model)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"torn")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_baseline(tmp_path)


# -- training ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("run") / "plain"
    return train_baseline(tiny_training_config(setup), out, progress=False, echo=lambda _: None)


def test_training_writes_a_checkpoint_log_and_val_metrics(trained: Any) -> None:
    out = trained.out_dir
    assert trained.stopped == "completed" and trained.epochs_run == 2
    assert trained.checkpoint == out and trained.best_epoch in (1, 2)
    assert [r["epoch"] for r in log_lines(out)] == [1, 2]
    info = read_baseline_info(out)
    assert info["config"]["backbone"] == "cnn"  # the recipe's backbone by default
    assert info["config"]["targets"] == NAMES and info["config"]["image_size"] == 32
    assert info["preprocess"]["image_size"] == 32
    assert info["train_config"]["train"]["epochs"] == 2
    assert info["data"]["train"]["n"] == 15 and info["data"]["val"]["n"] == 9
    val = info["metrics"]["val"]
    assert set(val["per_finding"]) == set(NAMES) and set(val["thresholds"]) == set(NAMES)

    predictor = BaselinePredictor.load(out)
    assert predictor.names == NAMES and predictor.thresholds == val["thresholds"]
    batch, geometries = predictor.preprocess([np.random.default_rng(0).random((40, 30))])
    assert batch.shape == (1, 1, 32, 32) and geometries[0].orig_width == 30
    output = predictor.predict(batch)
    assert output.probabilities.shape == (1, 3) and output.cam.shape == (1, 3, 4, 4)


def test_training_is_reproducible(setup: dict[str, Path], trained: Any, tmp_path: Path) -> None:
    again = train_baseline(
        tiny_training_config(setup), tmp_path / "again", progress=False, echo=lambda _: None
    )
    a = load_file(str(trained.out_dir / WEIGHTS_FILE))
    b = load_file(str(again.out_dir / WEIGHTS_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_lines(trained.out_dir)[1]["train_loss"] == log_lines(again.out_dir)[1]["train_loss"]


def test_backbone_lr_and_freezing(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[list[dict[str, Any]]] = []
    adamw = torch.optim.AdamW

    def spy(params: Any, **kwargs: Any) -> torch.optim.Optimizer:
        groups.append([dict(g) for g in params])
        return adamw(params, **kwargs)

    monkeypatch.setattr(baseline_module.torch.optim, "AdamW", spy)
    cfg = tiny_training_config(setup, "train.epochs=1", "train.backbone_lr=0.01")
    result = train_baseline(
        cfg, tmp_path / "lr", backbone="densenet121", progress=False, echo=lambda _: None
    )
    assert load_baseline(result.out_dir).config.backbone == "densenet121"
    lrs = {(g["lr"], len(g["params"]) > 2) for g in groups[0]}
    assert (0.01, True) in lrs  # the backbone's many tensors at backbone_lr
    assert {g["lr"] for g in groups[0] if len(g["params"]) <= 2} == {0.003}  # the classifier
    assert {g["weight_decay"] for g in groups[0]} == {0.0, 0.05}

    frozen = train_baseline(
        tiny_training_config(setup, "train.epochs=1", "train.freeze=backbone"),
        tmp_path / "frozen",
        progress=False,
        echo=lambda _: None,
    )
    assert sum(len(g["params"]) for g in groups[-1]) == 2  # the classifier's weight and bias
    torch.manual_seed(0)  # the run seeds the model with train.seed = 0 before building it
    fresh = BaselineClassifier(BaselineConfig(NAMES, "cnn", image_size=32)).state_dict()
    weights = load_file(str(frozen.out_dir / WEIGHTS_FILE))
    conv = "backbone.body.0.weight"
    assert torch.equal(weights[conv], fresh[conv])  # frozen backbone unchanged


def test_time_budget_keeps_the_best_checkpoint(setup: dict[str, Path], tmp_path: Path) -> None:
    result = train_baseline(
        tiny_training_config(setup, "train.max_minutes=0.00001"),
        tmp_path / "budget",
        progress=False,
        echo=lambda _: None,
    )
    assert result.stopped == "time budget" and result.epochs_run == 1
    assert result.checkpoint is not None and log_lines(result.out_dir)[0]["partial"] is True


def test_nan_loss_stops_with_a_clear_error(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = baseline_module.masked_bce

    def nan_bce(*args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(*args, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() else loss

    monkeypatch.setattr(baseline_module, "masked_bce", nan_bce)
    with pytest.raises(ModelError, match=r"loss became NaN at epoch 1 step 1"):
        train_baseline(
            tiny_training_config(setup), tmp_path / "nan", progress=False, echo=lambda _: None
        )


def test_map_gradient_projections_trains_only_the_classifier_from_the_cams() -> None:
    grads = {}
    cams = {}
    for mode in ("all", "projections"):
        torch.manual_seed(0)
        model = BaselineClassifier(BaselineConfig(NAMES, "cnn", image_size=32, map_gradient=mode))
        x = torch.randn(2, 1, 32, 32)
        out = model(x)
        out.cam[:, 0, 0, 0].sum().backward()  # a loss on the CAMs alone
        cams[mode] = out.cam.detach()
        grads[mode] = [p.grad for p in model.backbone.parameters() if p.grad is not None]
        assert model.classifier.weight.grad is not None
        assert model.classifier.weight.grad.abs().sum() > 0
    assert any(g.abs().sum() > 0 for g in grads["all"])
    assert not grads["projections"]
    torch.testing.assert_close(cams["all"], cams["projections"])
    with pytest.raises(ConfigError, match="map_gradient must be"):
        BaselineConfig(NAMES, map_gradient="features")


@pytest.mark.parametrize(
    ("recipe", "cams"), [("all", "all"), ("projections", "projections"), ("fusion", "projections")]
)
def test_cams_follow_the_recipes_map_gradient(
    setup: dict[str, Path], recipe: str, cams: str
) -> None:
    config = tiny_training_config(setup)
    config.model.setdefault("decoder", {})["map_gradient"] = recipe
    assert baseline_module.cam_map_gradient(config) == cams
