"""Explanation tensors for the service: per image and finding, a heat map and ranked evidence.

Built from one :class:`~models.outputs.KgdxOutput` without running the model again:

- **probability** of the finding (``sigmoid`` of its logit);
- **heat map**: the finding query's attention over the image patches (last decoder layer,
  heads averaged), a ``rows x cols`` grid spanning the square model input, min-max
  normalised to [0, 1] (a flat map becomes all zeros: it points nowhere). With the image's
  :class:`~models.transforms.Geometry` it maps back to the original pixels:
  :attr:`Heatmap.extent` says where the grid lies on the original image, and
  :meth:`Heatmap.on_original` samples it at every original pixel;
- **evidence**: the ``top_k`` concepts of the graph ranked by what the finding's score rests
  on. When the output carries the attribution (:mod:`models.attribution`, what
  :class:`~models.inference.Predictor` computes by default) concepts rank by the logit the
  finding would lose, to first order, without them, and *relevance* is each concept's share
  of the positive attribution; otherwise by *relevance* as the attention gives it, the
  finding -> token attention composed with the token -> entity attention of the knowledge
  fusion. Either way a share: a finding's relevances sum to 1 (or 0) over all entities. With
  the attribution, concepts whose removal would not lower the logit are left out (a finding
  may then list fewer than ``top_k``). The
  finding's own concept is kept when it ranks (it often does: tokens attend to the concept
  they resemble) but flagged ``is_self``, so a caller can drop it; other trained targets are
  flagged ``is_target``. The faithfulness test (:mod:`models.faithfulness`) masks the
  evidence *without* the own concept, since the finding's query is its own concept and
  cannot be masked.

Path search is not done here: the service hands the evidence, as a ``{concept_id:
relevance}`` mapping (:meth:`FindingExplanation.relevance_map`), to :class:`kg.paths.
PathFinder`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.outputs import KgdxOutput
from models.transforms import Geometry

#: Evidence concepts per finding unless asked otherwise.
DEFAULT_TOP_K = 5
#: Decimals kept in JSON (heat-map values and relevances).
DECIMALS = 5


@dataclass
class Evidence:
    """One concept that informed a finding.

    Attributes:
        concept_id: the concept's id in the ontology.
        label: its preferred label.
        relevance: its share of the finding's evidence, in [0, 1]: of the positive
            attribution when the output carries it, else of the finding's attention through
            the fused tokens.
        is_self: the finding's own concept.
        is_target: one of the model's trained findings (the own concept included).
    """

    concept_id: str
    label: str
    relevance: float
    is_self: bool = False
    is_target: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept_id": self.concept_id,
            "label": self.label,
            "relevance": round(self.relevance, DECIMALS),
            "is_self": self.is_self,
            "is_target": self.is_target,
        }


@dataclass
class Heatmap:
    """A finding's attention over the image patches.

    Attributes:
        values: ``(rows, cols)`` float32 in [0, 1], row-major, spanning the square model
            input (the letterbox padding included).
        peak: ``(row, col)`` of the highest cell (first in row-major order on ties).
        max_attention: the largest raw patch attention (each map's raw values sum to 1), so
            ``1 / (rows * cols)`` means uniform, 1 means all on one patch.
        geometry: where the original image sits in the model input (None when unknown).
    """

    values: np.ndarray
    peak: tuple[int, int]
    max_attention: float
    geometry: Geometry | None = None

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def cols(self) -> int:
        return int(self.values.shape[1])

    @property
    def extent(self) -> tuple[float, float, float, float] | None:
        """``(x0, y0, x1, y1)``: the whole grid in original-image pixel coordinates.

        Draw the ``rows x cols`` grid stretched over this rectangle (it reaches past the
        image where the model input was padded) and clip it to the image.
        """
        if self.geometry is None:
            return None
        x0, y0 = self.geometry.to_original(0.0, 0.0)
        x1, y1 = self.geometry.to_original(float(self.geometry.size), float(self.geometry.size))
        return x0, y0, x1, y1

    def peak_original(self) -> tuple[float, float] | None:
        """Centre of the peak cell as an original-image point ``(x, y)``."""
        if self.geometry is None:
            return None
        return self.geometry.cell_to_original(*self.peak, (self.rows, self.cols))

    def on_original(self) -> np.ndarray:
        """The map sampled bilinearly at every original pixel centre.

        Shapes:
            returns ``(orig_height, orig_width)`` float32 in [0, 1].
        """
        if self.geometry is None:
            raise ValueError("this heat map has no geometry; pass geometries to explain()")
        return heatmap_on_original(self.values, self.geometry)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows,
            "cols": self.cols,
            "values": np.round(self.values.astype(np.float64), DECIMALS).tolist(),
            "peak": list(self.peak),
            "max_attention": round(self.max_attention, DECIMALS),
        }
        extent = self.extent
        if extent is not None:
            out["extent"] = [round(v, 3) for v in extent]
            peak = self.peak_original()
            assert peak is not None
            out["peak_original"] = [round(v, 3) for v in peak]
        return out


@dataclass
class FindingExplanation:
    """One finding on one image.

    Attributes:
        name: the finding's label name (the dataset column, e.g. ``Effusion``).
        concept_id: its concept in the ontology.
        label: the concept's preferred label.
        probability: the model's probability.
        heatmap: :class:`Heatmap`.
        evidence: up to ``top_k`` :class:`Evidence`, most relevant first.
        threshold: the decision threshold, when known.
    """

    name: str
    concept_id: str
    label: str
    probability: float
    heatmap: Heatmap
    evidence: list[Evidence]
    threshold: float | None = None

    @property
    def positive(self) -> bool | None:
        """``probability >= threshold`` (None without a threshold)."""
        return None if self.threshold is None else self.probability >= self.threshold

    def relevance_map(self, include_self: bool = False) -> dict[str, float]:
        """``{concept_id: relevance}`` of the evidence, for :class:`kg.paths.PathFinder`."""
        return {e.concept_id: e.relevance for e in self.evidence if include_self or not e.is_self}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "concept_id": self.concept_id,
            "label": self.label,
            "probability": round(self.probability, 6),
            "threshold": self.threshold,
            "positive": self.positive,
            "heatmap": self.heatmap.to_dict(),
            "evidence": [e.to_dict() for e in self.evidence],
        }


@dataclass
class ImageExplanation:
    """Every explained finding of one image.

    Attributes:
        index: the image's position in the batch.
        grid: ``(rows, cols)`` of the heat maps.
        geometry: the image's letterbox :class:`Geometry` (None when unknown).
        findings: one :class:`FindingExplanation` per explained finding, in output order.
        image_id: the caller's name for the image, if given.
    """

    index: int
    grid: tuple[int, int]
    geometry: Geometry | None
    findings: list[FindingExplanation] = field(default_factory=list)
    image_id: str | None = None

    def finding(self, name: str) -> FindingExplanation:
        """The explanation of finding ``name`` (label name or concept id)."""
        for f in self.findings:
            if name in (f.name, f.concept_id):
                return f
        raise KeyError(f"no finding {name!r}; explained: {[f.name for f in self.findings]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "image_id": self.image_id,
            "grid": list(self.grid),
            "geometry": None if self.geometry is None else self.geometry.as_dict(),
            "findings": [f.to_dict() for f in self.findings],
        }


def normalise_heatmap(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Min-max normalise a map to [0, 1]; a flat map becomes zeros.

    Shapes:
        ``(..., rows, cols)`` -> the same shape, float32, normalised per map.
    """
    v = values.detach().float().cpu().numpy() if isinstance(values, torch.Tensor) else values
    v = np.asarray(v, dtype=np.float32)
    if v.ndim < 2:
        raise ValueError(f"heat maps must be at least 2-D (rows, cols), got shape {v.shape}")
    lo = v.min(axis=(-2, -1), keepdims=True)
    span = v.max(axis=(-2, -1), keepdims=True) - lo
    safe = np.where(span > 0, span, 1.0)
    out: np.ndarray = np.where(span > 0, (v - lo) / safe, 0.0).astype(np.float32)
    return out


def heatmap_on_original(values: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Sample a model-input heat map at the centre of every original-image pixel.

    The grid spans the ``S x S`` model input evenly; an original pixel centre ``(j + 0.5,
    i + 0.5)`` goes to the model input through ``geometry`` and is read bilinearly (the
    same sampling as upsampling the map with ``align_corners=False``, then undoing the
    letterbox).

    Shapes:
        values ``(rows, cols)`` -> ``(orig_height, orig_width)`` float32.
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float32))
    if v.ndim != 2:
        raise ValueError(f"values must be (rows, cols), got shape {tuple(v.shape)}")
    g = geometry
    xs = (torch.arange(g.orig_width, dtype=torch.float64) + 0.5) * g.scale_x + g.pad_left
    ys = (torch.arange(g.orig_height, dtype=torch.float64) + 0.5) * g.scale_y + g.pad_top
    # grid_sample's normalised coordinates: -1 / +1 are the outer edges of the map
    nx = (xs / g.size * 2 - 1).float()
    ny = (ys / g.size * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(ny, nx, indexing="ij")[::-1], dim=-1)  # (H, W, 2) as x, y
    out = F.grid_sample(
        v[None, None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, 0].numpy()


def rank_evidence(
    relevance: torch.Tensor,
    top_k: int,
    exclude: Sequence[int] | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and values of the ``top_k`` most relevant entities per row.

    Ties keep the lower entity index first. ``exclude`` entity indices (per call, or a
    ``(..., )``-broadcastable bool mask of shape ``(..., N)``) never rank.

    Shapes:
        relevance ``(..., N)`` -> indices, values ``(..., min(top_k, N - excluded))``.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    rel = relevance.detach().float()
    n = rel.shape[-1]
    if exclude is not None:
        ex = torch.as_tensor(exclude, device=rel.device)
        if ex.dtype != torch.bool:
            mask = torch.zeros(n, dtype=torch.bool, device=rel.device)
            mask[ex.long()] = True
            ex = mask
        rel = rel.masked_fill(ex, float("-inf"))
        n_ok = int((~ex).sum(-1).min()) if ex.numel() else n
    else:
        n_ok = n
    k = min(top_k, n_ok)
    # a stable sort on the negated values keeps the lower index first among ties
    order = torch.sort(-rel, dim=-1, stable=True).indices[..., :k]
    return order, relevance.detach().float().gather(-1, order)


def explain_output(
    output: KgdxOutput,
    concept_labels: Mapping[str, str],
    *,
    names: Sequence[str] | None = None,
    geometries: Sequence[Geometry | None] | None = None,
    top_k: int = DEFAULT_TOP_K,
    findings: Sequence[int] | None = None,
    thresholds: Sequence[float | None] | None = None,
    target_ids: Sequence[str] | None = None,
    image_ids: Sequence[str] | None = None,
) -> list[ImageExplanation]:
    """Explanations of every image in ``output``.

    Args:
        output: a model output (``B`` images, ``K`` findings, ``N`` entities).
        concept_labels: concept id -> preferred label (ids missing here show their id).
        names: ``K`` finding names for ``output.concept_ids`` (default: the concept ids).
        geometries: ``B`` letterbox geometries (see :meth:`Predictor.preprocess
            <models.inference.Predictor.preprocess>`), for original-image coordinates.
        top_k: evidence concepts per finding (default 5).
        findings: column positions of ``output`` to explain (default all).
        thresholds: ``K`` decision thresholds (None entries allowed).
        target_ids: the model's trained targets, flagged ``is_target`` in the evidence
            (default: ``output.concept_ids``).
        image_ids: ``B`` names of the images.
    """
    b, k = output.probabilities.shape
    n = len(output.entity_ids)
    names = list(names) if names is not None else list(output.concept_ids)
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries for {k} findings")
    for what, seq in (("geometries", geometries), ("image_ids", image_ids)):
        if seq is not None and len(seq) != b:
            raise ValueError(f"{what} has {len(seq)} entries for {b} images")
    if thresholds is not None and len(thresholds) != k:
        raise ValueError(f"thresholds has {len(thresholds)} entries for {k} findings")
    cols = list(range(k)) if findings is None else list(findings)
    bad = [c for c in cols if not 0 <= c < k]
    if bad:
        raise ValueError(f"findings holds positions outside [0, {k}): {bad}")
    targets = set(target_ids if target_ids is not None else output.concept_ids)
    entity_pos = {cid: i for i, cid in enumerate(output.entity_ids)}

    probs = output.probabilities.detach().float().cpu()
    maps = output.heatmaps().detach().float().cpu()  # (B, K, rows, cols)
    norm = normalise_heatmap(maps)
    flat = maps.flatten(2)  # (B, K, P)
    peak_idx = flat.argmax(-1)  # (B, K): first maximum in row-major order
    max_att = flat.max(-1).values
    rel = output.entity_relevance.detach().float().cpu()  # (B, K, N)
    scores = output.evidence_scores().detach().float().cpu()  # the attribution when computed
    idx, ranked = rank_evidence(scores, min(top_k, n))
    vals = rel.gather(-1, idx)
    # with the attribution, a concept whose removal would not lower the logit is no evidence
    keep = ranked > 0 if output.entity_attribution is not None else torch.ones_like(idx).bool()
    rows, grid_cols = output.grid

    out: list[ImageExplanation] = []
    for i in range(b):
        geo = geometries[i] if geometries is not None else None
        image = ImageExplanation(
            index=i,
            grid=output.grid,
            geometry=geo,
            image_id=image_ids[i] if image_ids is not None else None,
        )
        for c in cols:
            cid = output.concept_ids[c]
            own = entity_pos.get(cid, -1)
            evidence = [
                Evidence(
                    concept_id=output.entity_ids[e],
                    label=concept_labels.get(output.entity_ids[e], output.entity_ids[e]),
                    relevance=float(v),
                    is_self=e == own,
                    is_target=output.entity_ids[e] in targets,
                )
                for e, v, kept in zip(
                    idx[i, c].tolist(), vals[i, c].tolist(), keep[i, c].tolist(), strict=True
                )
                if kept
            ]
            p = int(peak_idx[i, c])
            thr = thresholds[c] if thresholds is not None else None
            image.findings.append(
                FindingExplanation(
                    name=names[c],
                    concept_id=cid,
                    label=concept_labels.get(cid, cid),
                    probability=float(probs[i, c]),
                    heatmap=Heatmap(
                        values=norm[i, c],
                        peak=(p // grid_cols, p % grid_cols),
                        max_attention=float(max_att[i, c]),
                        geometry=geo,
                    ),
                    evidence=evidence,
                    threshold=None if thr is None else float(thr),
                )
            )
        assert rows * grid_cols == flat.shape[-1]
        out.append(image)
    return out
