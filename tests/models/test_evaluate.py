"""``run_evaluation``: report keys and values, masked labels, ROC plot, faithfulness,
localisation with a synthetic box, and bad input."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kg.ontology import Ontology
from kg.tensors import GraphArrays
from models import default_checkpoint
from models.errors import CheckpointError, DataError
from models.evaluate import run_evaluation
from models.faithfulness import DeletionConfig
from models.inference import Predictor, zero_shot_scores
from models.localisation import Box, localise, scale_box
from models.metrics import per_finding_auroc
from tests.models.tiny_checkpoint import NAMES, save_tiny, store_ontology, tiny_model, write_png

N_IMAGES = 16


@pytest.fixture
def predictor(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, ontology: Ontology, tmp_home: Path
) -> Predictor:
    version = store_ontology(ontology, features, tmp_home)
    save_tiny(tmp_path / "ckpt", tiny_model(arrays, features), version)
    return Predictor.load(tmp_path / "ckpt", device="cpu")


def _dataset(root: Path, n: int = N_IMAGES) -> tuple[Path, Path, list[dict[str, str]]]:
    """``n`` PNGs (square 64 px NIH-style names, and some 48 x 80) and a labels CSV.

    Labels alternate so every finding has both classes; rows 0-3 label only ``Effusion``
    (the others unknown), row 5 has a blank (unknown) ``Opacity``, rows split train / val.
    """
    images = root / "images"
    rows: list[dict[str, str]] = []
    for i in range(n):
        name = f"nih_{i:08d}_000.png"
        h, w = (64, 64) if i % 4 else (48, 80)
        write_png(images / name, h, w, seed=i)
        row = {
            "image": name,
            "patient_id": f"p{i // 2}",
            "Consolidation": str(i % 2),
            "Effusion": str((i // 2) % 2),
            "Opacity": str(int(i % 3 == 0)),
            "labeled_findings": "Effusion" if i < 4 else "ALL",
            "split": "val" if i % 2 else "train",
        }
        if i == 5:
            row["Opacity"] = ""
        rows.append(row)
    data = root / "labels.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return data, images, rows


def _boxes(path: Path, lines: list[str]) -> Path:
    header = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
    path.write_bytes(gzip.compress((header + "".join(lines)).encode()))
    return path


def test_report_keys_values_and_roc(tmp_path: Path, predictor: Predictor) -> None:
    data, images, rows = _dataset(tmp_path / "d")
    out = tmp_path / "out"
    report = run_evaluation(data, images, out, predictor=predictor, quiet=True, n_boot=100)
    assert json.loads((out / "report.json").read_text()) == report
    assert (out / "roc.png").stat().st_size > 1000
    assert report["model"]["version"] == predictor.model_version
    assert report["ontology"] == {"name": "tiny", "version": predictor.ontology_version}
    d = report["data"]
    assert d["n_images"] == N_IMAGES and d["n_skipped"] == 0 and d["label_names"] == NAMES
    assert d["positives"]["Consolidation"] == 6  # rows 0-3 know only Effusion
    assert d["unknown"]["Opacity"] == 5  # rows 0-3 and the blank in row 5

    per = report["per_finding"]
    assert set(per) == set(NAMES)
    for name in NAMES:
        assert set(per[name]) == {"auroc", "ci_low", "ci_high", "n_pos", "n"}
    assert per["Effusion"]["n"] == N_IMAGES and per["Consolidation"]["n"] == N_IMAGES - 4
    assert per["Opacity"]["n"] == N_IMAGES - 5
    # the same numbers from the model's own probabilities and the masked labels
    batch, _ = predictor.preprocess([np.asarray(_read(images / r["image"])) for r in rows])
    probs = predictor.predict(batch).probabilities.numpy()
    labels = np.array([[float(r[n] or 0) for n in NAMES] for r in rows])
    mask = np.ones_like(labels)
    mask[:4, [0, 2]] = 0
    mask[5, 2] = 0
    expected = per_finding_auroc(probs, labels, mask, NAMES, n_boot=0)
    for name in NAMES:
        assert per[name]["auroc"] == pytest.approx(expected[name].auroc)
        assert per[name]["n_pos"] == expected[name].n_pos
        lo, hi = per[name]["ci_low"], per[name]["ci_high"]
        assert lo is not None and hi is not None and lo <= hi
    # macro over findings with >= 5 positives: Consolidation (6) and Effusion (8)
    assert report["macro_findings"] == ["Consolidation", "Effusion"]
    a, b = expected["Consolidation"].auroc, expected["Effusion"].auroc
    assert a is not None and b is not None
    assert report["macro_auroc"] == pytest.approx((a + b) / 2)
    assert len(report["macro_auroc_ci"]) == 2
    assert report["thresholds_source"] == "same data"
    assert any("thresholds were chosen on the evaluated data" in n for n in report["notes"])
    assert set(report["f1"]) == set(NAMES) and "f1" in report["f1"]["Effusion"]
    assert "macro avg" in report["classification_report"]
    assert 0 <= report["ece"] <= 1
    assert "faithfulness" not in report and "localisation" not in report


def _read(path: Path) -> np.ndarray:
    from models.data import load_image

    return load_image(path)


def test_split_limit_and_json_output(
    tmp_path: Path, predictor: Predictor, capsys: pytest.CaptureFixture[str]
) -> None:
    data, images, _ = _dataset(tmp_path / "d")
    report = run_evaluation(
        data,
        images,
        tmp_path / "o",
        predictor=predictor,
        split="val",
        limit=5,
        json=True,
        n_boot=0,
        quiet=True,
    )
    assert report["data"]["n_images"] == 5 and report["data"]["split"] == "val"
    assert json.loads(capsys.readouterr().out) == report
    run_evaluation(data, images, tmp_path / "o2", predictor=predictor, n_boot=0, quiet=True)
    text = capsys.readouterr().out
    assert "macro AUROC" in text and "Effusion" in text and "report.json" in text


def test_thresholds_from_the_checkpoint(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor, ontology: Ontology, tmp_home: Path
) -> None:
    version = store_ontology(ontology, features, tmp_home)
    thresholds = {"Consolidation": 0.3, "Effusion": 0.4, "Opacity": 0.6}
    save_tiny(
        tmp_path / "ckpt",
        tiny_model(arrays, features),
        version,
        extra={"metrics": {"val": {"thresholds": thresholds}}},
    )
    data, images, _ = _dataset(tmp_path / "d")
    # through the checkpoint path, as the CLI calls it
    report = run_evaluation(
        data, images, tmp_path / "o", checkpoint=tmp_path / "ckpt", n_boot=0, quiet=True
    )
    assert report["thresholds_source"] == "given" and report["thresholds"] == thresholds
    assert report["f1"]["Opacity"]["threshold"] == 0.6
    assert any("checkpoint's" in n for n in report["notes"])


def test_faithfulness_section(tmp_path: Path, predictor: Predictor) -> None:
    data, images, _ = _dataset(tmp_path / "d", n=8)
    config = DeletionConfig(k=2, random_draws=2, n_boot=50)

    def evaluate(out: str, **options: Any) -> dict[str, Any]:
        return run_evaluation(
            data,
            images,
            tmp_path / out,
            predictor=predictor,
            faithfulness=True,
            deletion=config,
            n_boot=0,
            quiet=True,
            batch_size=3,
            **options,
        )

    report = evaluate("o")
    faith = report["faithfulness"]
    # known positives: Consolidation rows 5, 7; Effusion rows 2, 3, 6, 7; Opacity row 6
    assert faith["overall"]["n_pairs"] == 7
    assert {n: v["n_pairs"] for n, v in faith["per_finding"].items()} == {
        "Consolidation": 2,
        "Effusion": 4,
        "Opacity": 1,
    }
    assert faith["k"] == 2 and faith["random_draws"] == 2
    for key in ("evidence_drop", "random_drop", "ratio", "ratio_ci", "random_floored"):
        assert key in faith["overall"]
    assert faith["evidence"] == "attribution"
    # the same test of the attention ranking, and a bad choice refused before any work
    attention = evaluate("a", evidence="attention")
    assert attention["faithfulness"]["evidence"] == "attention"
    assert attention["macro_auroc"] == report["macro_auroc"]
    assert attention["faithfulness"]["overall"]["n_pairs"] == 7
    assert attention["faithfulness"]["overall"] != faith["overall"]
    with pytest.raises(DataError, match="--evidence must be one of"):
        run_evaluation(data, images, tmp_path / "b", predictor=predictor, evidence="saliency")
    assert predictor.evidence == "attribution"  # the caller's setting is left as it was


def test_localisation_with_a_synthetic_box(tmp_path: Path, predictor: Predictor) -> None:
    data, images, _ = _dataset(tmp_path / "d", n=8)
    # Effusion is positive on rows 2, 3, 6, 7 (64 px squares except none of them); a box
    # over the whole 1024 px original always holds the peak and the whole region
    boxes = _boxes(
        tmp_path / "boxes.csv.gz",
        [
            "00000002_000.png,Effusion,0,0,1024,1024\n",
            "00000003_000.png,Effusion,0,0,1024,1024\n",
            "00000001_000.png,Effusion,0,0,1024,1024\n",  # labelled negative: skipped
            "00000006_000.png,Nodule,0,0,10,10\n",  # not a finding of the model
            "99999999_000.png,Effusion,0,0,10,10\n",  # not an evaluated image
        ],
    )
    report = run_evaluation(
        data, images, tmp_path / "o", predictor=predictor, boxes=boxes, n_boot=0, quiet=True
    )
    loc = report["localisation"]
    assert set(loc) == {"Effusion", "overall"}
    eff = loc["Effusion"]
    assert eff["n"] == 2 and eff["pointing"] == 1.0 and eff["iobb_0_1"] == 1.0
    assert eff["iobb_0_25"] == 1.0 and len(eff["pointing_ci"]) == 2
    assert report["localisation_info"]["skipped_negative_label"] == 1
    assert any("Nodule" in n for n in report["notes"])


def test_localisation_box_goes_through_the_letterbox(tmp_path: Path, predictor: Predictor) -> None:
    data, images, rows = _dataset(tmp_path / "d")
    # row 12 is 48 x 80 with Opacity positive; the box is the top half of the original
    boxes = _boxes(tmp_path / "b.csv.gz", ["00000012_000.png,Opacity,0,0,1024,512\n"])
    report = run_evaluation(
        data, images, tmp_path / "o", predictor=predictor, boxes=boxes, n_boot=0, quiet=True
    )
    # by hand: 1024 px -> 48 x 80 is (0, 0, 80, 24); letterboxed into 32 px (scale 0.4,
    # 19 content rows, 6 padded rows on top) it is (0, 6, 32, 9.6)
    geo = predictor.preprocessor.geometry(48, 80)
    assert geo.pad_top == 6 and geo.content_height == 19
    box = Box(*geo.box_to_model(scale_box(Box(0, 0, 1024, 512), 1024, (48, 80)).as_tuple()))
    assert box.as_tuple() == pytest.approx((0.0, 6.0, 32.0, 24 * 19 / 48))
    batch, _ = predictor.preprocess([_read(images / rows[12]["image"])])
    heat = predictor.predict(batch).heatmaps()[0, NAMES.index("Opacity")]
    expected = localise("x", "Opacity", heat, [box], 32)
    loc = report["localisation"]["Opacity"]
    assert loc["n"] == 1
    assert loc["pointing"] == float(expected.pointing)
    assert loc["mean_iobb"] == pytest.approx(expected.iobb)


def test_unreadable_images_are_skipped(tmp_path: Path, predictor: Predictor) -> None:
    data, images, _ = _dataset(tmp_path / "d", n=8)
    (images / "nih_00000003_000.png").write_bytes(b"not a png")
    (images / "nih_00000005_000.png").unlink()
    report = run_evaluation(data, images, tmp_path / "o", predictor=predictor, n_boot=0, quiet=True)
    assert report["data"]["n_images"] == 6 and report["data"]["n_skipped"] == 2
    assert any("missing file" in s for s in report["data"]["skipped"])


def test_bad_inputs(tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    data, images, _ = _dataset(tmp_path / "d", n=4)
    out = tmp_path / "o"
    with pytest.raises(DataError, match="labels CSV not found"):
        run_evaluation(tmp_path / "none.csv", images, out, predictor=predictor)
    with pytest.raises(DataError, match="images folder not found"):
        run_evaluation(data, tmp_path / "none", out, predictor=predictor)
    with pytest.raises(DataError, match="bounding-box file not found"):
        run_evaluation(data, images, out, predictor=predictor, boxes=tmp_path / "b.csv.gz")
    with pytest.raises(DataError, match="limit must be >= 1"):
        run_evaluation(data, images, out, predictor=predictor, limit=0)
    with pytest.raises(DataError, match="no rows with split"):
        run_evaluation(data, images, out, predictor=predictor, split="test")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        run_evaluation(data, images, tmp_path / "file", predictor=predictor)
    other = tmp_path / "other.csv"
    other.write_text("image,Cardiomegaly\nnih_00000000_000.png,1\n")
    with pytest.raises(DataError, match="none of the model's label columns"):
        run_evaluation(other, images, out, predictor=predictor)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,Effusion\nnih_00000000_000.png,maybe\n")
    with pytest.raises(DataError, match="must be 0 or 1"):
        run_evaluation(bad, images, out, predictor=predictor)
    monkeypatch.setattr(default_checkpoint, "default_checkpoint_dir", lambda: tmp_path / "nock")
    with pytest.raises(CheckpointError, match="train one with"):
        run_evaluation(data, images, out)
    assert not out.exists()  # nothing written on failure


def test_missing_label_columns_are_noted(tmp_path: Path, predictor: Predictor) -> None:
    _, images, rows = _dataset(tmp_path / "d", n=8)
    partial = tmp_path / "partial.csv"
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "Effusion"])
        writer.writerows([[r["image"], r["Effusion"]] for r in rows])
    report = run_evaluation(
        partial, images, tmp_path / "o", predictor=predictor, n_boot=0, quiet=True
    )
    assert list(report["per_finding"]) == ["Effusion"]
    assert any("Consolidation, Opacity" in n for n in report["notes"])


def test_held_out_findings_are_scored_zero_shot(
    tmp_path: Path,
    arrays: GraphArrays,
    features: torch.Tensor,
    ontology: Ontology,
    tmp_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    version = store_ontology(ontology, features, tmp_home)
    extra = {"excluded_findings": {"Pneumonia": "X:pneumonia", "Absent": "X:finding"}}
    save_tiny(tmp_path / "ckpt", tiny_model(arrays, features), version, extra=extra)
    predictor = Predictor.load(tmp_path / "ckpt", device="cpu")
    assert predictor.excluded == {"Pneumonia": "X:pneumonia", "Absent": "X:finding"}
    _, images, rows = _dataset(tmp_path / "d")
    data = tmp_path / "with_pneumonia.csv"
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "Pneumonia"])
        writer.writeheader()
        for i, r in enumerate(rows):
            writer.writerow({**r, "labeled_findings": "ALL", "Pneumonia": str(int(i % 4 == 1))})
    report = run_evaluation(data, images, tmp_path / "o", predictor=predictor, n_boot=20)
    assert list(report["per_finding"]) == NAMES  # held-out findings stay out of these
    zs = report["zero_shot"]
    assert list(zs) == ["Pneumonia"]  # "Absent" has no column
    assert zs["Pneumonia"]["concept_id"] == "X:pneumonia" and zs["Pneumonia"]["n_pos"] == 4
    batch, _ = predictor.preprocess([_read(images / r["image"]) for r in rows])
    scores = zero_shot_scores(predictor, batch, ["X:pneumonia"])[:, 0]
    y = np.array([int(i % 4 == 1) for i in range(N_IMAGES)])
    expected = per_finding_auroc(scores, y, None, ["Pneumonia"], n_boot=0)["Pneumonia"]
    assert zs["Pneumonia"]["auroc"] == pytest.approx(expected.auroc)
    assert "zero-shot Pneumonia" in capsys.readouterr().out


def test_scores_alone_skip_the_attribution(
    tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the deletion test the evaluation asks for the attention ranking (no backward
    pass); with it, for the ranking the caller chose."""
    data, images, _ = _dataset(tmp_path / "d", n=4)
    asked: list[str | None] = []
    predict = predictor.predict

    def spy(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("evidence"))
        return predict(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict", spy)
    run_evaluation(data, images, tmp_path / "o", predictor=predictor, n_boot=0, quiet=True)
    assert asked and set(asked) == {"attention"}
    asked.clear()
    config = DeletionConfig(k=2, random_draws=1, n_boot=0)
    run_evaluation(
        data,
        images,
        tmp_path / "f",
        predictor=predictor,
        n_boot=0,
        quiet=True,
        faithfulness=True,
        deletion=config,
    )
    assert asked and set(asked) == {"attribution"}
