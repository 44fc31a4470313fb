"""bench/quality.py end to end on a handful of synthetic images with the tiny recipe: every
arm trains one epoch, is evaluated on the held-out split and enters the summary; arms are
skipped once done, figures of arms without results are "not run", exit codes follow the
targets, leaky reuse is flagged. The shared data layout is rebuilt in a temporary folder
(cxr/ with NIH, Kermany and adult rows, a bounding-box file, a PneumoniaMNIST-like npz)."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench import quality
from kg.export import export_ontology
from models.evaluate import run_evaluation
from tests.models.conftest import tiny_ontology
from tests.models.train_fixtures import TINY_TOML, FakeEncoder

LABEL_MAP = {
    "Consolidation": "X:consolidation",
    "Effusion": "X:effusion",
    "Opacity": "X:opacity",
    "Pneumonia": "X:pneumonia",
}
SIZE = 40  # synthetic image side (the recipe letterboxes it to 64 px)
LEFT = (10, 30, 4, 16)  # rows, cols of the Consolidation / Pneumonia blob
RIGHT = (10, 30, 24, 36)  # of the Effusion blob


def _image(rng: np.random.Generator, left: bool, right: bool) -> np.ndarray:
    img = rng.normal(90, 20, (SIZE, SIZE))
    if left:
        img[LEFT[0] : LEFT[1], LEFT[2] : LEFT[3]] += 120
    if right:
        img[RIGHT[0] : RIGHT[1], RIGHT[2] : RIGHT[3]] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def _box(region: tuple[int, int, int, int]) -> list[str]:
    """A blob's box on the 1024 px original the NIH boxes are drawn on."""
    r0, r1, c0, c1 = region
    s = 1024 / SIZE
    return [f"{c0 * s:.1f}", f"{r0 * s:.1f}", f"{(c1 - c0) * s:.1f}", f"{(r1 - r0) * s:.1f}"]


def make_data(root: Path) -> Path:
    """``root/data`` laid out as ../shared/data: cxr/, nih_metadata/, medmnist/."""
    data = root / "data"
    images = data / "cxr" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows: list[dict[str, str]] = []
    boxes: list[list[str]] = []
    for i in range(56):  # NIH rows, all labels known, two images a patient
        cons, eff = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        original = f"{i // 2:08d}_{i % 2:03d}.png"
        name = f"nih_{original}"
        Image.fromarray(_image(rng, cons, eff)).save(images / name)
        test = i // 2 >= 18  # patients 18..27: the held-out split
        rows.append(
            {
                "image": name,
                "source": "nih_cxr14_synthetic_40",
                "patient_id": f"nih_{i // 2}",
                "Consolidation": str(int(cons)),
                "Effusion": str(int(eff)),
                "Opacity": str(int(cons or eff)),
                "Pneumonia": str(int(cons)),
                "No_Finding": str(int(not (cons or eff))),
                "labeled_findings": "ALL",
                "split": "val" if test else "train",
            }
        )
        if test and cons:
            boxes.append([original, "Consolidation", *_box(LEFT)])
        if test and eff:
            boxes.append([original, "Effusion", *_box(RIGHT)])
    for i in range(20):  # pneumonia / normal rows: only Pneumonia and No_Finding known
        pneumonia = i % 2 == 0
        source = "kermany_pediatric_cxr" if i < 14 else "covid_chestxray_dataset"
        name = f"{source[:7]}_{i:03d}.png"
        Image.fromarray(_image(rng, pneumonia, False)).save(images / name)
        rows.append(
            {
                "image": name,
                "source": source,
                "patient_id": f"{source[:7]}_{i}",
                "Consolidation": "0",
                "Effusion": "0",
                "Opacity": "0",
                "Pneumonia": str(int(pneumonia)),
                "No_Finding": str(int(not pneumonia)),
                "labeled_findings": "Pneumonia;No_Finding",
                "split": "val" if i % 5 in (0, 1) else "train",
            }
        )
    with (data / "cxr" / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (data / "nih_metadata").mkdir()
    with gzip.open(data / "nih_metadata" / "BBox_List_2017.csv.gz", "wt", newline="") as g:
        w = csv.writer(g)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows(boxes)
    (data / "medmnist").mkdir()
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 32), ("val", 12), ("test", 16)):
        labels = (np.arange(n) % 2).astype(np.uint8)
        imgs = [_image(rng, bool(y), False)[6:34, 6:34] for y in labels]
        arrays[f"{split}_images"] = np.stack(imgs)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(data / "medmnist" / "pneumoniamnist_subset.npz", **arrays)  # type: ignore[arg-type]
    return data


