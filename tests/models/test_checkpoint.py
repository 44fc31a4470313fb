from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kg.tensors import GraphArrays
from models.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from models.errors import CheckpointError
from models.model import KgdxModel
from tests.models.conftest import TARGETS, tiny_config

EXTRA = {
    "ontology_name": "tiny",
    "ontology_version": "v1",
    "encoder_id": "fake@1",
    "labels": {
        "Consolidation": "X:consolidation",
        "Effusion": "X:effusion",
        "Opacity": "X:opacity",
    },
    "data": {"train": 10, "val": 2},
    "metrics": {"val_auroc": 0.5},
    "seed": 0,
}


def _trained(arrays: GraphArrays, features: torch.Tensor, use_kg: bool = True) -> KgdxModel:
    model = KgdxModel(tiny_config(use_kg=use_kg), arrays, features)
    with torch.no_grad():  # move away from the init so a fresh model would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model(torch.randn(4, 1, 32, 32))  # update BatchNorm statistics
    return model.eval()


@pytest.mark.parametrize("use_kg", [True, False])
def test_round_trip(
    tmp_path: Path,
    arrays: GraphArrays,
    features: torch.Tensor,
    use_kg: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _trained(arrays, features, use_kg)
    save_checkpoint(tmp_path, model, model.config, EXTRA)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "model.safetensors"]

    def no_pickles(*a: object, **k: object) -> None:
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickles)
    loaded = load_checkpoint(tmp_path, arrays, "v1", node_features=features)
    assert not loaded.training
    images = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(images).logits, model(images).logits)
    assert loaded.config == model.config
    info = read_checkpoint_info(tmp_path)
    assert info["ontology"] == {"name": "tiny", "version": "v1"}
    assert info["labels"] == EXTRA["labels"] and info["metrics"] == {"val_auroc": 0.5}
    assert info["extra"] == {"seed": 0}
    assert info["config"]["targets"] == TARGETS
    assert loaded.info["encoder_id"] == "fake@1"
    # the graph is not in the weights: it comes from the ontology at load time
    with open(tmp_path / "checkpoint.json") as f:
        assert json.load(f)["relations"] == (arrays.relations if use_kg else None)


def test_refuses_other_ontology_version(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = _trained(arrays, features)
    save_checkpoint(tmp_path, model, model.config, EXTRA)
    with pytest.raises(CheckpointError, match=r"version v1.*version v2.*allow_other_ontology"):
        load_checkpoint(tmp_path, arrays, "v2", node_features=features)
    with pytest.warns(UserWarning, match="loading anyway"):
        loaded = load_checkpoint(tmp_path, arrays, "v2", True, node_features=features)
    images = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(loaded(images).logits, model(images).logits)


def test_other_ontology_with_other_relations(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor
) -> None:
    """Edges of a relation the checkpoint never saw are dropped, the rest renumbered."""
    model = _trained(arrays, features)
    save_checkpoint(tmp_path, model, model.config, EXTRA)
    relations = ["aaa_new", *arrays.relations]  # shifts every relation index by one
    edge_type = arrays.edge_type + 1
    edge_type[0] = 0
    other = GraphArrays(
        node_ids=arrays.node_ids,
        node_texts=arrays.node_texts,
        node_labels=arrays.node_labels,
        relations=relations,
        edge_index=arrays.edge_index,
        edge_type=edge_type,
        edge_weight=arrays.edge_weight,
    )
    with pytest.warns(UserWarning):
        loaded = load_checkpoint(tmp_path, other, "v2", True, node_features=features)
    assert loaded.relations == arrays.relations
    assert loaded.edge_type.tolist() == arrays.edge_type[1:].tolist()
    np.testing.assert_array_equal(loaded.edge_index.numpy(), arrays.edge_index[:, 1:])


def test_refuses_other_text_encoder(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = _trained(arrays, features)
    save_checkpoint(tmp_path, model, model.config, EXTRA)  # encoder_id fake@1
    with pytest.raises(CheckpointError, match="fake@1"):
        load_checkpoint(tmp_path, arrays, "v1", cache_dir=tmp_path / "features")


def test_broken_checkpoints(tmp_path: Path, arrays: GraphArrays, features: torch.Tensor) -> None:
    with pytest.raises(CheckpointError, match="not a kgdx checkpoint"):
        load_checkpoint(tmp_path, arrays, "v1", node_features=features)
    model = _trained(arrays, features)
    save_checkpoint(tmp_path, model, model.config, EXTRA)
    info = json.loads((tmp_path / "checkpoint.json").read_text())
    info["config"]["gnn"]["hiden"] = 3
    (tmp_path / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"gnn\.hiden"):
        load_checkpoint(tmp_path, arrays, "v1", node_features=features)
    del info["config"]["gnn"]["hiden"]
    info["config"]["dim"] = 64
    (tmp_path / "checkpoint.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path, arrays, "v1", node_features=features)
    del info["config"]["dim"]
    (tmp_path / "checkpoint.json").write_text(json.dumps(info))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, arrays, "v1", node_features=features)


def test_save_needs_ontology_version(
    tmp_path: Path, arrays: GraphArrays, features: torch.Tensor
) -> None:
    model = _trained(arrays, features)
    with pytest.raises(ValueError, match="ontology_version"):
        save_checkpoint(tmp_path, model, model.config, {})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, model, model.config, {**EXTRA, "data": object()})
