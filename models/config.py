"""The whole model's configuration: what a checkpoint stores and the model is rebuilt from."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from models.decoder import DecoderConfig
from models.errors import ConfigError
from models.fusion import FusionConfig
from models.gnn import OntologyGNNConfig
from models.image_encoder import ImageEncoderConfig
from models.text_encoder import TextEncoderConfig

T = TypeVar("T")


@dataclass
class KgdxModelConfig:
    """Everything needed to rebuild a :class:`~models.model.KgdxModel` (weights aside).

    Args:
        targets: concept ids of the findings the model is trained on, in output order.
        dim: width ``D`` of entity embeddings, tokens and queries (default 256).
        use_kg: ``True`` (default): entities come from the ontology GNN. ``False``: the
            ``--no-kg`` ablation, free learned label embeddings of the targets replace the GNN
            and the graph; everything else is identical.
        k_hops: restrict the GNN to the ``k``-hop neighbourhood of the targets (``None``,
            default: the whole graph). Concepts outside it cannot be scored zero-shot.
        text_dim: width of the clinical text token embeddings (default 384, MiniLM).
        name: model name reported with every prediction.
        text: :class:`TextEncoderConfig` for concept texts and clinical text.
        gnn: :class:`OntologyGNNConfig`.
        image: :class:`ImageEncoderConfig`.
        fusion: :class:`FusionConfig`.
        decoder: :class:`DecoderConfig`.
    """

    targets: list[str] = field(default_factory=list)  # finding concept ids, output order
    dim: int = 256  # entity / token / query width D
    use_kg: bool = True  # False = --no-kg ablation (free label embeddings, no GNN)
    k_hops: int | None = None  # GNN over the targets' k-hop neighbourhood; None = all
    text_dim: int = 384  # clinical text token width (text encoder hidden size)
    name: str = "kgdx"  # model name reported with predictions
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    gnn: OntologyGNNConfig = field(default_factory=OntologyGNNConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        self.targets = list(self.targets)
        if not self.targets:
            raise ConfigError("targets must name at least one concept id")
        if len(set(self.targets)) != len(self.targets):
            dup = sorted({t for t in self.targets if self.targets.count(t) > 1})
            raise ConfigError(f"targets must be unique, got duplicates {dup}")
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        for part, heads in (("fusion", self.fusion.heads), ("decoder", self.decoder.heads)):
            if self.dim % heads:
                raise ConfigError(f"dim={self.dim} must be divisible by {part}.heads={heads}")
        if self.k_hops is not None and self.k_hops < 0:
            raise ConfigError(f"k_hops must be None or >= 0, got {self.k_hops}")
        if self.text_dim < 1:
            raise ConfigError(f"text_dim must be >= 1, got {self.text_dim}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested dicts for the parts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KgdxModelConfig:
        """Rebuild from :meth:`to_dict` output; an unknown key raises :class:`ConfigError`
        (a ``ValueError``) naming it, e.g. ``gnn.hiden``."""
        return _from_dict(cls, data, "")


def _from_dict(cls: type[T], data: Any, prefix: str) -> T:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    assert dataclasses.is_dataclass(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown config key {key!r} (known: {', '.join(sorted(names))})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = value
    return cls(**kwargs)
