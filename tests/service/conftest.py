"""A tiny model served for real: checkpoint on disk, ontology in the store, TestClient lifespan."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from kg.tensors import to_arrays
from service.apikeys import ApiKeyStore
from service.app import create_app
from service.db import ServiceDatabase
from service.settings import Settings
from tests.models.conftest import IN_DIM, tiny_config, tiny_ontology
from tests.models.tiny_checkpoint import save_tiny, store_ontology, tiny_model


@dataclass
class Served:
    client: TestClient
    keys: dict[str, str]  # scope -> key
    home: Path

    def auth(self, scope: str = "predict") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(
    request: pytest.FixtureRequest, tmp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ServiceDatabase]:
    """An empty service database, on SQLite and on a real PostgreSQL."""
    monkeypatch.delenv("KGDX_UID_SALT", raising=False)
    url = (
        f"sqlite:///{tmp_home / 'kgdx.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    with ServiceDatabase(url) as d:
        d.drop_all()
        d.create_all()
        yield d
        d.drop_all()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("KGDX_HOME", str(home))
    monkeypatch.delenv("KGDX_DB_URL", raising=False)
    monkeypatch.delenv("KGDX_ONTOLOGY", raising=False)
    ontology = tiny_ontology()
    arrays = to_arrays(ontology)
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(arrays.num_nodes, IN_DIM, generator=g), dim=-1
    )
    version = store_ontology(ontology, features, home)
    torch.manual_seed(0)
    # Clinical text goes through the real MiniLM, so the model takes its width.
    model = tiny_model(arrays, features, config=replace(tiny_config(), text_dim=384))
    return save_tiny(tmp_path / "ckpt", model, version, name=ontology.name)


@pytest.fixture
def make_service(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    opened: list[TestClient] = []

    def make(**overrides: Any) -> Served:
        db = ServiceDatabase()
        db.create_all()
        store = ApiKeyStore(db)
        keys = {
            scope: store.create(f"test-{scope}-{len(opened)}", [scope])[1]
            for scope in ("predict", "ingest", "admin")
        }
        db.close()
        overrides.setdefault("checkpoint", tiny_checkpoint)
        overrides.setdefault("max_wait_ms", 2.0)
        settings = Settings(**overrides)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return Served(client, keys, tmp_path / "home")

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def served(make_service: Callable[..., Served]) -> Served:
    return make_service()
