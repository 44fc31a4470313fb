"""ROC figure: written headless, one legend entry per finding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.roc_plot import plot_roc


def test_plot_roc_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((80, 3)) < 0.4).astype(float)
    labels[:, 2] = 0  # a finding with one class: listed as undefined, no curve
    probs = np.clip(labels * 0.5 + rng.random((80, 3)) * 0.5, 0, 1)
    mask = np.ones_like(labels)
    mask[:10, 0] = 0
    out = plot_roc(probs, labels, mask, ["Effusion", "Edema", "Hernia"], tmp_path / "a" / "roc.png")
    assert out == tmp_path / "a" / "roc.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_plot_roc_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be \\(N, 2\\)"):
        plot_roc(np.zeros((4, 3)), np.zeros((4, 3)), None, ["a", "b"], tmp_path / "r.png")
