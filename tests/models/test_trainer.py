"""The training loop on a tiny set-up: checkpoints, log, ablation, resume, NaN, bad images,
freezing, once-per-step entities, splits, exclusions, contrastive loss, time budget."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from safetensors import safe_open
from safetensors.torch import load_file

import models.trainer as trainer_module
from kg.tensors import to_arrays
from models.builder import prepare_graph
from models.checkpoint import load_checkpoint, read_checkpoint_info
from models.errors import ConfigError, DataError, ModelError
from models.model import KgdxModel
from models.trainer import STATE_DIR, EntityStep, TrainResult, train_model
from tests.models.conftest import tiny_config, tiny_ontology
from tests.models.train_fixtures import (
    FakeEncoder,
    make_images,
    make_setup,
    tiny_training_config,
    write_csv,
)

TARGETS = {"Consolidation": "X:consolidation", "Effusion": "X:effusion", "Opacity": "X:opacity"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory.mktemp("train"))


def run(
    setup: dict[str, Path], out: Path, *overrides: str, encoder: Any = None, **kwargs: Any
) -> TrainResult:
    cfg = tiny_training_config(setup, *overrides)
    return train_model(
        cfg, out, encoder=encoder or FakeEncoder(), progress=False, echo=lambda _: None, **kwargs
    )


def log_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(setup: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return run(setup, tmp_path_factory.mktemp("run") / "out")


def graph(setup: dict[str, Path]) -> tuple[Any, torch.Tensor, str]:
    onto = tiny_ontology()
    arrays, feats, _ = prepare_graph(
        onto, None, setup["root"] / "features", progress=False, encoder=FakeEncoder()
    )
    return arrays, feats, onto.content_hash()


# -- end to end ------------------------------------------------------------------------------


def test_two_epochs_write_a_loadable_checkpoint_and_log(
    trained: TrainResult, setup: dict[str, Path]
) -> None:
    out = trained.out_dir
    assert trained.stopped == "completed" and trained.epochs_run == 2
    assert trained.checkpoint == out and trained.best_epoch in (1, 2)
    assert not (out / STATE_DIR).exists()  # a finished run leaves no resumable state
    lines = log_lines(out)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_loss", "val_loss", "val_macro_auroc", "val_auroc", "lr", "best"} <= set(lines[0])
    assert set(lines[0]["val_auroc"]) == set(TARGETS)

    info = read_checkpoint_info(out)
    assert info["labels"] == TARGETS
    assert info["ontology"]["version"] == tiny_ontology().content_hash()
    assert info["encoder_id"] == FakeEncoder.encoder_id
    val = info["metrics"]["val"]
    assert set(val["per_finding"]) == set(TARGETS)
    assert {"auroc", "ci_low", "ci_high", "n_pos", "n"} <= set(val["per_finding"]["Effusion"])
    assert set(val["thresholds"]) == set(TARGETS)  # chosen on validation data
    extra = info["extra"]
    assert extra["no_kg"] is False
    assert extra["preprocess"]["image_size"] == 32
    assert extra["train_config"]["train"]["epochs"] == 2
    assert info["data"]["train"]["n"] == 15 and info["data"]["val"]["n"] == 9
    assert info["data"]["n_skipped"] == 0

    arrays, feats, version = graph(setup)
    model = load_checkpoint(out, arrays, version, node_features=feats)
    out_ = model(torch.randn(2, 1, 32, 32))
    assert out_.probabilities.shape == (2, 3)


def test_no_kg_has_no_gnn_parameters(setup: dict[str, Path], tmp_path: Path) -> None:
    enc = FakeEncoder()
    result = run(setup, tmp_path / "ablation", "train.epochs=1", encoder=enc, no_kg=True)
    assert enc.calls == 0  # no concept features needed
    weights = load_file(str(result.out_dir / "model.safetensors"))
    assert not [k for k in weights if k.startswith(("gnn.", "entity_proj."))]
    assert "label_embeddings" in weights
    info = read_checkpoint_info(result.out_dir)
    assert info["extra"]["no_kg"] is True and info["config"]["use_kg"] is False
    model = load_checkpoint(result.out_dir, None, info["ontology"]["version"])
    assert model.gnn is None


@pytest.mark.parametrize("cache", [True, False])
def test_resume_continues_bit_for_bit(setup: dict[str, Path], tmp_path: Path, cache: bool) -> None:
    flag = f"data.cache_images={str(cache).lower()}"
    run(setup, tmp_path / "a", flag)
    first = run(setup, tmp_path / "b", flag, stop_after_epochs=1)
    assert first.stopped == "stop_after_epochs" and first.epochs_run == 1
    assert (tmp_path / "b" / STATE_DIR / "state.json").is_file()
    with pytest.raises(ConfigError, match="unfinished run"):
        run(setup, tmp_path / "b", flag)  # not without --resume
    with pytest.raises(ConfigError, match=r"config changed.*train\.lr"):
        run(setup, tmp_path / "b", flag, "train.lr=0.01", resume=True)
    resumed = run(setup, tmp_path / "b", flag, resume=True)
    assert resumed.resumed_from == 1 and resumed.epochs_run == 2
    a, b = log_lines(tmp_path / "a"), log_lines(tmp_path / "b")
    assert len(b) == 2
    for key in ("train_loss", "val_loss", "val_auroc", "lr", "step"):
        assert a[1][key] == b[1][key], key
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        run(setup, tmp_path / "out", "train.device=cuda")


def test_resume_needs_state(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(setup, tmp_path / "none", resume=True)


# -- bad input -------------------------------------------------------------------------------


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer_module.masked_bce
    calls = {"train": 0}

    def poisoned(logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = real(logits, *args, **kwargs)
        if logits.requires_grad:
            calls["train"] += 1
            if calls["train"] == 4:  # epoch 2 (3 batches an epoch), its first step
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_module, "masked_bce", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(ModelError) as err:
        run(setup, out)
    assert str(err.value) == (
        f"loss became NaN at epoch 2 step 1; the last good checkpoint is kept at {out}"
    )
    info = read_checkpoint_info(out)
    assert info["metrics"]["epoch"] == 1
    assert len(log_lines(out)) == 1
    assert json.loads((out / STATE_DIR / "state.json").read_text())["epoch"] == 1


def test_nan_before_any_checkpoint(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"loss became NaN at epoch 1 step \d+; no checkpoint"):
        run(setup, tmp_path / "boom", "train.lr=1e30", "train.clip_grad_norm=1e30")


@pytest.fixture
def broken(tmp_path: Path) -> dict[str, Path]:
    setup = make_setup(tmp_path / "broken", n=12)
    rows = make_images(setup["images"], n=12)  # the same rows make_setup wrote
    (setup["images"] / "img_000.png").write_bytes(b"not a png at all")
    rows.append({**rows[1], "image": "gone.png"})
    write_csv(setup["labels"], rows)
    return setup


def test_unreadable_images_are_skipped_and_listed(broken: dict[str, Path], tmp_path: Path) -> None:
    result = run(broken, tmp_path / "out", "train.epochs=1")
    skipped = dict(result.skipped)
    assert set(skipped) == {"img_000.png", "gone.png"}
    assert skipped["gone.png"] == "missing file"
    assert skipped["img_000.png"].startswith("unreadable")
    data = read_checkpoint_info(result.out_dir)["data"]
    assert data["n_skipped"] == 2
    assert sorted(s[0] for s in data["skipped_images"]) == ["gone.png", "img_000.png"]


def test_strict_makes_them_fatal_before_training(broken: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"2 image\(s\) missing or unreadable: .*img_000\.png"):
        run(broken, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (("data.val_split=test",), DataError, "no rows with split in|validation split is empty"),
        (('data.sources=["elsewhere"]',), DataError, "training split is empty"),
        (('data.label_names=["Consolidation", "Kidney stone"]',), Exception, "Kidney stone"),
        (("model.decoder.layers=0",), ConfigError, r"decoder\.layers must be >= 1"),
        (('data.stratify="nope"', "data.val_fraction=0.3"), DataError, "stratify_key 'nope'"),
    ],
)
def test_errors_before_training(
    setup: dict[str, Path], tmp_path: Path, overrides: tuple[str, ...], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        run(setup, tmp_path / "out", *overrides)
    assert not (tmp_path / "out").exists()


# -- the step ----------------------------------------------------------------------------------


def test_entity_step_gradients_equal_recomputing_per_micro_batch(
    arrays: Any, features: torch.Tensor
) -> None:
    torch.manual_seed(0)
    model = KgdxModel(tiny_config(), arrays, features).eval()  # eval: no dropout, no BN drift
    twin = copy.deepcopy(model)
    x = torch.randn(4, 1, 32, 32)
    y = (torch.rand(4, 3) < 0.5).float()

    def loss(m: KgdxModel, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(m(xb).logits, yb) / 2

    for half in (slice(0, 2), slice(2, 4)):  # reference: E recomputed in each micro-batch
        loss(model, x[half], y[half]).backward()
    step = EntityStep(twin, trainable=True)
    for half in (slice(0, 2), slice(2, 4)):
        loss(twin, x[half], y[half]).backward()
    step.finish()
    assert twin._entity_cache is None
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        if a.grad is None:  # unused without clinical text (text_proj)
            assert b.grad is None, name
            continue
        assert b.grad is not None, name
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def test_gnn_runs_once_per_optimiser_step(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"gnn": 0}
    real = trainer_module.build_model

    def counting(*args: Any, **kwargs: Any) -> KgdxModel:
        model = real(*args, **kwargs)
        assert model.gnn is not None
        model.gnn.register_forward_hook(lambda *_: calls.__setitem__("gnn", calls["gnn"] + 1))
        return model

    monkeypatch.setattr(trainer_module, "build_model", counting)
    run(setup, tmp_path / "out", "train.grad_accum=2")
    # 3 batches an epoch in groups of 2 + 1 -> 2 steps, + 1 pass for validation; 2 epochs
    assert calls["gnn"] == 2 * (2 + 1)
    assert log_lines(tmp_path / "out")[-1]["step"] == 4


@pytest.mark.parametrize(
    ("mode", "frozen", "trained_prefix"),
    [
        ("backbone", ("image_encoder.backbone.",), ("image_encoder.proj.", "gnn.", "decoder.")),
        (
            "head_only",
            ("image_encoder.", "gnn.", "entity_proj.", "text_proj.", "modality"),
            ("fusion.", "decoder.", "query_bias"),
        ),
    ],
)
def test_freezing(
    setup: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    frozen: tuple[str, ...],
    trained_prefix: tuple[str, ...],
) -> None:
    start: dict[str, torch.Tensor] = {}
    real = trainer_module.build_model

    def keep_start(*args: Any, **kwargs: Any) -> KgdxModel:
        model = real(*args, **kwargs)
        start.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(trainer_module, "build_model", keep_start)
    result = run(setup, tmp_path / "out", "train.epochs=1", f"train.freeze={mode}")
    end = load_file(str(result.out_dir / "model.safetensors"))
    for key, value in end.items():
        if key.startswith(frozen):
            assert torch.equal(value, start[key]), f"{key} moved though frozen"
    moved = [k for k in end if k.startswith(trained_prefix) and not torch.equal(end[k], start[k])]
    assert moved


# -- data options ------------------------------------------------------------------------------


def test_excluded_finding_stays_scoreable(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run(
        setup,
        tmp_path / "zs",
        "train.epochs=1",
        'data.label_names=["Consolidation", "Effusion", "Opacity", "Pneumonia"]',
        'data.exclude_findings=["Pneumonia"]',
    )
    info = read_checkpoint_info(result.out_dir)
    assert info["labels"] == TARGETS
    assert info["extra"]["excluded_findings"] == {"Pneumonia": "X:pneumonia"}
    arrays, feats, version = graph(setup)
    model = load_checkpoint(result.out_dir, arrays, version, node_features=feats)
    out = model.score_concepts(torch.randn(2, 1, 32, 32), model.concept_indices(["X:pneumonia"]))
    assert out.probabilities.shape == (2, 1)


def test_patient_wise_val_fraction_and_label_fraction(tmp_path: Path) -> None:
    setup = make_setup(tmp_path / "nosplit", n=30)
    rows = make_images(setup["images"], n=30)
    write_csv(setup["labels"], rows, drop=["split"])
    result = run(
        setup,
        tmp_path / "out",
        "train.epochs=1",
        "data.val_fraction=0.3",
        "data.label_fraction=0.5",
    )
    data = read_checkpoint_info(result.out_dir)["data"]
    n_train, n_val = data["train"]["n"], data["val"]["n"]
    assert 6 <= n_val <= 12 and n_train < 30 - n_val  # half of the training patients kept
    assert any("patient-wise split of all rows" in n for n in data["notes"])
    assert data["train"]["patients"] + data["val"]["patients"] <= 10


def test_npz_and_dicom_datasets(setup: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
    labels = (rng.random((20, 1)) < 0.5).astype(np.uint8)
    images[labels[:, 0] == 1, 8:20, 8:20] = 255
    npz = tmp_path / "mnist.npz"
    np.savez(
        npz,
        train_images=images[:14],
        train_labels=labels[:14],
        val_images=images[14:],
        val_labels=labels[14:],
    )
    result = run(
        setup,
        tmp_path / "npz",
        "train.epochs=1",
        'data.kind="npz"',
        f"data.npz={json.dumps(str(npz))}",
        'data.label_names=["Pneumonia"]',
    )
    info = read_checkpoint_info(result.out_dir)
    assert info["labels"] == {"Pneumonia": "X:pneumonia"}
    assert info["data"]["train"]["n"] == 14 and info["data"]["val"]["n"] == 6

    folder = tmp_path / "dicom"
    folder.mkdir()
    rows = []
    for i, name in enumerate(["CT_small.dcm", "MR_small.dcm"] * 5):
        shutil.copy(get_testdata_file(name), folder / f"{i}.dcm")
        rows.append(
            {"image": f"{i}.dcm", "Effusion": str(i % 2), "split": "val" if i >= 6 else "train"}
        )
    write_csv(tmp_path / "dicom.csv", rows)
    result = run(
        setup,
        tmp_path / "dcm",
        "train.epochs=1",
        'data.kind="dicom"',
        f"data.labels={json.dumps(str(tmp_path / 'dicom.csv'))}",
        f"data.images={json.dumps(str(folder))}",
        'data.label_names=["Effusion"]',
    )
    data = read_checkpoint_info(result.out_dir)["data"]
    assert data["train"]["n"] == 6 and data["val"]["n"] == 4
    assert data["train"]["patients"] == 2  # PatientID read from the DICOM headers


def test_contrastive_loss_with_reports(tmp_path: Path) -> None:
    setup = make_setup(tmp_path / "reports", n=24)
    rows = make_images(setup["images"], n=24)
    for r in rows:
        parts = ["left opacity"] if r["Consolidation"] == "1" else []
        parts += ["right effusion"] if r["Effusion"] == "1" else []
        r["report"] = ", ".join(parts) or "clear lungs"
    write_csv(setup["labels"], rows)
    enc = FakeEncoder()
    result = run(
        setup, tmp_path / "out", "train.epochs=1", "train.contrastive_weight=0.5", encoder=enc
    )
    line = log_lines(result.out_dir)[0]
    assert line["train_contrastive"] > 0
    assert line["train_loss"] > line["train_bce"]


def test_time_budget_stops_and_keeps_state(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run(setup, tmp_path / "out", "train.max_minutes=0.00001")
    assert result.stopped == "time budget" and result.epochs_run == 1
    assert log_lines(result.out_dir)[0]["partial"] is True
    assert log_lines(result.out_dir)[0]["train_images"] == 4  # one step, then out of time
    assert (result.out_dir / STATE_DIR / "state.json").is_file()


def test_half_precision_checkpoint_loads(setup: dict[str, Path], tmp_path: Path) -> None:
    result = run(setup, tmp_path / "out", "train.epochs=1", "train.save_dtype=float16")
    with safe_open(str(result.out_dir / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("decoder.blocks.0.cross_attn.q.weight").dtype == torch.float16
    arrays, feats, version = graph(setup)
    model = load_checkpoint(result.out_dir, arrays, version, node_features=feats)
    assert next(model.parameters()).dtype == torch.float32


def test_output_folder_that_is_a_file(setup: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run(setup, target)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_arrays_fixture_is_the_tiny_graph(arrays: Any) -> None:
    assert arrays.node_ids == to_arrays(tiny_ontology()).node_ids


def test_a_run_saved_before_a_key_existed_still_resumes() -> None:
    from models.trainer import _config_changes

    old = {"train": {"epochs": 2}, "data": {"labels": "l.csv"}, "model": {"decoder": {}}}
    new: dict[str, dict[str, Any]] = {
        "train": {"epochs": 2, "box_weight": 0.0},
        "data": {"labels": "l.csv", "boxes": None},
        "model": {"decoder": {"map_gradient": "all"}},
    }
    assert _config_changes(old, new) == []
    new["train"]["box_weight"] = 1.0
    assert _config_changes(old, new) == ["train.box_weight: 0.0 -> 1.0"]
