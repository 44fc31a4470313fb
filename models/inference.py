"""Serving a checkpoint: ``preprocess -> predict -> explain``, each a method testable alone.

:class:`Predictor` loads a checkpoint once (model in eval mode, entity embeddings ``E``
computed once by :meth:`~models.model.KgdxModel.cache_entities`, the ontology graph, the
preprocessing the model was trained with) and then scores batches:

.. code-block:: python

    predictor = Predictor.load()                    # the bundled checkpoint, its ontology
    batch, geometries = predictor.preprocess([load_image("cxr.png")])
    output = predictor.predict(batch)               # KgdxOutput, tensors on the CPU
    explanations = predictor.explain(output, geometries)

:func:`zero_shot_scores` scores concepts that were never training targets from their graph
nodes. :func:`reuse_image_tokens` lets code that re-scores the same images many times (the
faithfulness test, zero-shot scoring) run the image encoder once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kg.errors import KgError
from kg.ontology import Ontology
from kg.store import GraphStore
from kg.tensors import GraphArrays, to_arrays
from models.attribution import attributed_forward
from models.checkpoint import WEIGHTS_FILE, load_checkpoint, read_checkpoint_info
from models.config import KgdxModelConfig
from models.default_checkpoint import resolve_checkpoint_dir
from models.errors import CheckpointError, ConfigError, DataError, ModelError
from models.explain import DEFAULT_TOP_K, ImageExplanation, explain_output
from models.image_encoder import PatchTokens
from models.model import KgdxModel
from models.outputs import KgdxOutput
from models.transforms import Geometry, Preprocess, PreprocessConfig, preprocess_images

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")
#: How a :class:`Predictor` ranks evidence concepts (its ``evidence`` attribute).
EVIDENCE_METHODS = ("attribution", "attention")


# ---------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ModelError: CUDA asked for but not available, or an unknown name.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelError(f"device={device!r} asked for, but CUDA is not available here")
        return torch.device(name)
    raise ModelError(f"device must be one of {_DEVICES} (or cuda:N), got {device!r}")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 where supported, else float16; None (no
    autocast) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def amp_context(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast on CUDA (see :func:`amp_dtype`), nothing on the CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def output_to_cpu(output: KgdxOutput) -> KgdxOutput:
    """A copy of ``output`` with every tensor float32 on the CPU."""

    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().cpu()

    return KgdxOutput(
        logits=output.logits.detach().float().cpu(),
        probabilities=output.probabilities.detach().float().cpu(),
        patch_attention=output.patch_attention.detach().float().cpu(),
        grid=output.grid,
        entity_relevance=output.entity_relevance.detach().float().cpu(),
        concept_ids=output.concept_ids,
        entity_ids=output.entity_ids,
        fusion_attention=cpu(output.fusion_attention),
        token_attention=cpu(output.token_attention),
        entity_attribution=cpu(output.entity_attribution),
    )


# ---------------------------------------------------------------------------------------------
# Re-scoring the same images: run the image encoder once
# ---------------------------------------------------------------------------------------------


class _TokenCache(nn.Module):
    """Stands in for ``model.image_encoder``: returns registered patch tokens for registered
    input tensors (matched by identity) and runs the real encoder on anything else, so
    forwards that are not part of a :func:`reuse_image_tokens` block stay correct."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.known: dict[int, tuple[torch.Tensor, PatchTokens]] = {}

    def forward(self, images: torch.Tensor) -> PatchTokens:
        hit = self.known.get(id(images))
        if hit is not None and hit[0] is images:
            return hit[1]
        out: PatchTokens = self.encoder(images)
        return out


