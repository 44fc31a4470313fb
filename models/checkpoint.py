"""Checkpoints: ``model.safetensors`` (weights) + ``checkpoint.json`` (everything else).

The JSON holds ``asdict(config)`` (the model is rebuilt from it, never from CLI flags), the
label -> concept map, the ontology name and version, the relation vocabulary, the text
encoder id, a data summary and metrics. Weights are only ever read with safetensors, never
with ``torch.load``. A checkpoint refuses to load against another ontology version unless
asked to.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kg.tensors import GraphArrays
from models.config import KgdxModelConfig
from models.errors import CheckpointError, ConfigError
from models.model import KgdxModel

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "checkpoint.json"
FORMAT = "kgdx-checkpoint"
FORMAT_VERSION = 1
#: ``extra`` keys with a fixed place in ``checkpoint.json``; any others go under ``"extra"``.
_KNOWN_EXTRA = ("ontology_name", "ontology_version", "encoder_id", "labels", "data", "metrics")


def save_checkpoint(
    directory: str | Path,
    model: KgdxModel,
    config: KgdxModelConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created if missing) and return the directory.

    Args:
        directory: target folder; an existing checkpoint there is replaced.
        model: the model to save.
        config: its config (default ``model.config``, which holds the resolved relation
            count; prefer it).
        extra: ``ontology_version`` (required), ``ontology_name``, ``encoder_id``,
            ``labels`` (dataset label -> concept id), ``data`` (summary), ``metrics``; any
            other key is kept under ``"extra"``. Must be JSON-serialisable.
    """
    extra = dict(extra or {})
    config = config or model.config
    version = extra.get("ontology_version")
    if not version or not isinstance(version, str):
        raise ValueError(f"extra['ontology_version'] must be a non-empty string, got {version!r}")
    if config.to_dict() != model.config.to_dict():
        # The model resolves gnn.num_relations from the graph; that is the only allowed gap.
        n_rel = model.config.gnn.num_relations
        resolved = replace(config, gnn=replace(config.gnn, num_relations=n_rel))
        if resolved.to_dict() != model.config.to_dict():
            raise ValueError("config does not match model.config; pass model.config")
        config = resolved
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": config.name,
        "config": config.to_dict(),
        "ontology": {"name": extra.get("ontology_name", ""), "version": version},
        "relations": model.relations,
        "encoder_id": extra.get("encoder_id"),
        "labels": extra.get("labels") or {t: t for t in config.targets},
        "data": extra.get("data", {}),
        "metrics": extra.get("metrics", {}),
        "extra": {k: v for k, v in extra.items() if k not in _KNOWN_EXTRA},
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    try:
        text = json.dumps(info, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serialisable: {e}") from e
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # Weights first, JSON last and both by atomic rename: a crash leaves no loadable half.
    write_weights_and_info(
        directory,
        tensors,
        {"format": FORMAT, "ontology_version": version},
        text,
        weights_file=WEIGHTS_FILE,
        info_file=INFO_FILE,
    )
    return directory


def write_weights_and_info(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    info_text: str,
    *,
    weights_file: str,
    info_file: str,
) -> None:
    """Write a safetensors file and its JSON side by side, each through a temp file + rename,
    so a reader never sees a half-written checkpoint."""
    pid = os.getpid()
    tmp_w = directory / f".{weights_file}.{pid}.tmp"
    tmp_i = directory / f".{info_file}.{pid}.tmp"
    save_file(tensors, str(tmp_w), metadata=metadata)
    tmp_i.write_text(info_text + "\n")
    os.replace(tmp_w, directory / weights_file)
    os.replace(tmp_i, directory / info_file)


def read_checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """The parsed ``checkpoint.json`` of ``directory``."""
    path = Path(directory) / INFO_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a kgdx checkpoint (no {INFO_FILE})")
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from e
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a kgdx checkpoint (format={info.get('format')!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {info.get('format_version')!r}, this kgdx "
            f"reads version {FORMAT_VERSION}"
        )
    return info


def load_checkpoint(
    directory: str | Path,
    graph_arrays: GraphArrays | None,
    ontology_version: str,
    allow_other_ontology: bool = False,
    *,
    node_features: torch.Tensor | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> KgdxModel:
    """Rebuild the model saved in ``directory`` over the given ontology graph.

    Args:
        directory: a folder written by :func:`save_checkpoint`.
        graph_arrays: the ontology graph (``None`` only for a ``use_kg=False`` checkpoint).
        ontology_version: version (content hash) of ``graph_arrays``' ontology.
        allow_other_ontology: load even when the version differs from the training one
            (warns); relation types the checkpoint does not know are dropped.
        node_features: (N, in_dim) concept features of ``graph_arrays``; computed with the
            checkpoint's text encoder and cached under ``cache_dir`` when ``None``.
        cache_dir: concept feature cache (default ``$KGDX_HOME/features``).
        device: where the model goes (default CPU).

    Raises:
        CheckpointError: missing/corrupt files, another ontology version (unless allowed),
            another text encoder, or weights that do not fit the config.
    """
    directory = Path(directory)
    info = read_checkpoint_info(directory)
    try:
        config = KgdxModelConfig.from_dict(info["config"])
    except (KeyError, ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory}: bad config in {INFO_FILE}: {e}") from e
    trained = info.get("ontology") or {}
    trained_version = trained.get("version")
    if trained_version != ontology_version:
        what = (
            f"checkpoint {directory} was trained on ontology {trained.get('name') or '?'} "
            f"version {trained_version}, the loaded ontology is version {ontology_version}"
        )
        if not allow_other_ontology:
            raise CheckpointError(
                f"{what}; load that version, or pass allow_other_ontology=True "
                "(--allow-other-ontology) to use this one anyway"
            )
        warnings.warn(f"{what}; loading anyway as asked", UserWarning, stacklevel=2)
        log.warning("%s; loading anyway as asked", what)

    if config.use_kg:
        if graph_arrays is None:
            raise CheckpointError(f"{directory}: this checkpoint needs the ontology graph")
        graph_arrays = _align_relations(graph_arrays, info.get("relations"), directory)
        if node_features is None:
            node_features = _features(config, info, graph_arrays, ontology_version, cache_dir)
    try:
        model = KgdxModel(config, graph_arrays, node_features)
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{directory}: cannot rebuild the model: {e}") from e

    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{weights}: unreadable safetensors file: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        shown = "; ".join(line.strip() for line in lines[1:4]) or lines[0]
        more = f" (and {len(lines) - 4} more)" if len(lines) > 4 else ""
        raise CheckpointError(f"{weights} does not fit the config: {shown}{more}") from e
    model.info = info
    return model.to(device).eval()


def _align_relations(
    arrays: GraphArrays, trained: list[str] | None, directory: Path
) -> GraphArrays:
    """Renumber ``arrays``' edge types to the checkpoint's relation vocabulary.

    Edges of relations the checkpoint never saw are dropped (the GNN has no weights for
    them); relations it saw but this graph lacks simply get no edges.
    """
    if trained is None or list(trained) == list(arrays.relations):
        return arrays
    pos = {r: i for i, r in enumerate(trained)}
    unknown = [r for r in arrays.relations if r not in pos]
    if unknown:
        log.warning(
            "%s: dropping edges of relations unknown to the checkpoint: %s", directory, unknown
        )
    remap = np.array([pos.get(r, -1) for r in arrays.relations], dtype=np.int64)
    new_type = remap[arrays.edge_type] if arrays.edge_type.size else arrays.edge_type
    keep = new_type >= 0
    return GraphArrays(
        node_ids=arrays.node_ids,
        node_texts=arrays.node_texts,
        node_labels=arrays.node_labels,
        relations=list(trained),
        edge_index=np.ascontiguousarray(arrays.edge_index[:, keep]),
        edge_type=new_type[keep],
        edge_weight=arrays.edge_weight[keep],
    )


def _features(
    config: KgdxModelConfig,
    info: dict[str, Any],
    arrays: GraphArrays,
    ontology_version: str,
    cache_dir: str | Path | None,
) -> torch.Tensor:
    from kg.home import kgdx_home
    from models.text_encoder import TextEncoder, concept_features

    encoder = TextEncoder(config.text)
    stored = info.get("encoder_id")
    if stored and stored != encoder.encoder_id:
        raise CheckpointError(
            f"checkpoint was trained on text features of {stored}, this machine's encoder is "
            f"{encoder.encoder_id}; the GNN would read foreign features"
        )
    folder = Path(cache_dir) if cache_dir is not None else kgdx_home() / "features"
    return concept_features(arrays, encoder, folder, ontology_version)
