"""Training TOML: parsing, path resolution, overrides and every config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data import NIH_FINDINGS
from models.errors import ConfigError
from models.train_config import (
    TrainingConfig,
    apply_override,
    config_from_dict,
    load_training_config,
)
from tests.models.train_fixtures import TINY_TOML, make_setup, tiny_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "models" / "configs"
SHARED_CXR = Path(__file__).resolve().parents[3] / "shared" / "data" / "cxr"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_setup(tmp_path_factory.mktemp("cfg"), n=6)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def minimal(setup: dict[str, Path], extra: str = "") -> str:
    return (
        f'[data]\nlabels = "{setup["labels"]}"\nimages = "{setup["images"]}"\n'
        f'label_names = ["Consolidation"]\n{extra}'
    )


@pytest.mark.parametrize("name", ["default.toml", "tiny.toml"])
def test_shipped_configs_parse(name: str) -> None:
    cfg = load_training_config(CONFIGS / name, check_files=SHARED_CXR.is_dir())
    assert cfg.data.kind == "csv"
    assert cfg.data.label_names == list(NIH_FINDINGS)  # the 14 findings, No_Finding not a target
    assert Path(cfg.data.labels or "").name == "labels.csv"
    assert cfg.ontology.spec is None  # the bundled graph
    assert json.dumps(cfg.to_dict())  # what a checkpoint stores


def test_default_recipe_trains_on_the_train_rows_into_the_bundled_folder() -> None:
    cfg = load_training_config(CONFIGS / "default.toml", check_files=False)
    assert cfg.data.train_split == "train" and cfg.data.label_fraction == 1.0
    assert not cfg.data.exclude_findings
    assert Path(cfg.train.out or "") == CONFIGS.parent / "data" / "default"
    assert Path(cfg.data.labels or "") == (SHARED_CXR / "labels.csv").resolve()


def test_relative_paths_resolve_against_the_toml_folder(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = setup["root"]
    sub = tmp_path / "configs"
    sub.mkdir()
    monkeypatch.setenv("TINY_ROOT", str(root))
    path = sub / "run.toml"
    path.write_text(
        '[data]\nlabels = "$TINY_ROOT/labels.csv"\nimages = "${TINY_ROOT}/images"\n'
        'label_names = ["Consolidation"]\n'
        '[ontology]\nspec = "../spec/tiny.obo"\nlabel_map = "~/map.csv"\n'
        '[train]\nout = "runs/x"\n'
    )
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "tiny.obo").write_text(setup["ontology"].read_text())
    monkeypatch.setenv("HOME", str(root))
    (root / "map.csv").write_text(setup["label_map"].read_text())
    cfg = load_training_config(path)
    assert cfg.data.labels == str(root / "labels.csv")
    assert cfg.data.images == str(root / "images")
    assert cfg.ontology.spec == str(tmp_path / "spec" / "tiny.obo")
    assert cfg.ontology.label_map == str(root / "map.csv")
    assert cfg.train.out == str(sub / "runs" / "x")
    assert cfg.source == str(path)


def test_store_reference_is_kept_as_given(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_training_config(write(tmp_path, minimal(setup, '[ontology]\nspec = "hpo@abc"\n')))
    assert cfg.ontology.spec == "hpo@abc"


def test_defaults_and_types(setup: dict[str, Path], tmp_path: Path) -> None:
    cfg = load_training_config(write(tmp_path, minimal(setup, "[train]\nlr = 1\n")))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.train.warmup == 0.05
    assert cfg.preprocess_config().image_size == 224
    assert cfg.model == {}


def test_overrides(setup: dict[str, Path]) -> None:
    cfg = load_training_config(
        TINY_TOML,
        tiny_overrides(
            setup,
            "train.epochs=7",
            'data.exclude_findings=["Opacity"]',
            "train.device=cpu",
            "model.image.image_size=48",
        ),
    )
    assert cfg.train.epochs == 7
    assert cfg.data.targets == ["Consolidation", "Effusion"]
    assert cfg.preprocess_config().image_size == 48
    raw: dict[str, object] = {}
    apply_override(raw, "model.gnn.layers=3")
    assert raw == {"model": {"gnn": {"layers": 3}}}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_override(raw, "epochs")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[train]\nlr_max = 1.0\n", r"train\.lr_max unknown; did you mean train\.lr\?"),
        ("[trian]\nlr = 1.0\n", r"unknown section \[trian\]; did you mean \[train\]\?"),
        ("[model.gnn]\nhiden = 8\n", r"model\.gnn\.hiden unknown; did you mean model\.gnn\.hidden"),
        ("[model]\nfoo = 1\n", r"model\.foo unknown"),
        ("[preprocess]\nrotate = 3.0\n", r"preprocess\.rotate unknown; did you mean"),
        ("[ontology]\nlabelmap = 'x'\n", r"ontology\.labelmap unknown; did you mean ontology"),
        ("[train]\nlr = 'fast'\n", r"train\.lr must be a number, got 'fast'"),
        ("[train]\nepochs = 2.5\n", r"train\.epochs must be an integer"),
        ("[train]\namp = 1\n", r"train\.amp must be true or false"),
        ("[train]\nepochs = 0\n", r"train\.epochs must be >= 1"),
        ("[train]\nfreeze = 'all'\n", r"train\.freeze must be one of 'none', 'backbone'"),
        ("[train]\ndevice = 'tpu'\n", r"train\.device must be one of"),
        ("[train]\nwarmup_steps = 3\nwarmup_fraction = 0.1\n", "not both"),
        ("[train]\npatience = 0\n", r"train\.patience must be >= 1"),
        ("[train]\nthreads = 0\n", r"train\.threads must be >= 1"),
        ("[train]\nsave_dtype = 'int8'\n", r"train\.save_dtype must be one of"),
        ("[model]\ntargets = ['X:1']\n", r"model\.targets is filled from data\.label_names"),
        ("[model]\ndim = 30\n", r"\[model\]: dim=30 must be divisible by fusion\.heads=8"),
        ("[model.image]\nbackbone = 'vgg'\n", r"image\.backbone must be one of"),
        ("[preprocess]\nimage_size = 64\n", r"preprocess\.image_size comes from model\.image"),
        ("[preprocess]\nnormalize = 'zscore'\n", r"normalize must be one of"),
        ("[model.image]\npretrained_path = 'nope.safetensors'\n", r"pretrained_path: .*not found"),
        ("[ontology]\nspec = 'missing.obo'\n", r"ontology\.spec: .*missing\.obo not found"),
        ("[ontology]\nlabel_map = 'missing.csv'\n", r"ontology\.label_map: .*not found"),
        ("[train]\nbox_weight = 0.5\n", r"train\.box_weight > 0 needs data\.boxes"),
        ("[train]\nbox_weight = -1.0\n", r"train\.box_weight must be a finite number >= 0"),
        ("[train]\nbox_weight = nan\n", r"train\.box_weight must be a finite number"),
    ],
)
def test_config_errors(setup: dict[str, Path], tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_training_config(write(tmp_path, minimal(setup, extra)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('labels = "nope.csv"\nimages = "."', r"data\.labels: .*nope\.csv not found"),
        ('labels = "labels.csv"\nimages = "no_images"', r"data\.images: .*no_images not found"),
        ('images = "images"', r"data\.labels is required when data\.kind = 'csv'"),
        ('kind = "npz"', r"data\.npz is required"),
        ('kind = "parquet"\nlabels = "x"', r"data\.kind must be one of 'csv', 'npz', 'dicom'"),
        (
            'labels = "labels.csv"\nimages = "images"\nexclude_findings = ["Fracture"]',
            r"data\.exclude_findings names 'Fracture', not in data\.label_names",
        ),
        (
            'labels = "labels.csv"\nimages = "images"\nlabel_names = ["A"]\n'
            'exclude_findings = ["A"]',
            "removes every label",
        ),
        ('labels = "labels.csv"\nimages = "images"\nlabel_names = []', "at least one label"),
        ('labels = "labels.csv"\nimages = "images"\nval_fraction = 1.5', r"val_fraction must be"),
        ('labels = "labels.csv"\nimages = "images"\nlabel_fraction = 0', r"label_fraction must"),
        ('labels = "labels.csv"\nimages = "images"\nboxes = "none.csv"', r"data\.boxes: .*found"),
        ('kind = "npz"\nnpz = "x.npz"\nboxes = "b.csv"', r"data\.boxes needs a labels CSV"),
    ],
)
def test_data_errors(setup: dict[str, Path], data: str, message: str) -> None:
    path = setup["root"] / "data_error.toml"
    path.write_text(f"[data]\n{data}\n")
    with pytest.raises(ConfigError, match=message):
        load_training_config(path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training config not found"):
        load_training_config(tmp_path / "none.toml")
    bad = write(tmp_path, "[data\nlabels = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_training_config(bad)
    with pytest.raises(ConfigError, match=r"needs a \[data\] section"):
        load_training_config(write(tmp_path, "[train]\nepochs = 1\n"))


def test_from_dict_without_file_checks() -> None:
    cfg = config_from_dict(
        {"data": {"labels": "x.csv", "images": "imgs"}}, base_dir="/base", check_files=False
    )
    assert isinstance(cfg, TrainingConfig)
    assert cfg.data.labels == "/base/x.csv"
