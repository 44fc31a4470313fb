"""The chest-radiograph knowledge graph that ships with kgdx (``kg/data/chest_cxr.obo``)."""

from __future__ import annotations

from pathlib import Path

#: Name the bundled graph is stored under.
BUNDLED_NAME = "chest-cxr"


def bundled_ontology_path() -> Path:
    """Path of the bundled OBO file inside the installed package."""
    return Path(__file__).resolve().parent / "data" / "chest_cxr.obo"


def bundled_label_map_path() -> Path:
    """Path of the NIH / CheXpert label -> concept id mapping file."""
    return Path(__file__).resolve().parent / "data" / "nih_label_map.csv"
