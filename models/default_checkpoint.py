"""Where the checkpoint that ships with kgdx lives: ``models/data/default/`` in the package."""

from __future__ import annotations

from pathlib import Path

from models.errors import CheckpointError

#: The documented command that (re)creates the default checkpoint.
TRAIN_COMMAND = "kgdx train --config models/configs/default.toml"


def default_checkpoint_dir() -> Path:
    """The bundled checkpoint folder (``models/data/default/`` inside the installed package).

    The folder may not exist (a clone before the first training run); use
    :func:`resolve_checkpoint_dir` for a path that is checked.
    """
    return Path(__file__).resolve().parent / "data" / "default"


def resolve_checkpoint_dir(checkpoint: str | Path | None = None) -> Path:
    """``checkpoint`` (or the bundled default when ``None``), checked to hold a checkpoint.

    Raises:
        CheckpointError: no ``checkpoint.json`` there; for the default, the message says how
            to train one.
    """
    from models.checkpoint import INFO_FILE

    if checkpoint is None:
        path = default_checkpoint_dir()
        if not (path / INFO_FILE).is_file():
            raise CheckpointError(f"no checkpoint at {path}; train one with `{TRAIN_COMMAND}`")
        return path
    path = Path(checkpoint).expanduser()
    if path.is_file() and path.name == INFO_FILE:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: not a folder")
    if not (path / INFO_FILE).is_file():
        raise CheckpointError(f"no checkpoint at {path}: {INFO_FILE} is missing")
    return path
