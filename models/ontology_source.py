"""Where the model layer gets its ontology: the bundled graph, a file, or the store."""

from __future__ import annotations

from pathlib import Path

from kg.bundled import BUNDLED_NAME, bundled_ontology_path
from kg.errors import NotFoundError
from kg.loaders import load_ontology
from kg.ontology import Ontology
from kg.store import GraphStore


def load_ontology_spec(spec: str | Path | None = None, store: GraphStore | None = None) -> Ontology:
    """The ontology ``spec`` names.

    Args:
        spec: ``None`` for the bundled chest-radiograph graph; an existing file (any format
            the loaders read); or a store reference ``NAME[@VERSION]``.
        store: the store to read references from (default: ``GraphStore()``).
    """
    if spec is None:
        return load_ontology(bundled_ontology_path())
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return load_ontology(path)
    found = _stored(store, str(spec))
    if found is not None:
        return found
    if str(spec) == BUNDLED_NAME:
        return load_ontology(bundled_ontology_path())
    store = store or GraphStore()
    store.resolve(str(spec))  # raises NotFoundError naming what is stored
    raise NotFoundError(f"ontology {spec!r} not found")


def ontology_for_checkpoint(
    name: str, version: str, store: GraphStore | None = None
) -> Ontology | None:
    """The exact ontology version a checkpoint was trained on, if it can be found.

    Looks in the store for ``name@version``, then at the bundled graph; ``None`` when
    neither has that version (the caller decides whether another version may be used).
    """
    if name == BUNDLED_NAME or not name:
        bundled = load_ontology(bundled_ontology_path())
        if bundled.content_hash() == version:
            return bundled
    found = _stored(store, f"{name}@{version}")
    if found is not None:
        return found
    return None


def _stored(store: GraphStore | None, ref: str) -> Ontology | None:
    try:
        store = store or GraphStore()
        return store.load(store.resolve(ref).ref)
    except NotFoundError:
        return None
