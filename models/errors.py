"""Domain errors of the model layer.

Every error a user can cause derives from :class:`ModelError`; the CLI prints its message as
``Error: ...`` and the service maps it to an HTTP status in one handler module.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by ``models``."""


class ConfigError(ModelError, ValueError):
    """A model configuration is invalid (unknown key, value out of range, inconsistent dims)."""


class EncoderError(ModelError):
    """A text or image encoder could not be loaded (missing folder, no safetensors weights)."""


class UnknownConceptError(ModelError, KeyError):
    """A concept id (a target, a concept to score) is not a node of the loaded graph."""

    def __init__(self, missing: list[str], where: str = "graph"):
        self.missing = missing
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        super().__init__(f"{len(missing)} concept(s) not in the {where}: {shown}{more}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CheckpointError(ModelError):
    """A checkpoint is missing, corrupt, or does not fit the loaded ontology or encoder."""


class DataError(ModelError):
    """A dataset cannot be used: missing columns or files, bad label values, an empty split."""
