"""Shared fixtures of the model tests: a 6-concept chest ontology and tiny configs."""

from __future__ import annotations

import pytest
import torch

from kg.ontology import Concept, Ontology, Relation
from kg.tensors import GraphArrays, to_arrays
from models.config import KgdxModelConfig
from models.decoder import DecoderConfig
from models.fusion import FusionConfig
from models.gnn import OntologyGNNConfig
from models.image_encoder import ImageEncoderConfig

IN_DIM = 16  # concept feature width in the fast tests (MiniLM gives 384)
TARGETS = ["X:consolidation", "X:effusion", "X:opacity"]


def tiny_ontology() -> Ontology:
    """Six concepts, four relation types; ``X:pneumonia`` is never a target (zero-shot)."""
    o = Ontology(name="tiny")
    for cid, label in [
        ("X:finding", "Lung finding"),
        ("X:opacity", "Pulmonary opacity"),
        ("X:consolidation", "Consolidation"),
        ("X:effusion", "Pleural effusion"),
        ("X:pneumonia", "Pneumonia"),
        ("X:pleura", "Pleura"),
    ]:
        o.add(Concept(id=cid, label=label, definition=f"{label} seen on a chest image"))
    o.relations = [
        Relation("X:opacity", "is_a", "X:finding"),
        Relation("X:consolidation", "is_a", "X:opacity"),
        Relation("X:effusion", "is_a", "X:finding"),
        Relation("X:consolidation", "suggests", "X:pneumonia", weight=0.7),
        Relation("X:effusion", "located_in", "X:pleura"),
        Relation("X:pneumonia", "co_occurs_with", "X:effusion"),
    ]
    return o


@pytest.fixture
def ontology() -> Ontology:
    return tiny_ontology()


@pytest.fixture
def arrays(ontology: Ontology) -> GraphArrays:
    return to_arrays(ontology)


@pytest.fixture
def features(arrays: GraphArrays) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(arrays.num_nodes, IN_DIM, generator=g), dim=-1)


def tiny_config(
    backbone: str = "cnn", image_size: int = 32, use_kg: bool = True, conv: str = "rgcn"
) -> KgdxModelConfig:
    return KgdxModelConfig(
        targets=list(TARGETS),
        dim=32,
        use_kg=use_kg,
        text_dim=24,
        gnn=OntologyGNNConfig(in_dim=IN_DIM, hidden=32, layers=2, conv=conv, num_bases=2),
        image=ImageEncoderConfig(backbone=backbone, image_size=image_size, out_dim=32),
        fusion=FusionConfig(layers=1, heads=4, ffn_mult=2, dropout=0.0),
        decoder=DecoderConfig(layers=2, heads=4, ffn_mult=2, dropout=0.0),
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
