"""Where kgdx keeps its data: ``$KGDX_HOME`` (default ``~/.kgdx``) and the database URL."""

from __future__ import annotations

import os
from pathlib import Path


def kgdx_home() -> Path:
    """The data folder, created on first use."""
    home = Path(os.environ.get("KGDX_HOME") or Path.home() / ".kgdx").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_db_url() -> str:
    """``$KGDX_DB_URL`` when set, else a SQLite file under :func:`kgdx_home`."""
    url = os.environ.get("KGDX_DB_URL")
    if url:
        return url
    return f"sqlite:///{kgdx_home() / 'kgdx.db'}"
