from __future__ import annotations

import json

import pytest

from models.config import KgdxModelConfig
from models.errors import ConfigError
from tests.models.conftest import tiny_config


def test_round_trip_through_json() -> None:
    cfg = tiny_config(conv="gat", use_kg=False)
    data = json.loads(json.dumps(cfg.to_dict()))
    back = KgdxModelConfig.from_dict(data)
    assert back == cfg
    assert back.gnn.conv == "gat" and back.image.backbone == "cnn"


def test_defaults_fill_missing_keys() -> None:
    cfg = KgdxModelConfig.from_dict({"targets": ["X:a"], "gnn": {"layers": 3}})
    assert cfg.gnn.layers == 3 and cfg.gnn.hidden == 256 and cfg.dim == 256


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"targets": ["X:a"], "dimm": 3}, "'dimm'"),
        ({"targets": ["X:a"], "gnn": {"hiden": 3}}, "'gnn.hiden'"),
        ({"targets": ["X:a"], "image": {"backbone": "cnn", "size": 3}}, "'image.size'"),
    ],
)
def test_unknown_key_is_named(data: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        KgdxModelConfig.from_dict(data)


def test_validation() -> None:
    with pytest.raises(ConfigError, match="targets"):
        KgdxModelConfig()
    with pytest.raises(ConfigError, match="duplicates"):
        KgdxModelConfig(targets=["X:a", "X:a"])
    with pytest.raises(ConfigError, match=r"fusion\.heads"):
        KgdxModelConfig(targets=["X:a"], dim=30)
    with pytest.raises(ConfigError, match=r"gnn\.conv"):
        KgdxModelConfig.from_dict({"targets": ["X:a"], "gnn": {"conv": "gcn"}})
    with pytest.raises(ConfigError, match="gnn must be a mapping"):
        KgdxModelConfig.from_dict({"targets": ["X:a"], "gnn": 3})
