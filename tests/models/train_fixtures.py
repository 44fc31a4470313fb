"""A tiny training set-up for the training tests: PNGs, a labels CSV, a 6-concept OBO file,
a label map, a fake text encoder and a TOML config (hidden 32, 2 layers, 32 px, "cnn")."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kg.export import export_ontology
from models.train_config import TrainingConfig, load_training_config
from tests.models.conftest import IN_DIM, tiny_ontology

#: Dataset label -> concept of the tiny ontology.
LABEL_MAP = {
    "Consolidation": "X:consolidation",
    "Effusion": "X:effusion",
    "Opacity": "X:opacity",
    "Pneumonia": "X:pneumonia",
}
LABELS = list(LABEL_MAP)


class FakeEncoder:
    """A deterministic stand-in for the text encoder: a vector per text from its hash."""

    encoder_id = "fake-encoder@000000000000"

    def __init__(self, dim: int = IN_DIM):
        self.dim = dim
        self.calls = 0

    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        self.calls += 1
        rows = []
        for t in texts:
            seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
            g = torch.Generator().manual_seed(seed)
            rows.append(torch.nn.functional.normalize(torch.randn(self.dim, generator=g), dim=0))
        return torch.stack(rows) if rows else torch.zeros(0, self.dim)


def make_images(folder: Path, n: int = 24, size: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """``n`` PNGs whose left (Consolidation) / right (Effusion) halves carry a bright blob
    when the finding is present; rows for a labels CSV (3 images a patient)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        cons, eff = int(rng.random() < 0.5), int(rng.random() < 0.5)
        img = rng.normal(90, 20, (size, size))
        if cons:
            img[10:30, 4:16] += 120
        if eff:
            img[10:30, 24:36] += 120
        name = f"img_{i:03d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
        patient = f"p{i // 3}"
        rows.append(
            {
                "image": name,
                "patient_id": patient,
                "source": "synthetic_a" if i % 2 else "synthetic_b",
                "Consolidation": str(cons),
                "Effusion": str(eff),
                "Opacity": str(int(cons or eff)),
                "Pneumonia": str(cons),
                "labeled_findings": "ALL" if i % 4 else "Effusion",
                "split": "val" if i // 3 in (1, 4, 6) else "train",
            }
        )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], drop: Sequence[str] = ()) -> Path:
    fields = [k for k in rows[0] if k not in drop]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def make_setup(root: Path, n: int = 24) -> dict[str, Path]:
    """Images, labels.csv, tiny.obo and label_map.csv under ``root``."""
    rows = make_images(root / "images", n=n)
    write_csv(root / "labels.csv", rows)
    export_ontology(tiny_ontology(), root / "tiny.obo", "obo")
    with (root / "label_map.csv").open("w") as f:
        f.write("label,concept_id\n")
        for k, v in LABEL_MAP.items():
            f.write(f"{k},{v}\n")
    return {
        "root": root,
        "labels": root / "labels.csv",
        "images": root / "images",
        "ontology": root / "tiny.obo",
        "label_map": root / "label_map.csv",
    }


#: The shipped tiny recipe; the tests point its data and ontology at a :func:`make_setup`.
TINY_TOML = Path(__file__).resolve().parents[2] / "models" / "configs" / "tiny.toml"


def tiny_overrides(setup: dict[str, Path], *extra: str) -> list[str]:
    """``--set`` overrides that aim ``models/configs/tiny.toml`` at a tiny set-up."""
    q = json.dumps
    return [
        f"data.labels={q(str(setup['labels']))}",
        f"data.images={q(str(setup['images']))}",
        f"data.label_names={q(['Consolidation', 'Effusion', 'Opacity'])}",
        "data.label_fraction=1.0",
        f"ontology.spec={q(str(setup['ontology']))}",
        f"ontology.label_map={q(str(setup['label_map']))}",
        f"ontology.feature_cache={q(str(setup['root'] / 'features'))}",
        "model.text_dim=16",
        "train.batch_size=4",
        "train.bootstrap=20",
        *extra,
    ]


def tiny_training_config(setup: dict[str, Path], *extra: str) -> TrainingConfig:
    """``models/configs/tiny.toml`` over the tiny set-up, with ``extra`` overrides."""
    return load_training_config(TINY_TOML, tiny_overrides(setup, *extra))
