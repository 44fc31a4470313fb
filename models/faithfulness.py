"""Faithfulness of the evidence: the deletion test.

For a positive finding on an image (label 1, or predicted positive when there are no
labels), its top-``k`` evidence concepts (ranked as explanations rank them: by the
attribution of :mod:`models.attribution` when the output carries it, else by
``entity_relevance``; see :mod:`models.explain`) are hidden from the knowledge fusion
through the model's ``entity_mask`` (masked entities are removed from the fusion's attention
keys), and the drop of the finding's probability is measured. The same is done for ``k``
concepts drawn at random, ``random_draws`` times. The finding's own concept is excluded from
both: it is the decoder's query and is never what the evidence claims to add. If the
evidence is what the model used, its drop is much larger than a random one:

``ratio = mean evidence drop / max(mean random drop, min_drop)``

over the tested (image, finding) pairs, per finding and overall, with a percentile bootstrap
CI over pairs. Drops are signed (masking may raise a probability). The floor ``min_drop``
(default 0.001, a tenth of a percentage point) keeps the ratio finite when random masks
change nothing, which happens with large graphs; the report says when it applied
(``random_floored``), and the ratio is then a conservative value (random drop rounded up).

Random draws use a generator seeded by ``(seed, image key, finding)``, so a pair's draws do
not depend on batching or on which other pairs are tested. The image encoder runs once per
batch (:func:`~models.inference.reuse_image_tokens`); only fusion and decoder run per mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.explain import rank_evidence
from models.model import KgdxModel
from models.outputs import KgdxOutput

_ROUND = 6


@dataclass
class DeletionConfig:
    """Settings of the deletion test.

    Args:
        k: evidence concepts masked per finding (default 5).
        random_draws: random masks of ``k`` concepts per finding (default 5).
        seed: seed of the random masks and of the bootstrap (default 0).
        n_boot: bootstrap resamples for the ratio's CI (default 1000; 0 skips the CI).
        ci: confidence level (default 0.95).
        min_drop: floor of the mean random drop in the ratio's denominator (default 1e-3).
        batch_size: masked image rows per forward pass (default 64).
    """

    k: int = 5  # evidence concepts masked
    random_draws: int = 5  # random masks per pair
    seed: int = 0  # random masks and bootstrap
    n_boot: int = 1000  # bootstrap resamples (0: no CI)
    ci: float = 0.95  # confidence level
    min_drop: float = 1e-3  # floor of the random drop in the ratio
    batch_size: int = 64  # masked rows per forward

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.random_draws < 1:
            raise ValueError(f"random_draws must be >= 1, got {self.random_draws}")
        if self.n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {self.n_boot}")
        if not 0 < self.ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}")
        if not self.min_drop > 0:
            raise ValueError(f"min_drop must be > 0, got {self.min_drop}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class DeletionRecord:
    """The deletion test of one finding on one image.

    Attributes:
        image: the image's key (its index in the evaluated data).
        finding: the finding's column in the model output.
        probability: the finding's probability with nothing masked.
        evidence: entity indices masked as evidence (most relevant first).
        evidence_drop: probability minus the probability with ``evidence`` masked.
        random_drops: the same for each random draw of as many concepts.
    """

    image: int
    finding: int
    probability: float
    evidence: list[int]
    evidence_drop: float
    random_drops: list[float]

    @property
    def random_drop(self) -> float:
        """Mean drop over the random draws."""
        return float(np.mean(self.random_drops))

    def ratio(self, min_drop: float = DeletionConfig.min_drop) -> float:
        """``evidence_drop / max(random_drop, min_drop)`` of this pair alone."""
        return self.evidence_drop / max(self.random_drop, min_drop)

    def to_dict(
        self, entity_ids: Sequence[str] | None = None, min_drop: float = DeletionConfig.min_drop
    ) -> dict[str, Any]:
        out = asdict(self)
        if entity_ids is not None:
            out["evidence"] = [entity_ids[e] for e in self.evidence]
        out["random_drop"] = self.random_drop
        out["ratio"] = self.ratio(min_drop)
        return out


def positive_pairs(
    probabilities: np.ndarray | torch.Tensor,
    labels: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    thresholds: Sequence[float] | float = 0.5,
) -> list[tuple[int, int]]:
    """``(image, finding)`` positions to test: known positive labels when ``labels`` are
    given, else predictions at or above ``thresholds`` (one per finding, or one for all).

    Shapes:
        probabilities, labels, mask: ``(B, K)``.
    """
    p = np.asarray(
        probabilities.detach().cpu().numpy()
        if isinstance(probabilities, torch.Tensor)
        else probabilities,
        dtype=np.float64,
    )
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (B, K), got shape {p.shape}")
    if labels is not None:
        y = np.asarray(labels, dtype=np.float64)
        m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64)
        if y.shape != p.shape or m.shape != p.shape:
            raise ValueError(
                f"labels and mask must match probabilities {p.shape}, got {y.shape}, {m.shape}"
            )
        chosen = (y > 0) & (m > 0)
    else:
        t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (p.shape[1],))
        chosen = p >= t[None, :]
    rows, cols = np.nonzero(chosen)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def _generator(seed: int, image: int, finding: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(image), int(finding)]))


def random_masks(
    num_entities: int,
    own: int,
    k: int,
    draws: int,
    seed: int,
    image: int,
    finding: int,
) -> list[list[int]]:
    """``draws`` sets of ``k`` distinct entity indices, never ``own``, reproducible from
    ``(seed, image, finding)``."""
    pool = np.array([i for i in range(num_entities) if i != own], dtype=np.int64)
    k = min(k, pool.size)
    rng = _generator(seed, image, finding)
    return [sorted(rng.choice(pool, size=k, replace=False).tolist()) for _ in range(draws)]


def deletion_test(
    model: KgdxModel,
    batch: torch.Tensor,
    output: KgdxOutput,
    pairs: Sequence[tuple[int, int]],
    config: DeletionConfig | None = None,
    image_keys: Sequence[int] | None = None,
) -> list[DeletionRecord]:
    """Run the deletion test for ``pairs`` of one batch.

    Args:
        model: the model (eval mode; entities cached or not).
        batch: the ``(B, 1, S, S)`` preprocessed images ``output`` was computed from.
        output: the model's output on ``batch`` (all targets, in order); its
            :meth:`~models.outputs.KgdxOutput.evidence_scores` rank the evidence, as
            explanations rank it.
        pairs: ``(image position in batch, finding column)`` to test.
        config: :class:`DeletionConfig`.
        image_keys: per batch position, the key that seeds the random draws (default: the
            position); pass global indices so draws do not depend on batching.

    Returns:
        one :class:`DeletionRecord` per pair, in order.
    """
    from models.inference import amp_context, reuse_image_tokens

    config = config or DeletionConfig()
    if not pairs:
        return []
    b, k_out = output.probabilities.shape
    if batch.shape[0] != b:
        raise ValueError(f"batch has {batch.shape[0]} images, output {b}")
    if output.concept_ids != list(model.config.targets):
        raise ValueError("output must score all of the model's targets, in order")
    keys = list(range(b)) if image_keys is None else [int(i) for i in image_keys]
    if len(keys) != b:
        raise ValueError(f"image_keys has {len(keys)} entries for {b} images")
    n = model.num_entities
    if n < 2:
        raise ValueError("the deletion test needs at least two entities")
    own = model.concept_indices(output.concept_ids)  # (K,) entity index of each finding
    kk = min(config.k, n - 1)
    rel = output.evidence_scores().detach().float().cpu()  # (B, K, N), as explanations rank

    # one row per masked forward: (pair number, image position, finding, entities masked)
    rows: list[tuple[int, int, int, list[int]]] = []
    evidence: list[list[int]] = []
    for j, (i, c) in enumerate(pairs):
        if not (0 <= i < b and 0 <= c < k_out):
            raise ValueError(f"pair {(i, c)} is outside the batch ({b} images, {k_out} findings)")
        ev = rank_evidence(rel[i, c], kk, exclude=[own[c]])[0].tolist()
        evidence.append(ev)
        rows.append((j, i, c, ev))
        for draw in random_masks(n, own[c], kk, config.random_draws, config.seed, keys[i], c):
            rows.append((j, i, c, draw))

    device = next(model.parameters()).device
    masked = np.empty(len(rows), dtype=np.float64)
    with torch.inference_mode():
        x = batch.to(device)
        with reuse_image_tokens(model, x) as take, amp_context(device):
            base = model(take(None)).probabilities.float().cpu().numpy()  # (B, K)
            for start in range(0, len(rows), config.batch_size):
                chunk = rows[start : start + config.batch_size]
                images = [r[1] for r in chunk]
                mask = torch.zeros(len(chunk), n, dtype=torch.bool)
                for m, r in enumerate(chunk):
                    mask[m, r[3]] = True
                probs = model(take(images), entity_mask=mask.to(device)).probabilities
                cols = torch.tensor([r[2] for r in chunk], device=probs.device)
                picked = probs.float().gather(1, cols[:, None])[:, 0]
                masked[start : start + len(chunk)] = picked.cpu().numpy()

    out: list[DeletionRecord] = []
    pos = 0
    for j, (i, c) in enumerate(pairs):
        p0 = float(base[i, c])
        drops = p0 - masked[pos : pos + 1 + config.random_draws]
        pos += 1 + config.random_draws
        out.append(
            DeletionRecord(
                image=keys[i],
                finding=c,
                probability=p0,
                evidence=evidence[j],
                evidence_drop=float(drops[0]),
                random_drops=[float(d) for d in drops[1:]],
            )
        )
    return out


def _ratio(evidence: np.ndarray, random: np.ndarray, floor: float) -> np.ndarray:
    """Ratio of means along the last axis, the denominator floored."""
    return evidence.mean(-1) / np.maximum(random.mean(-1), floor)


def _summary(
    records: Sequence[DeletionRecord], config: DeletionConfig, rng: np.random.Generator
) -> dict[str, Any]:
    n = len(records)
    if n == 0:
        return {
            "n_pairs": 0,
            "evidence_drop": None,
            "random_drop": None,
            "ratio": None,
            "ratio_ci": [None, None],
            "random_floored": None,
            "evidence_beats_random": None,
        }
    ev = np.array([r.evidence_drop for r in records])
    rd = np.array([r.random_drop for r in records])
    ratio = float(_ratio(ev, rd, config.min_drop))
    lo = hi = None
    if config.n_boot and n > 1:
        draws = rng.integers(0, n, size=(config.n_boot, n))
        boots = _ratio(ev[draws], rd[draws], config.min_drop)
        alpha = (1 - config.ci) / 2
        lo, hi = (float(v) for v in np.quantile(boots, [alpha, 1 - alpha]))
    return {
        "n_pairs": n,
        "evidence_drop": round(float(ev.mean()), _ROUND),
        "random_drop": round(float(rd.mean()), _ROUND),
        "ratio": _finite(ratio),
        "ratio_ci": [_finite(lo), _finite(hi)],
        "random_floored": bool(rd.mean() < config.min_drop),
        "ratio_unfloored": _finite(float(ev.mean() / rd.mean())) if rd.mean() > 0 else None,
        "evidence_beats_random": round(float((ev > rd).mean()), _ROUND),
    }


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, _ROUND)


def summarise_deletion(
    records: Sequence[DeletionRecord],
    names: Sequence[str],
    config: DeletionConfig | None = None,
) -> dict[str, Any]:
    """The ``faithfulness`` section of ``report.json``.

    Returns:
        ``{"k", "random_draws", "seed", "min_drop", "n_boot", "ci", "overall": {...},
        "per_finding": {name: {...}}}`` where each ``{...}`` is ``{"n_pairs",
        "evidence_drop", "random_drop", "ratio", "ratio_ci": [lo, hi], "random_floored",
        "ratio_unfloored", "evidence_beats_random"}``: ``ratio_unfloored`` is the plain ratio
        of means (None when the random drop is not positive), ``evidence_beats_random`` the
        share of pairs whose evidence drop beats their mean random drop. Findings without a
        tested pair are left out.
    """
    config = config or DeletionConfig()
    rng = np.random.default_rng(config.seed)
    per: dict[str, Any] = {}
    for c, name in enumerate(names):
        chosen = [r for r in records if r.finding == c]
        if chosen:
            per[name] = _summary(chosen, config, rng)
    return {
        "k": config.k,
        "random_draws": config.random_draws,
        "seed": config.seed,
        "min_drop": config.min_drop,
        "n_boot": config.n_boot,
        "ci": config.ci,
        "overall": _summary(records, config, rng),
        "per_finding": per,
    }
