"""Builder: label mapping, graph + cached concept features, model configs and models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kg.errors import MappingError
from models.builder import (
    build_model,
    gnn_parameter_names,
    load_graph,
    map_targets,
    model_config,
    ontology_identity,
    prepare_graph,
)
from models.data import NIH_FINDINGS
from models.errors import ConfigError
from tests.models.conftest import IN_DIM, tiny_ontology
from tests.models.train_fixtures import LABEL_MAP, FakeEncoder

TINY_MODEL = {
    "dim": 32,
    "text_dim": 16,
    "gnn": {"hidden": 32, "layers": 2, "num_bases": 2},
    "image": {"backbone": "cnn", "image_size": 32, "out_dim": 32},
    "fusion": {"layers": 1, "heads": 4, "ffn_mult": 2},
    "decoder": {"layers": 2, "heads": 4, "ffn_mult": 2},
}


def test_bundled_graph_maps_the_nih_findings() -> None:
    ontology = load_graph(None)
    labels = map_targets(ontology, [*NIH_FINDINGS, "No_Finding"])
    assert list(labels) == [*NIH_FINDINGS, "No_Finding"]
    assert labels["Effusion"] == "KGDX:0000110"
    assert labels["No_Finding"] == "KGDX:0000092"
    name, version = ontology_identity(ontology)
    assert name == "chest-cxr" and version == ontology.content_hash()


def test_unmapped_labels_are_listed() -> None:
    with pytest.raises(MappingError, match=r"2 unresolved: Kidney stone, Wrist fracture"):
        map_targets(load_graph(None), ["Effusion", "Kidney stone", "Wrist fracture"])


def test_mapping_table_or_none(tmp_path: Path) -> None:
    onto = tiny_ontology()
    assert map_targets(onto, ["Effusion"], LABEL_MAP) == {"Effusion": "X:effusion"}
    # without a table, names and synonyms still resolve
    assert map_targets(onto, ["Pleural effusion"], "") == {"Pleural effusion": "X:effusion"}
    table = tmp_path / "map.csv"
    table.write_text("label,concept_id\nWet lung,X:effusion\n")
    assert map_targets(onto, ["Wet lung"], table) == {"Wet lung": "X:effusion"}


def test_prepare_graph_caches_features(tmp_path: Path) -> None:
    onto = tiny_ontology()
    enc = FakeEncoder()
    arrays, feats, encoder_id = prepare_graph(onto, None, tmp_path, progress=False, encoder=enc)
    assert feats.shape == (arrays.num_nodes, IN_DIM) == (6, IN_DIM)
    assert encoder_id == enc.encoder_id
    again = prepare_graph(onto, None, tmp_path, progress=False, encoder=enc)[1]
    assert enc.calls == 1  # the second call read the cache
    assert torch.equal(feats, again)


def test_model_config_fills_targets_and_in_dim() -> None:
    cfg = model_config(TINY_MODEL, ["X:effusion"], IN_DIM)
    assert cfg.targets == ["X:effusion"] and cfg.gnn.in_dim == IN_DIM
    assert model_config(TINY_MODEL, ["X:effusion"], None, use_kg=False).use_kg is False
    with pytest.raises(ConfigError, match=r"model\.gnn\.in_dim = 8 but the text encoder gives 16"):
        model_config({**TINY_MODEL, "gnn": {"in_dim": 8}}, ["X:effusion"], IN_DIM)
    with pytest.raises(ConfigError, match="unknown config key"):
        model_config({"dimm": 3}, ["X:effusion"])


def test_build_model_with_and_without_the_graph(tmp_path: Path) -> None:
    onto = tiny_ontology()
    arrays, feats, _ = prepare_graph(onto, None, tmp_path, progress=False, encoder=FakeEncoder())
    targets = ["X:consolidation", "X:effusion"]
    kg = build_model(model_config(TINY_MODEL, targets, IN_DIM), arrays, feats)
    assert gnn_parameter_names(kg)
    out = kg(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 2)
    ablation = build_model(model_config(TINY_MODEL, targets, use_kg=False), arrays, feats)
    assert gnn_parameter_names(ablation) == []
    assert ablation.gnn is None and ablation.label_embeddings is not None
