"""Tiny checkpoints for the inference, explanation and evaluation tests.

The tiny ontology is stored in the test's ``$KGDX_HOME`` store and its concept features are
put in the feature cache under the real text encoder's id, so :meth:`Predictor.load` runs its
whole path (store lookup, version check, cached features) without encoding any text.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kg.ontology import Ontology
from kg.store import GraphStore
from kg.tensors import GraphArrays, to_arrays
from models.checkpoint import save_checkpoint
from models.config import KgdxModelConfig
from models.model import KgdxModel
from models.text_encoder import TextEncoder, concept_features
from tests.models.conftest import tiny_config

#: Label name -> concept of the tiny targets (``TARGETS`` order).
LABELS = {
    "Consolidation": "X:consolidation",
    "Effusion": "X:effusion",
    "Opacity": "X:opacity",
}
NAMES = list(LABELS)


class _CachedFeatures:
    """Looks like the real text encoder to the feature cache; returns given features."""

    def __init__(self, encoder_id: str, features: torch.Tensor):
        self.encoder_id = encoder_id
        self._features = features

    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        assert len(texts) == self._features.shape[0]
        return self._features


def store_ontology(ontology: Ontology, features: torch.Tensor, home: Path) -> str:
    """Save ``ontology`` in the ``$KGDX_HOME`` store and seed the feature cache; returns its
    version."""
    with GraphStore() as store:
        store.save(ontology, activate=True)
    version = ontology.content_hash()
    encoder_id = TextEncoder(tiny_config().text).encoder_id
    concept_features(
        to_arrays(ontology),
        _CachedFeatures(encoder_id, features),
        home / "features",
        version,
        progress=False,
    )
    return version


def tiny_model(
    arrays: GraphArrays,
    features: torch.Tensor,
    *,
    use_kg: bool = True,
    config: KgdxModelConfig | None = None,
    seed: int = 0,
) -> KgdxModel:
    """A tiny model moved away from its initialisation, BatchNorm statistics updated."""
    torch.manual_seed(seed)
    model = KgdxModel(config or tiny_config(use_kg=use_kg), arrays, features if use_kg else None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model(torch.randn(4, 1, 32, 32))
    return model.eval()


def save_tiny(
    directory: Path,
    model: KgdxModel,
    version: str,
    *,
    name: str = "tiny",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` as a checkpoint trained on ontology ``name@version``."""
    payload: dict[str, Any] = {
        "ontology_name": name,
        "ontology_version": version,
        "encoder_id": TextEncoder(model.config.text).encoder_id,
        "labels": dict(LABELS),
        **(extra or {}),
    }
    return save_checkpoint(directory, model, model.config, payload)


def write_png(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A random 8-bit grayscale PNG; returns its pixels in [0, 1]."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    return pixels.astype(np.float32) / 255.0
