"""``kgdx train`` and ``kgdx evaluate`` through the CLI: errors as ``Error: ...`` / exit 1, a
tiny run, and the evaluate command's options handed to ``run_evaluation``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.models.train_fixtures import TINY_TOML, make_setup, tiny_overrides

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory.mktemp("cli"), n=18)


def sets(setup: dict[str, Path], *extra: str) -> list[str]:
    out: list[str] = []
    for item in tiny_overrides(setup, *extra):
        out += ["--set", item]
    return out


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["train", *args])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "train.lr_max=1"], "Error: train.lr_max unknown; did you mean train.lr?"),
        (["--set", "data.labels=nowhere.csv"], "Error: data.labels: "),
        (
            ["--set", 'data.label_names=["Consolidation", "Kidney stone"]'],
            "Error: dataset labels could not be mapped to concepts: 1 unresolved: Kidney stone",
        ),
        (["--set", "data.val_split=nope"], "Error: "),
        (["--set", "epochs=3"], "Error: override 'epochs=3' must look like section.key=value"),
    ],
)
def test_config_errors_print_error_and_exit_1(
    setup: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    # the setup's overrides first, then the broken one (a later --set wins)
    result = invoke("--config", str(TINY_TOML), *sets(setup), *extra, "--out", str(tmp_path / "o"))
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path: Path) -> None:
    result = invoke("--config", str(tmp_path / "none.toml"))
    assert result.exit_code == 1
    assert "Error: training config not found" in result.output


def test_usage_error_exits_2() -> None:
    assert invoke().exit_code == 2  # --config is required


def test_tiny_no_kg_run_and_resume_hint(setup: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(TINY_TOML), *sets(setup), "--out", str(out), "--no-kg", "--quiet"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["stopped"] == "completed" and report["epochs_run"] == 2
    assert report["checkpoint"] == str(out)
    assert (out / "checkpoint.json").is_file() and (out / "train_log.jsonl").is_file()
    # a second run into the same folder starts over (the first one finished)
    budget = invoke(*args, "--max-minutes", "0.00001")
    assert budget.exit_code == 0, budget.output
    assert "time budget" in budget.stdout and "--resume" in budget.stdout
    again = invoke(*args)
    assert again.exit_code == 1 and "pass --resume" in again.output


def test_evaluate_passes_its_options_to_run_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate_module = pytest.importorskip("models.evaluate")
    seen: dict[str, Any] = {}
    monkeypatch.setattr(evaluate_module, "run_evaluation", lambda **kw: seen.update(kw))
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--data",
            "labels.csv",
            "--images",
            "imgs",
            "--out",
            str(tmp_path),
            "--checkpoint",
            "ckpt",
            "--boxes",
            "boxes.csv.gz",
            "--faithfulness",
            "--evidence",
            "attention",
            "--split",
            "val",
            "--limit",
            "5",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert seen == {
        "data": Path("labels.csv"),
        "images": Path("imgs"),
        "out": tmp_path,
        "checkpoint": Path("ckpt"),
        "boxes": Path("boxes.csv.gz"),
        "faithfulness": True,
        "evidence": "attention",
        "split": "val",
        "limit": 5,
        "quiet": True,
        "json": True,
    }
