"""Assemble a model from an ontology and a model config: graph arrays, concept text
features, the label -> concept map and the :class:`~models.model.KgdxModel` itself.

Training (:mod:`models.trainer`) and evaluation reuse these steps, so each is a function of
its inputs only::

    ontology = load_graph(spec)                                   # bundled, file or store
    labels = map_targets(ontology, label_names, label_map)        # {label: concept id}
    arrays, features, encoder_id = prepare_graph(ontology, text_config, cache_dir)
    config = model_config(model_dict, list(labels.values()), features.shape[1])
    model = build_model(config, arrays, features)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kg.bundled import bundled_label_map_path
from kg.mapping import map_labels, require_all
from kg.ontology import Ontology
from kg.store import GraphStore
from kg.tensors import GraphArrays, to_arrays
from models.config import KgdxModelConfig
from models.model import KgdxModel
from models.ontology_source import load_ontology_spec
from models.text_encoder import SupportsEncode, TextEncoder, TextEncoderConfig, concept_features


def load_graph(spec: str | Path | None = None, store: GraphStore | None = None) -> Ontology:
    """The ontology ``spec`` names: ``None`` for the bundled chest graph, a file, or a store
    reference ``NAME[@VERSION]`` (see :func:`models.ontology_source.load_ontology_spec`)."""
    return load_ontology_spec(spec, store)


def ontology_identity(ontology: Ontology) -> tuple[str, str]:
    """``(name, version)`` as a checkpoint records them (version = content hash)."""
    return ontology.name or "", ontology.content_hash()


def map_targets(
    ontology: Ontology,
    label_names: Sequence[str],
    label_map: str | Path | Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Dataset label -> concept id for every label, in ``label_names`` order.

    Args:
        ontology: the graph to map into.
        label_names: the dataset's label columns.
        label_map: a ``label,concept_id`` CSV or a dict; ``None`` uses the bundled NIH /
            CheXpert table (its ids are also found as xrefs of a merged graph); ``""`` uses
            no table (ids, names, synonyms and xrefs only).

    Raises:
        kg.errors.MappingError: listing every unresolved or ambiguous label.
    """
    table: str | Path | Mapping[str, str] | None
    if label_map is None:
        table = bundled_label_map_path()
    elif isinstance(label_map, str) and not label_map:
        table = None
    else:
        table = label_map
    report = require_all(map_labels(list(label_names), ontology, table))
    return {name: report.resolved[name] for name in label_names}


def text_encoder_for(config: TextEncoderConfig, device: str | torch.device = "cpu") -> TextEncoder:
    """The (lazily loaded) text encoder a model config names."""
    return TextEncoder(config, device=device)


def prepare_graph(
    ontology: Ontology,
    text_config: TextEncoderConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    *,
    encoder: SupportsEncode | None = None,
) -> tuple[GraphArrays, torch.Tensor, str]:
    """Graph arrays and concept text features of ``ontology``.

    Features are cached per (ontology version, encoder id) under ``cache_dir`` (default
    ``$KGDX_HOME/features``) and never recomputed once cached.

    Args:
        ontology: the graph.
        text_config: which text encoder (default: bundled all-MiniLM-L6-v2).
        cache_dir: feature cache folder.
        progress: progress bar while encoding (stderr, terminals only).
        encoder: use this encoder instead of building one from ``text_config`` (tests).

    Returns:
        ``(arrays, node_features (N, H), encoder_id)``.
    """
    arrays = to_arrays(ontology)
    enc: SupportsEncode = encoder or text_encoder_for(text_config or TextEncoderConfig())
    if cache_dir is None:
        from kg.home import kgdx_home

        cache_dir = kgdx_home() / "features"
    features = concept_features(
        arrays, enc, Path(cache_dir), ontology.content_hash(), progress=progress
    )
    return arrays, features, enc.encoder_id


def model_config(
    model: Mapping[str, Any] | KgdxModelConfig,
    targets: Sequence[str],
    feature_dim: int | None = None,
    *,
    use_kg: bool | None = None,
) -> KgdxModelConfig:
    """A :class:`KgdxModelConfig` from ``[model]`` fields with the targets filled in.

    Args:
        model: config fields (as in a training TOML's ``[model]``, nested dicts for the
            parts) or a config whose targets are replaced.
        targets: concept ids, in output order.
        feature_dim: width of the concept text features; fills ``gnn.in_dim`` when the
            fields leave it out, and must equal it when they set it.
        use_kg: override ``use_kg`` (the ``--no-kg`` switch); None keeps the fields' value.

    Raises:
        ConfigError: unknown keys, bad values, or ``gnn.in_dim`` that does not fit the
            features.
    """
    from models.errors import ConfigError

    fields = model.to_dict() if isinstance(model, KgdxModelConfig) else copy.deepcopy(dict(model))
    fields["targets"] = list(targets)
    if use_kg is not None:
        fields["use_kg"] = bool(use_kg)
    gnn = dict(fields.get("gnn") or {})
    explicit = "in_dim" in gnn and not isinstance(model, KgdxModelConfig)
    if feature_dim is not None:
        if explicit and int(gnn["in_dim"]) != feature_dim:
            raise ConfigError(
                f"model.gnn.in_dim = {gnn['in_dim']} but the text encoder gives "
                f"{feature_dim}-dim concept features; leave gnn.in_dim out to use {feature_dim}"
            )
        gnn["in_dim"] = feature_dim
    fields["gnn"] = gnn
    return KgdxModelConfig.from_dict(fields)


def build_model(
    config: KgdxModelConfig,
    arrays: GraphArrays | None = None,
    node_features: torch.Tensor | None = None,
) -> KgdxModel:
    """The model (fresh weights) over the graph; ``arrays`` / ``node_features`` are only
    needed when ``config.use_kg`` (the ``--no-kg`` ablation just checks its targets
    against ``arrays`` when given)."""
    if not config.use_kg:
        node_features = None
    return KgdxModel(config, arrays, node_features)


def gnn_parameter_names(model: KgdxModel) -> list[str]:
    """Names of the parameters that exist only because of the graph (empty for ``--no-kg``)."""
    return [n for n, _ in model.named_parameters() if n.startswith(("gnn.", "entity_proj."))]
