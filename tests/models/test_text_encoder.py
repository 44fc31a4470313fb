from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kg.tensors import GraphArrays
from models.errors import ConfigError, EncoderError
from models.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    TextEncoderConfig,
    concept_features,
    default_text_encoder_path,
    feature_cache_path,
)


class CountingEncoder:
    """A stand-in encoder that counts its calls and returns fixed vectors."""

    def __init__(self, encoder_id: str = "fake@1", dim: int = 8):
        self.encoder_id = encoder_id
        self.dim = dim
        self.calls = 0

    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        self.calls += 1
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), self.dim, generator=g)


def test_config_defaults_and_validation() -> None:
    cfg = TextEncoderConfig()
    assert cfg.name_or_path == DEFAULT_TEXT_ENCODER
    assert cfg.pooling == "mean"
    assert cfg.resolved_path() == default_text_encoder_path()
    with pytest.raises(ConfigError, match="pooling"):
        TextEncoderConfig(pooling="max")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=0)


def test_encoder_id_needs_no_model_load() -> None:
    enc = TextEncoder()
    eid = enc.encoder_id
    assert eid.startswith("all-MiniLM-L6-v2@") and len(eid.split("@")[1]) == 12
    assert enc._model is None  # identity is cheap: nothing loaded
    # pooling and max_length change the vectors, so they change the id
    assert TextEncoder(TextEncoderConfig(pooling="cls")).encoder_id != eid
    assert TextEncoder(TextEncoderConfig(max_length=32)).encoder_id != eid
    assert TextEncoder().encoder_id == eid


def test_missing_or_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EncoderError, match="name_or_path"):
        TextEncoder(TextEncoderConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(EncoderError, match="safetensors"):
        TextEncoder(TextEncoderConfig(name_or_path=str(tmp_path)))


def test_concept_features_cache_hit(tmp_path: Path, arrays: GraphArrays) -> None:
    enc = CountingEncoder()
    first = concept_features(arrays, enc, tmp_path, "v1")
    assert first.shape == (arrays.num_nodes, 8)
    assert enc.calls == 1
    again = concept_features(arrays, enc, tmp_path, "v1")
    assert enc.calls == 1  # served from the file
    torch.testing.assert_close(first, again)
    assert feature_cache_path(tmp_path, "v1", "fake@1").is_file()
    # another version or another encoder is another cache entry
    concept_features(arrays, enc, tmp_path, "v2")
    assert enc.calls == 2
    other = CountingEncoder("fake@2")
    concept_features(arrays, other, tmp_path, "v1")
    assert other.calls == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_concept_features_cache_rejects_other_content(tmp_path: Path, arrays: GraphArrays) -> None:
    enc = CountingEncoder()
    concept_features(arrays, enc, tmp_path, "v1")
    changed = GraphArrays(
        node_ids=arrays.node_ids,
        node_texts=[t + " (edited)" for t in arrays.node_texts],
        node_labels=arrays.node_labels,
        relations=arrays.relations,
        edge_index=arrays.edge_index,
        edge_type=arrays.edge_type,
        edge_weight=arrays.edge_weight,
    )
    concept_features(changed, enc, tmp_path, "v1")  # same version string, other texts
    assert enc.calls == 2


def test_corrupt_cache_file_is_a_miss(tmp_path: Path, arrays: GraphArrays) -> None:
    enc = CountingEncoder()
    feature_cache_path(tmp_path, "v1", enc.encoder_id).write_bytes(b"garbage")
    out = concept_features(arrays, enc, tmp_path, "v1")
    assert enc.calls == 1 and out.shape == (arrays.num_nodes, 8)


@pytest.mark.slow
def test_real_minilm_offline(
    tmp_path: Path, arrays: GraphArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder(TextEncoderConfig(batch_size=2))
    texts = ["Pneumonia", "Pleural effusion", "Lung consolidation", "a cat sat on the mat"]
    v = enc.encode(texts, progress=False)
    assert v.shape == (4, 384)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    sim = v @ v.T
    assert sim[0, 2] > sim[0, 3] + 0.2  # medical terms are closer to each other
    # order restored after length-sorted batching
    torch.testing.assert_close(enc.encode(texts[::-1], progress=False), v.flip(0))
    # not inference tensors: a trainable layer can consume them
    torch.nn.Linear(384, 2)(v).sum().backward()

    tokens, mask = enc.token_embeddings(["chest pain", "fever and productive cough for days"])
    assert tokens.shape[:2] == mask.shape and tokens.shape[2] == 384
    assert mask.dtype == torch.bool and mask[1].all() and not mask[0].all()

    calls = 0
    original = enc.encode

    def counted(texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return original(texts, progress)

    monkeypatch.setattr(enc, "encode", counted)
    f1 = concept_features(arrays, enc, tmp_path, "v1")
    f2 = concept_features(arrays, enc, tmp_path, "v1")
    assert calls == 1
    torch.testing.assert_close(f1, f2)
    assert f1.shape == (arrays.num_nodes, 384)