_REUSE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_REUSE_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def reuse_image_tokens(
    model: KgdxModel, images: torch.Tensor
) -> Iterator[Callable[[Sequence[int] | torch.Tensor | None], torch.Tensor]]:
    """Encode ``images`` once; inside the block, forwards reuse those patch tokens.

    Yields ``rows(index)``, which returns an input tensor to pass to the model (``images``
    for ``None``, else ``images[index]``, e.g. repeated rows): the model's image encoder
    then returns the matching cached tokens instead of running again. Everything after the
    encoder (fusion, decoder) runs as usual, so results equal plain forwards (the encoder
    is deterministic in eval mode). One block per model at a time; other forwards may run
    meanwhile and are unaffected.

    Shapes:
        images: (B, 1, S, S) on the model's device.
    """
    with _REUSE_LOCKS_GUARD:
        lock = _REUSE_LOCKS.setdefault(model, threading.Lock())
    with lock:
        tokens: PatchTokens = model.image_encoder(images)
        original = model.image_encoder
        cache = _TokenCache(original)

        def rows(index: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
            if index is None:
                x, t = images, tokens.tokens
            else:
                idx = torch.as_tensor(index, dtype=torch.long, device=images.device)
                x, t = images[idx], tokens.tokens[idx]  # (M, 1, S, S), (M, P, D)
            cache.known[id(x)] = (x, PatchTokens(t, tokens.grid))
            return x

        model.image_encoder = cache  # type: ignore[assignment]  # same call signature
        try:
            yield rows
        finally:
            model.image_encoder = original
            cache.known.clear()


# ---------------------------------------------------------------------------------------------
# Checkpoint metadata
# ---------------------------------------------------------------------------------------------


def weights_digest(directory: Path, length: int = 12) -> str:
    """First ``length`` hex digits of the SHA-256 of the checkpoint's weights file."""
    h = hashlib.sha256()
    with open(directory / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def label_names_for(targets: Sequence[str], labels: Mapping[str, str] | None) -> list[str]:
    """The dataset label name of each target concept (the first label mapped to it in the
    checkpoint's ``labels``), or the concept id when none is."""
    names: list[str] = []
    for cid in targets:
        found = [label for label, concept in (labels or {}).items() if concept == cid]
        names.append(found[0] if found else cid)
    return names


def stored_thresholds(
    info: Mapping[str, Any], names: Sequence[str], targets: Sequence[str]
) -> dict[str, float] | None:
    """Decision thresholds saved with a checkpoint (chosen on validation data), by label name.

    Looked up, first found wins, at ``metrics.thresholds``, ``metrics.val.thresholds``,
    ``extra.thresholds`` and ``thresholds``; keys may be label names or concept ids. None
    unless every target has one.
    """
    metrics = info.get("metrics") or {}
    val = metrics.get("val") if isinstance(metrics.get("val"), Mapping) else {}
    extra = info.get("extra") or {}
    for candidate in (
        metrics.get("thresholds"),
        (val or {}).get("thresholds"),
        extra.get("thresholds"),
        info.get("thresholds"),
    ):
        if not isinstance(candidate, Mapping):
            continue
        out: dict[str, float] = {}
        for name, cid in zip(names, targets, strict=True):
            value = candidate.get(name, candidate.get(cid))
            if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
                out[name] = float(value)
        if len(out) == len(names):
            return out
    return None


def preprocess_config_for(info: Mapping[str, Any], config: KgdxModelConfig) -> PreprocessConfig:
    """The preprocessing a checkpoint was trained with: ``extra.preprocess`` (or a top-level
    ``preprocess``) when saved, else the defaults at the model's image size."""
    extra = info.get("extra") or {}
    stored = extra.get("preprocess", info.get("preprocess"))
    if stored is None:
        return PreprocessConfig(image_size=config.image.image_size)
    if not isinstance(stored, Mapping):
        raise CheckpointError(f"preprocess settings must be a mapping, got {stored!r}")
    try:
        pre = PreprocessConfig(**dict(stored))
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"bad preprocess settings in the checkpoint: {e}") from e
    if pre.image_size != config.image.image_size:
        log.warning(
            "checkpoint preprocess image_size=%d differs from the model's image_size=%d; "
            "using the preprocess setting",
            pre.image_size,
            config.image.image_size,
        )
    return pre


def _ontology_for(
    directory: Path,
    info: Mapping[str, Any],
    spec: str | Path | Ontology | None,
    allow_other_ontology: bool,
    store: GraphStore | None,
) -> Ontology:
    from models.ontology_source import load_ontology_spec, ontology_for_checkpoint

    if isinstance(spec, Ontology):
        return spec
    trained = info.get("ontology") or {}
    name, version = str(trained.get("name") or ""), str(trained.get("version") or "")
    try:
        if spec is not None:
            return load_ontology_spec(spec, store)
        found = ontology_for_checkpoint(name, version, store)
        if found is not None:
            return found
        if allow_other_ontology:
            return load_ontology_spec(name or None, store)
    except (KgError, OSError) as e:
        what = spec if spec is not None else name
        raise CheckpointError(f"cannot load ontology {what!r} for {directory}: {e}") from e
    raise CheckpointError(
        f"checkpoint {directory} was trained on ontology {name or '?'}@{version}, which is "
        f"neither in the store nor the bundled graph; load that version with `kgdx ontology "
        f"load FILE --name {name or 'NAME'}`, or name another ontology and allow it "
        "(allow_other_ontology=True, --allow-other-ontology)"
    )


# ---------------------------------------------------------------------------------------------
# Predictor
# ---------------------------------------------------------------------------------------------


class Predictor:
    """A loaded checkpoint ready to score images (see the module docstring).

    Build it with :meth:`load`. Thread-safe for concurrent :meth:`predict` calls (the model
    is read-only in eval mode; attributed calls take turns, see
    :func:`reuse_image_tokens`), though one inference worker per device is the intended use.

    Attributes:
        model: the :class:`KgdxModel`, eval mode, entities cached, on :attr:`device`.
        arrays: the ontology graph the model runs over.
        preprocessor: the deterministic :class:`Preprocess` of the checkpoint.
        names: ``K`` label names of the outputs (dataset columns, e.g. ``Effusion``).
        targets: ``K`` concept ids of the outputs.
        concept_labels: concept id -> preferred label, for every graph node.
        thresholds: decision thresholds by label name saved with the checkpoint, or None.
        excluded: findings held out of training (label -> concept id), for zero-shot.
        info: the checkpoint's ``checkpoint.json``.
        evidence: how :meth:`predict` ranks each finding's evidence concepts:
            ``"attribution"`` (default; :mod:`models.attribution`, the first-order effect of
            removing each concept, one batched backward pass through fusion and decoder) or
            ``"attention"`` (the fusion attention, no backward pass, but no better than
            random concepts at the deletion test). ``--no-kg`` models always use attention.
    """

    def __init__(
        self,
        model: KgdxModel,
        arrays: GraphArrays | None,
        *,
        checkpoint_dir: Path | None = None,
        ontology_name: str = "",
        ontology_version: str = "",
        preprocess: PreprocessConfig | None = None,
        device: torch.device | None = None,
        model_version: str = "",
    ):
        self.model = model.eval()
        self.device = device or next(model.parameters()).device
        self.arrays = arrays
        self.checkpoint_dir = checkpoint_dir
        self.info: dict[str, Any] = dict(model.info)
        config = model.config
        self.preprocessor = Preprocess(
            preprocess or PreprocessConfig(image_size=config.image.image_size), train=False
        )
        self.targets = list(config.targets)
        self.names = label_names_for(self.targets, self.info.get("labels"))
        labels = dict(zip(arrays.node_ids, arrays.node_labels, strict=True)) if arrays else {}
        self.concept_labels: dict[str, str] = labels
        self.thresholds = stored_thresholds(self.info, self.names, self.targets)
        excluded = (self.info.get("extra") or {}).get("excluded_findings") or {}
        #: findings left out of training (label -> concept), scorable zero-shot.
        self.excluded: dict[str, str] = {str(k): str(v) for k, v in dict(excluded).items()}
        self.ontology_name = ontology_name
        self.ontology_version = ontology_version
        self.model_name = str(self.info.get("model_name") or config.name)
        self.model_version = model_version
        self._text_encoder: Any = None
        self._text_lock = threading.Lock()
        self.evidence: str = "attribution"
        self.model.cache_entities()

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        checkpoint_dir: str | Path | None = None,
        ontology: str | Path | Ontology | None = None,
        device: str | torch.device = "auto",
        allow_other_ontology: bool = False,
        *,
        node_features: torch.Tensor | None = None,
        cache_dir: str | Path | None = None,
        store: GraphStore | None = None,
    ) -> Predictor:
        """Load a checkpoint for inference.

        Args:
            checkpoint_dir: checkpoint folder (default: the bundled one,
                :func:`~models.default_checkpoint.default_checkpoint_dir`).
            ontology: the ontology to run over: a spec for :func:`~models.ontology_source.
                load_ontology_spec` (file, ``NAME[@VERSION]`` in the store) or an
                :class:`Ontology`. Default: the exact version the checkpoint names, from
                the store or the bundled graph.
            device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``.
            allow_other_ontology: use another ontology version than the training one (a
                warning says so; concept features are recomputed for it).
            node_features: precomputed concept features of the ontology's nodes (tests);
                default: from the feature cache, computed with the checkpoint's text encoder
                when missing.
            cache_dir: concept feature cache folder (default ``$KGDX_HOME/features``).
            store: the ontology store (default ``GraphStore()``).

        Raises:
            CheckpointError: no checkpoint, another ontology version (unless allowed), an
                ontology that cannot be found, weights that do not fit.
        """
        directory = resolve_checkpoint_dir(checkpoint_dir)
        info = read_checkpoint_info(directory)
        try:
            config = KgdxModelConfig.from_dict(info["config"])
        except (KeyError, ConfigError, TypeError) as e:
            raise CheckpointError(f"{directory}: bad config in checkpoint.json: {e}") from e
        dev = pick_device(device)
        onto = _ontology_for(directory, info, ontology, allow_other_ontology, store)
        arrays = to_arrays(onto)
        version = onto.content_hash()
        model = load_checkpoint(
            directory,
            arrays,
            version,
            allow_other_ontology,
            node_features=node_features,
            cache_dir=cache_dir,
            device=dev,
        )
        return cls(
            model,
            arrays,
            checkpoint_dir=directory,
            ontology_name=onto.name,
            ontology_version=version,
            preprocess=preprocess_config_for(info, config),
            device=dev,
            model_version=f"{directory.name}-{weights_digest(directory)}",
        )

    # -- metadata ---------------------------------------------------------------------------

    @property
    def config(self) -> KgdxModelConfig:
        return self.model.config

    @property
    def image_size(self) -> int:
        return self.preprocessor.size

    def describe(self) -> dict[str, Any]:
        """Model and ontology identity for every response and report."""
        return {
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "checkpoint": str(self.checkpoint_dir) if self.checkpoint_dir else None,
                "use_kg": self.config.use_kg,
                "backbone": self.config.image.backbone,
                "image_size": self.image_size,
                "findings": dict(zip(self.names, self.targets, strict=True)),
            },
            "ontology": {"name": self.ontology_name, "version": self.ontology_version},
        }

    # -- stages -----------------------------------------------------------------------------

    def preprocess(
        self, images: Sequence[np.ndarray | torch.Tensor]
    ) -> tuple[torch.Tensor, list[Geometry]]:
        """Decoded grayscale images in [0, 1] -> the model's input batch and geometries.

        Shapes:
            images: ``B`` arrays ``(H, W)`` float32 in [0, 1] (sizes may differ);
            returns ``(B, 1, S, S)`` float32 on the CPU and ``B`` :class:`Geometry`.

        Raises:
            DataError: no images, a non-2-D image, NaN or infinite pixels, values outside
                [0, 1].
        """
        return preprocess_images(self.preprocessor, images)

    def text_tokens(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clinical text -> token embeddings and mask for :meth:`predict`.

        Texts that are None or blank give an all-padding row (the image alone decides).

        Shapes:
            returns ``(B, L, text_dim)`` float32 and ``(B, L)`` bool on :attr:`device`.

        Raises:
            ModelError: the text encoder's width is not the model's ``text_dim``.
        """
        encoder = self._encoder()
        given = [t.strip() if isinstance(t, str) else "" for t in texts]
        tokens, mask = encoder.token_embeddings([t or "." for t in given])
        for i, t in enumerate(given):
            if not t:
                mask[i] = False
        return tokens.to(self.device), mask.to(self.device)

    def _encoder(self) -> Any:
        from models.text_encoder import TextEncoder

        with self._text_lock:
            if self._text_encoder is None:
                encoder = TextEncoder(self.config.text, device=self.device)
                if encoder.hidden_size != self.config.text_dim:
                    raise ModelError(
                        f"clinical text needs a text encoder of width text_dim="
                        f"{self.config.text_dim}; {encoder.encoder_id} gives "
                        f"{encoder.hidden_size}"
                    )
                self._text_encoder = encoder
            return self._text_encoder

    def predict(
        self,
        batch: torch.Tensor,
        texts: Sequence[str | None] | None = None,
        entity_mask: torch.Tensor | None = None,
        *,
        evidence: str | None = None,
    ) -> KgdxOutput:
        """Score the trained findings of a preprocessed batch.

        With ``evidence = "attribution"`` (the default, :mod:`models.attribution`) the image
        encoder runs without gradients and fusion and decoder once more backwards, in
        float32; with ``"attention"`` (or an ``entity_mask``) everything runs under
        ``torch.inference_mode()``, with autocast on CUDA. The output's tensors come back
        float32 on the CPU.

        Args:
            batch: ``(B, 1, S, S)`` from :meth:`preprocess`.
            texts: optional clinical text per image (None entries: no text).
            entity_mask: optional ``(N,)`` or ``(B, N)`` bool, ``True`` hides an entity
                from the fusion (the output then ranks evidence by attention).
            evidence: ``"attribution"`` or ``"attention"`` for this call (default:
                :attr:`evidence`).
        """
        self._check_batch(batch)
        if texts is not None and len(texts) != batch.shape[0]:
            raise DataError(f"texts has {len(texts)} entries for {batch.shape[0]} images")
        method = self.evidence if evidence is None else evidence
        if method not in EVIDENCE_METHODS:
            raise ModelError(f"evidence must be one of {list(EVIDENCE_METHODS)}, got {method!r}")
        with torch.no_grad():  # ordinary tensors: the attribution's backward pass reads them
            x = batch.to(self.device, non_blocking=True)
            tokens = mask = None
            if texts is not None and any(isinstance(t, str) and t.strip() for t in texts):
                tokens, mask = self.text_tokens(texts)
        if entity_mask is None and method == "attribution" and self.model.gnn is not None:
            # autograd on, no autocast: in half precision small gradients round to zero and
            # the ranking loses its order
            return output_to_cpu(attributed_forward(self.model, x, tokens, mask))
        with torch.inference_mode():
            if entity_mask is not None:
                entity_mask = entity_mask.to(self.device)
            with amp_context(self.device):
                out = self.model(x, tokens, mask, entity_mask=entity_mask)
        return output_to_cpu(out)

    def _check_batch(self, batch: torch.Tensor) -> None:
        s = self.image_size
        if batch.dim() != 4 or tuple(batch.shape[1:]) != (1, s, s):
            raise DataError(
                f"batch must have shape (B, 1, {s}, {s}) (see preprocess()), got "
                f"{tuple(batch.shape)}"
            )

    def explain(
        self,
        output: KgdxOutput,
        geometries: Sequence[Geometry | None] | None = None,
        *,
        top_k: int = DEFAULT_TOP_K,
        findings: Sequence[int] | None = None,
        image_ids: Sequence[str] | None = None,
    ) -> list[ImageExplanation]:
        """Heat maps and ranked evidence per image and finding (see :mod:`models.explain`).

        Args:
            output: from :meth:`predict`.
            geometries: from :meth:`preprocess`, for original-image coordinates.
            top_k: evidence concepts per finding (default 5).
            findings: output columns to explain (default all).
            image_ids: names of the images.
        """
        names = self.names if output.concept_ids == self.targets else None
        thresholds: list[float | None] | None = None
        if names is not None and self.thresholds is not None:
            thresholds = [self.thresholds[n] for n in names]
        return explain_output(
            output,
            self.concept_labels,
            names=names,
            geometries=geometries,
            top_k=top_k,
            findings=findings,
            thresholds=thresholds,
            target_ids=self.targets,
            image_ids=image_ids,
        )

    def deletion_test(
        self,
        batch: torch.Tensor,
        output: KgdxOutput,
        pairs: Sequence[tuple[int, int]] | None = None,
        config: Any = None,
    ) -> list[Any]:
        """Faithfulness of the evidence on this batch (see :mod:`models.faithfulness`).

        Args:
            batch, output: from :meth:`preprocess` and :meth:`predict`.
            pairs: ``(image, finding column)`` to test; default: the predicted positives
                at the checkpoint's thresholds (0.5 without them).
            config: a :class:`~models.faithfulness.DeletionConfig`.

        Returns:
            one :class:`~models.faithfulness.DeletionRecord` per pair.
        """
        from models.faithfulness import deletion_test, positive_pairs

        self._check_batch(batch)
        if pairs is None:
            thresholds = (
                [self.thresholds[n] for n in self.names] if self.thresholds is not None else 0.5
            )
            pairs = positive_pairs(output.probabilities, thresholds=thresholds)
        return deletion_test(self.model, batch, output, pairs, config)

    def run(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        texts: Sequence[str | None] | None = None,
        *,
        top_k: int = DEFAULT_TOP_K,
        image_ids: Sequence[str] | None = None,
    ) -> list[ImageExplanation]:
        """``preprocess -> predict -> explain`` in one call."""
        batch, geometries = self.preprocess(images)
        output = self.predict(batch, texts)
        return self.explain(output, geometries, top_k=top_k, image_ids=image_ids)


# ---------------------------------------------------------------------------------------------
# Zero-shot
# ---------------------------------------------------------------------------------------------


def zero_shot_scores(
    predictor: Predictor,
    images: torch.Tensor | Sequence[np.ndarray | torch.Tensor],
    concept_ids: Sequence[str],
    *,
    with_targets: bool = True,
) -> np.ndarray:
    """Probabilities of graph concepts that need not be training targets (zero-shot).

    Each concept is scored from its GNN entity embedding as a decoder query. With
    ``with_targets`` (default) it is asked together with the trained targets, one concept
    at a time, as the decoder saw queries in training (its queries attend to each other);
    otherwise all ``concept_ids`` are asked at once without the targets. The image encoder
    runs once per batch either way.

    Args:
        predictor: a loaded :class:`Predictor` (not the ``--no-kg`` ablation).
        images: a preprocessed ``(B, 1, S, S)`` batch, or decoded images for
            :meth:`Predictor.preprocess`.
        concept_ids: concepts of the graph to score (trained targets allowed).

    Returns:
        ``(B, C)`` float32 probabilities, column ``c`` for ``concept_ids[c]``.

    Raises:
        ModelError: the ablation (it has no graph); UnknownConceptError for ids not in the
            model's graph.
    """
    if not concept_ids:
        raise ValueError("concept_ids must name at least one concept")
    model = predictor.model
    if model.gnn is None:
        raise ModelError(
            "zero-shot scoring needs the knowledge graph; this model is the --no-kg ablation"
        )
    wanted = model.concept_indices(list(concept_ids))
    if isinstance(images, torch.Tensor):
        batch = images
        predictor._check_batch(batch)
    else:
        batch, _ = predictor.preprocess(images)
    target_nodes = model.target_nodes.tolist()
    out = np.zeros((batch.shape[0], len(wanted)), dtype=np.float32)
    with torch.inference_mode():
        x = batch.to(predictor.device)
        with reuse_image_tokens(model, x) as rows, amp_context(predictor.device):
            if not with_targets:
                probs = model.score_concepts(rows(None), wanted).probabilities
                out[:] = probs.float().cpu().numpy()
                return out
            for c, node in enumerate(wanted):
                if node in target_nodes:
                    nodes, col = target_nodes, target_nodes.index(node)
                else:
                    nodes, col = [*target_nodes, node], len(target_nodes)
                probs = model.score_concepts(rows(None), nodes).probabilities
                out[:, c] = probs[:, col].float().cpu().numpy()
    return out
