"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, PostgresUnavailable, postgres_server


@pytest.fixture
def tmp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$KGDX_HOME`` pointing at an empty temporary folder, with no DB URL or ontology set."""
    home = tmp_path / "kgdx-home"
    home.mkdir()
    monkeypatch.setenv("KGDX_HOME", str(home))
    monkeypatch.delenv("KGDX_DB_URL", raising=False)
    monkeypatch.delenv("KGDX_ONTOLOGY", raising=False)
    return home


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL for the session (``$KGDX_TEST_PG_URL`` or a throwaway cluster)."""
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")


@pytest.fixture(scope="session")
def pg_url(pg_server: PostgresServer) -> str:
    """SQLAlchemy URL of the session's PostgreSQL test database."""
    return pg_server.url