def make_ontology(root: Path) -> list[str]:
    """The tiny graph and label map; the ``--set`` overrides that aim the recipe at them."""
    export_ontology(tiny_ontology(), root / "tiny.obo", "obo")
    with (root / "label_map.csv").open("w") as f:
        f.write("label,concept_id\n")
        f.writelines(f"{k},{v}\n" for k, v in LABEL_MAP.items())
    q = json.dumps
    return [
        f"data.label_names={q(list(LABEL_MAP))}",
        f"ontology.spec={q(str(root / 'tiny.obo'))}",
        f"ontology.label_map={q(str(root / 'label_map.csv'))}",
        f"ontology.feature_cache={q(str(root / 'features'))}",
        "model.text_dim=16",
        "model.image.image_size=64",  # DenseNet-121's CAM grid is 2 x 2 here (1 x 1 at 32 px)
        "train.epochs=1",
        "train.batch_size=8",
        "train.bootstrap=10",
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("quality")
    data = make_data(root)
    sets = make_ontology(root)
    return {"root": root, "data": data, "sets": sets}


def argv(setup: dict[str, Any], out: Path, *extra: str) -> list[str]:
    args = [
        "--data",
        str(setup["data"]),
        "--config",
        str(TINY_TOML),
        "--out",
        str(out),
        "--zero-shot",
        "Effusion",
        "--n-boot",
        "20",
        "--quiet",
    ]
    for s in setup["sets"]:
        args += ["--set", s]
    return [*args, *extra]


@pytest.fixture(scope="module")
def full_run(setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """Every arm, ``plain`` included, trained one epoch and evaluated."""
    out = tmp_path_factory.mktemp("runs") / "quality"
    arms = "kg,nokg,densenet,kg10,nokg10,zeroshot,mnist,plain"
    mp = pytest.MonkeyPatch()
    mp.setenv("KGDX_HOME", str(setup["root"] / "home"))
    try:
        code = quality.main(argv(setup, out, "--arms", arms), encoder=FakeEncoder())
    finally:
        mp.undo()
    return code, out


def test_every_arm_trains_evaluates_and_enters_the_summary(full_run: tuple[int, Path]) -> None:
    code, out = full_run
    assert code in (quality.EXIT_OK, quality.EXIT_MISS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_code"] == code
    assert set(summary["arms"]) == set(quality.ARMS)
    for name in quality.ARMS:
        report = json.loads((out / name / quality.REPORT_FILE).read_text())
        assert report["training"]["status"] == "trained"
        assert report["training"]["epochs_run"] == 1
        assert (out / name / quality.PREDICTIONS_FILE).is_file()
    # the split: 12% of the training patients for early stopping, the CSV's val rows held out
    kg = json.loads((out / "kg" / quality.REPORT_FILE).read_text())
    assert kg["settings"]["val_fraction"] == quality.VAL_FRACTION
    assert kg["recipe"]["config"] == "models/configs/tiny.toml"
    assert any("kg: not the default recipe" in c for c in summary["caveats"])
    assert kg["settings"]["label_fraction"] == 1.0
    assert json.loads((out / "kg10" / quality.REPORT_FILE).read_text())["settings"][
        "label_fraction"
    ] == pytest.approx(quality.LOW_LABEL_FRACTION)
    assert json.loads((out / "zeroshot" / quality.REPORT_FILE).read_text())["settings"][
        "exclude_findings"
    ] == ["Effusion"]
    densenet = json.loads((out / "densenet" / quality.REPORT_FILE).read_text())
    assert densenet["settings"]["backbone"] == "densenet121"
    assert densenet["settings"]["image_size"] == kg["settings"]["image_size"] == 64
    test = summary["test_split"]
    assert test["images"] == 20 + 8 and test["nih_images"] == 20
    assert test["patients_shared_with_train"] == 0


def test_figures_cover_targets_aims_and_reports(full_run: tuple[int, Path]) -> None:
    _, out = full_run
    summary = json.loads((out / "summary.json").read_text())
    figs = {(f["key"], f["arm"]): f for f in summary["figures"]}
    target_keys = {
        ("pneumonia_auroc", "kg"),
        ("nih_macro_diff_kg_densenet", "kg - densenet"),
        ("pointing_diff_kg_densenet", "kg - densenet"),
    }
    for target in target_keys:
        assert figs[target]["kind"] == "target" and figs[target]["status"] in ("met", "missed")
    assert summary["targets"]["met"] + summary["targets"]["missed"] == 3
    # 8 pneumonia / normal test rows (Kermany + adult), scored by every chest arm
    assert figs[("pneumonia_auroc", "kg")]["n"].startswith("8 images")
    assert figs[("pneumonia_auroc", "densenet")]["kind"] == "report"
    # and each source alone, reported: where a miss of the combined figure comes from
    pediatric = figs[("pneumonia_auroc_pediatric", "kg")]
    adult = figs[("pneumonia_auroc_adult", "kg")]
    assert pediatric["kind"] == adult["kind"] == "report"
    n_pediatric, n_adult = (int(f["n"].split()[0]) for f in (pediatric, adult))
    assert n_pediatric > 0 and n_adult > 0 and n_pediatric + n_adult == 8
    for pair in ("kg - nokg", "kg10 - nokg10", "kg - plain"):
        f = figs[("nih_macro_diff_" + pair.replace(" - ", "_"), pair)]
        assert f["value"] is not None and f["ci"][0] <= f["value"] <= f["ci"][1]
    for arm in ("kg", "densenet", "plain"):
        assert figs[("pointing_game", arm)]["value"] is not None
    assert figs[("zero_shot_auroc_Effusion", "zeroshot")]["kind"] == "aim"
    assert figs[("zero_shot_auroc_Effusion", "zeroshot")]["value"] is not None
    assert figs[("faithfulness_ratio", "kg")]["status"] in ("aim met", "aim missed")
    assert figs[("mnist_auroc", "mnist")]["n"].startswith("16 images")
    md = (out / "summary.md").read_text()
    assert md.startswith("## Quality") and "| figure |" in md and "kg - densenet" in md


def test_pointing_matches_kgdx_evaluate(full_run: tuple[int, Path], setup: dict[str, Any]) -> None:
    """The protocol scores boxes as ``kgdx evaluate`` does: same hit rate on the kg arm."""
    _, out = full_run
    eval_report = json.loads((out / "kg" / quality.EVAL_DIR / "report.json").read_text())
    preds = quality.Predictions.load(out / "kg" / quality.PREDICTIONS_FILE)
    overall = eval_report["localisation"]["overall"]
    assert len(preds.loc_hit) == overall["n"] > 0
    assert preds.loc_hit.mean() == pytest.approx(overall["pointing"])
    # and the zero-shot section of the same report agrees with the protocol's scores
    assert (
        "Effusion"
        in json.loads((out / "zeroshot" / quality.EVAL_DIR / "report.json").read_text())[
            "zero_shot"
        ]
    )
    assert run_evaluation is not None


def test_done_arms_are_skipped_and_missing_figures_are_not_run(
    full_run: tuple[int, Path], setup: dict[str, Any], tmp_path: Path, tmp_home: Path, capsys: Any
) -> None:
    _, out = full_run
    partial = tmp_path / "quality"
    for name in ("kg", "mnist"):
        shutil.copytree(out / name, partial / name)
    before = (partial / "kg" / quality.REPORT_FILE).stat().st_mtime_ns
    code = quality.main(argv(setup, partial, "--arms", "kg,mnist"), encoder=FakeEncoder())
    assert (partial / "kg" / quality.REPORT_FILE).stat().st_mtime_ns == before  # not rerun
    summary = json.loads((partial / "summary.json").read_text())
    figs = {(f["key"], f["arm"]): f for f in summary["figures"]}
    assert figs[("nih_macro_diff_kg_densenet", "kg - densenet")]["status"] == "not run"
    assert figs[("pointing_diff_kg_densenet", "kg - densenet")]["status"] == "not run"
    assert figs[("zero_shot_auroc", "zeroshot")]["status"] == "not run"
    pneumonia = figs[("pneumonia_auroc", "kg")]["status"]
    assert code == (quality.EXIT_MISS if pneumonia == "missed" else quality.EXIT_OK)
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1])["quality"]["exit_code"] == code  # the final JSON line


def test_reusing_a_checkpoint_flags_early_stopping_on_the_test_rows(
    full_run: tuple[int, Path], setup: dict[str, Any], tmp_path: Path, tmp_home: Path
) -> None:
    """A checkpoint whose val split was the CSV's ``val`` rows (the default recipe's) is
    evaluated, but its figures carry a caveat; one trained on those rows is refused."""
    _, out = full_run
    leaky = tmp_path / "leaky"
    shutil.copytree(out / "kg" / quality.MODEL_DIR, leaky)
    info = json.loads((leaky / "checkpoint.json").read_text())
    info["extra"]["train_config"]["data"]["val_fraction"] = None
    info["extra"]["train_config"]["data"]["val_split"] = "val"
    (leaky / "checkpoint.json").write_text(json.dumps(info))
    res = tmp_path / "quality"
    code = quality.main(
        argv(setup, res, "--arms", "kg", "--reuse", f"kg={leaky}"), encoder=FakeEncoder()
    )
    assert code in (quality.EXIT_OK, quality.EXIT_MISS)
    report = json.loads((res / "kg" / quality.REPORT_FILE).read_text())
    assert report["training"]["status"] == "reused"
    assert any("optimistic" in c for c in report["caveats"])
    assert any("optimistic" in c for c in json.loads((res / "summary.json").read_text())["caveats"])

    # --force reruns the arm but keeps a reused checkpoint that lives in the arm's folder
    own = tmp_path / "own"
    shutil.copytree(out / "kg", own / "kg")
    model = own / "kg" / quality.MODEL_DIR
    info = json.loads((model / "checkpoint.json").read_text())
    del info["extra"]["train_config"]["train"]["box_weight"]  # saved before the key existed
    (model / "checkpoint.json").write_text(json.dumps(info))
    code = quality.main(
        argv(setup, own, "--arms", "kg", "--force", "--reuse", f"kg={model}"),
        encoder=FakeEncoder(),
    )
    assert code in (quality.EXIT_OK, quality.EXIT_MISS) and (model / "checkpoint.json").is_file()
    rerun = json.loads((own / "kg" / quality.REPORT_FILE).read_text())
    assert rerun["training"]["status"] == "reused"
    # the checkpoint matches the recipe it is evaluated under: no caveat but the (tiny) recipe
    assert [c for c in rerun["caveats"] if "not the default recipe" not in c] == []

    info["extra"]["train_config"]["data"]["train_split"] = ["train", "val"]
    (leaky / "checkpoint.json").write_text(json.dumps(info))
    code = quality.main(
        argv(setup, res, "--arms", "kg", "--force", "--reuse", f"kg={leaky}"),
        encoder=FakeEncoder(),
    )
    assert code == quality.EXIT_ERROR


def test_plan_and_usage_errors(setup: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    assert quality.main(argv(setup, tmp_path / "q", "--plan")) == quality.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("arm") and lines[-1].startswith("estimated total")
    assert any(line.startswith("densenet") and "densenet121 64 px" in line for line in lines)
    # every arm's config builds from the default recipe too (its own val carve-out and any
    # source filter are dropped for the npz arm)
    default = argv(setup, tmp_path / "q", "--plan", "--arms", ",".join(quality.ARMS))
    default[default.index("--config") + 1] = str(quality.DEFAULT_CONFIG)
    assert quality.main([*default, "--set", 'data.sources=["nih_"]']) == quality.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert not [line for line in lines if "config error" in line]
    assert any(line.startswith("mnist") and "28 px" in line for line in lines)
    for bad in (["--arms", "kg,nope"], ["--reuse", "kg"], ["--set", "nope:train.epochs=1"]):
        with pytest.raises(SystemExit) as exc:
            quality.main(argv(setup, tmp_path / "q", *bad))
        assert exc.value.code == quality.EXIT_USAGE


def test_summary_only_reads_results_without_data(
    full_run: tuple[int, Path], tmp_path: Path
) -> None:
    """Figures can be recomputed from predictions alone; the mnist arm needs no CSV."""
    _, out = full_run
    partial = tmp_path / "quality"
    shutil.copytree(out / "mnist", partial / "mnist")
    code = quality.main(
        ["--out", str(partial), "--data", str(tmp_path / "nowhere"), "--summary-only", "-q"]
    )
    assert code == quality.EXIT_OK  # the targets' arms have no results: not run
    summary = json.loads((partial / "summary.json").read_text())
    assert summary["targets"] == {"met": 0, "missed": 0, "not_run": 3}
    assert summary["test_split"] is None


def test_paired_pointing_resamples_images() -> None:
    def preds(hits: list[bool], images: list[str]) -> quality.Predictions:
        n = len(hits)
        return quality.Predictions(
            ids=np.array([], dtype=str),
            sources=np.array([], dtype=str),
            names=["A"],
            probs=np.zeros((0, 1)),
            labels=np.zeros((0, 1)),
            mask=np.zeros((0, 1)),
            loc_image=np.array(images),
            loc_finding=np.array(["A"] * n),
            loc_hit=np.array(hits),
            loc_iobb=np.zeros(n),
        )

    images = [f"i{j}" for j in range(8)]
    a = preds([True] * 6 + [False] * 2, images)
    b = preds([True] * 2 + [False] * 6, images)
    diff, lo, hi, n, u = quality.paired_pointing(a, b, n_boot=200, seed=0)
    assert diff == pytest.approx(0.5) and (n, u) == (8, 8)
    assert lo is not None and hi is not None and lo <= 0.5 <= hi
    same = quality.paired_pointing(a, a, n_boot=50, seed=0)
    assert same[:3] == (0.0, 0.0, 0.0)


def test_pointing_prior_puts_the_arms_next_to_a_fixed_cell(
    full_run: tuple[int, Path], setup: dict[str, Any], capsys: Any, monkeypatch: Any
) -> None:
    from bench import pointing_prior

    _, out = full_run
    monkeypatch.setenv("KGDX_HOME", str(setup["root"] / "home"))
    capsys.readouterr()
    assert pointing_prior.main(argv(setup, out), encoder=FakeEncoder()) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    preds = quality.Predictions.load(out / "kg" / quality.PREDICTIONS_FILE)
    assert figures["test_boxed_findings"] == len(preds.loc_hit) > 0
    # the arm's figure is the protocol's own pointing game on the same boxes
    assert figures["arms"]["kg"]["test_pointing"] == round(float(preds.loc_hit.mean()), 3)
    assert {"kg", "nokg", "densenet"} <= set(figures["arms"])
    rows, cols = figures["grid"]
    if figures["carve_boxed_findings"]:  # the cell is chosen on the carve-out's boxes only
        r, c = figures["fixed_cell"]
        assert 0 <= r < rows and 0 <= c < cols
        assert 0.0 <= figures["fixed_cell_test_pointing"] <= 1.0
    else:
        assert figures["fixed_cell"] is None and figures["fixed_cell_test_pointing"] is None


def test_pointing_prior_chooses_its_cell_on_the_validation_boxes(
    full_run: tuple[int, Path], setup: dict[str, Any], capsys: Any, monkeypatch: Any
) -> None:
    """The tiny data's carve-out has no boxes; stand the held-out rows in for it, so a cell
    is chosen, and check that it is the best cell there."""
    from types import SimpleNamespace

    from bench import pointing_prior
    from models.data import CsvImageDataset

    _, out = full_run
    monkeypatch.setenv("KGDX_HOME", str(setup["root"] / "home"))
    paths = quality.DataPaths(setup["data"])
    names = ["Consolidation", "Effusion", "Opacity", "Pneumonia"]
    held_out = CsvImageDataset(paths.labels, paths.images, names, split=quality.TEST_SPLIT)
    monkeypatch.setattr(
        pointing_prior, "build_datasets", lambda *a, **k: SimpleNamespace(val=held_out)
    )
    capsys.readouterr()
    assert pointing_prior.main(argv(setup, out), encoder=FakeEncoder()) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows, cols = figures["grid"]
    r, c = figures["fixed_cell"]
    assert 0 <= r < rows and 0 <= c < cols
    # chosen and scored on the same rows here, so the two figures agree
    assert figures["fixed_cell_carve_pointing"] == figures["fixed_cell_test_pointing"]
    assert figures["fixed_cell_test_pointing"] > 0


@pytest.mark.parametrize(
    ("recipe", "flagged"), [("all", False), ("projections", True), ("fusion", True)]
)
def test_reused_cams_are_compared_by_the_gradient_they_were_trained_with(
    full_run: tuple[int, Path], setup: dict[str, Any], recipe: str, flagged: bool
) -> None:
    """The plain classifier trained its CAMs with "all" (the tiny recipe's default): a
    recipe whose map_gradient trains them otherwise is a departure; kgdx's "fusion" is
    "projections" for the CAMs."""
    _, out = full_run
    opts, _ = quality.parse_args(
        argv(setup, out, "--set", f'model.decoder.map_gradient="{recipe}"')
    )
    arm = quality.ARMS["densenet"]
    caveats = quality.reuse_caveats(
        arm, quality.arm_config(arm, opts), out / "densenet" / quality.MODEL_DIR
    )
    assert any("CAM map_gradient" in c for c in caveats) == flagged
