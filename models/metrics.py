"""Multi-label classification metrics with masked (unknown) labels and bootstrap CIs.

Inputs everywhere: ``probs (N, K)`` in [0, 1], ``labels (N, K)`` 0/1, ``mask (N, K)`` (1 =
label known; None = all known), ``names`` (K strings). A finding's metrics use only the rows
where its label is known.

Confidence intervals are percentile bootstraps over images: each resample draws N images
with replacement, once, and every finding (and every compared model) uses that same draw
restricted to its known rows, so the macro AUROC's CI and the paired difference between two
models account for the correlation between findings and between models. AUROC on a
resample is computed exactly with the draw's multiplicities as weights (a rank formula, ties
count one half), vectorised over resamples; it equals ``sklearn.metrics.roc_auc_score`` on
the materialised resample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

#: Findings need this many positives to count in the macro AUROC.
MIN_POSITIVES = 5
#: Bins of the expected calibration error.
ECE_BINS = 15
_THRESHOLD_METHODS = ("f1", "youden")
#: Resamples per vectorised block (bounds memory at ``_CHUNK * N`` floats).
_CHUNK = 250


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    probs: Any, labels: Any, mask: Any | None, names: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"probs and labels must both be (N, K), got {p.shape} and {y.shape}")
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
    if m.shape != y.shape:
        raise ValueError(f"mask must match labels {y.shape}, got {m.shape}")
    known = m > 0
    if not np.isfinite(p[known]).all():
        raise ValueError("probs contain NaN or infinite values")
    if p[known].size and (p[known].min() < 0 or p[known].max() > 1):
        raise ValueError(
            f"probs must be probabilities in [0, 1], got range [{p[known].min():.3g}, "
            f"{p[known].max():.3g}] (apply a sigmoid to logits)"
        )
    bad = ~np.isin(y[known], (0.0, 1.0))
    if bad.any():
        raise ValueError(f"known labels must be 0 or 1, found {np.unique(y[known][bad])[:5]}")
    if names is None:
        names = [f"label_{k}" for k in range(p.shape[1])]
    names = [str(n) for n in names]
    if len(names) != p.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {p.shape[1]} columns")
    return p, y, known.astype(bool), names


# ---------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------


def auroc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve via ranks (Mann-Whitney U, ties count one half).

    Shapes: ``scores (n,)``, ``labels (n,)`` 0/1. Returns None when only one class occurs.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    out = _weighted_auroc(s, y, np.ones((1, s.size)))[0]
    return None if math.isnan(out) else float(out)


class _SortedScores:
    """One finding's scores sorted once, with tie groups, reused for every resample."""

    def __init__(self, scores: np.ndarray, labels: np.ndarray):
        order = np.argsort(scores, kind="mergesort")
        self.order = order
        s = scores[order]
        self.pos = labels[order] > 0
        # start of each run of equal scores (tied scores share one rank group)
        self.starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])

    def auroc(self, weights: np.ndarray) -> np.ndarray:
        """``weights (B, n)`` multiplicities in original order -> ``(B,)`` AUROC (NaN when a
        resample lacks a class)."""
        w = weights[:, self.order]
        wpos = np.where(self.pos, w, 0.0)
        wneg = w - wpos
        pos_g = np.add.reduceat(wpos, self.starts, axis=1)  # (B, G)
        neg_g = np.add.reduceat(wneg, self.starts, axis=1)  # (B, G)
        below = np.cumsum(neg_g, axis=1) - neg_g  # negatives strictly below each group
        u = (pos_g * (below + 0.5 * neg_g)).sum(axis=1)
        denom = pos_g.sum(axis=1) * neg_g.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan)


def _weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    if scores.size == 0:
        return np.full(weights.shape[0], np.nan)
    return _SortedScores(scores, labels).auroc(weights)


def _bootstrap_weights(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of ``(b, n)`` resample multiplicities (each row sums to n), deterministic in
    ``seed``: every caller with the same ``(n, n_boot, seed)`` sees the same resamples."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(_CHUNK, n_boot - done)
        draws = rng.integers(0, n, size=(b, n))
        flat = (draws + (np.arange(b) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)
        done += b


def _percentile_ci(values: np.ndarray, level: float) -> tuple[float | None, float | None]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return None, None
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _boot_aurocs(
    probs: np.ndarray,
    labels: np.ndarray,
    known: np.ndarray,
    columns: Sequence[int],
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """``(n_boot, len(columns))`` resampled AUROCs, one shared image draw per resample."""
    n = probs.shape[0]
    sorters = [
        (_SortedScores(probs[known[:, k], k], labels[known[:, k], k]), known[:, k]) for k in columns
    ]
    out = np.empty((n_boot, len(columns)))
    row = 0
    for w in _bootstrap_weights(n, n_boot, seed):
        for j, (sorter, rows) in enumerate(sorters):
            out[row : row + len(w), j] = sorter.auroc(w[:, rows])
        row += len(w)
    return out


@dataclass
class FindingAUROC:
    """One finding's AUROC with its bootstrap CI and counts (None when undefined)."""

    auroc: float | None
    ci_low: float | None
    ci_high: float | None
    n_pos: int
    n: int


@dataclass
class MacroAUROC:
    """Mean AUROC over the findings with enough positives, with its bootstrap CI."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    findings: list[str]


def _finding_counts(labels: np.ndarray, known: np.ndarray, k: int) -> tuple[int, int]:
    rows = known[:, k]
    return int(labels[rows, k].sum()), int(rows.sum())


def _auroc_table(
    p: np.ndarray, y: np.ndarray, known: np.ndarray, n_boot: int, seed: int
) -> tuple[list[int], dict[int, float], np.ndarray | None]:
    """Findings with both classes, their AUROCs, and ``(n_boot, len(defined))`` resampled
    AUROCs (None when ``n_boot == 0``)."""
    defined = [k for k in range(p.shape[1]) if _two_classes(y, known, k)]
    points: dict[int, float] = {}
    for k in defined:
        value = auroc(p[known[:, k], k], y[known[:, k], k])
        assert value is not None  # both classes present
        points[k] = value
    boots = _boot_aurocs(p, y, known, defined, n_boot, seed) if n_boot else None
    return defined, points, boots


def _per_finding(
    y: np.ndarray,
    known: np.ndarray,
    names: Sequence[str],
    table: tuple[list[int], dict[int, float], np.ndarray | None],
    ci: float,
) -> dict[str, FindingAUROC]:
    defined, points, boots = table
    out: dict[str, FindingAUROC] = {}
    for k, name in enumerate(names):
        n_pos, n = _finding_counts(y, known, k)
        if k not in points:
            out[name] = FindingAUROC(None, None, None, n_pos, n)
            continue
        lo = hi = None
        if boots is not None:
            lo, hi = _percentile_ci(boots[:, defined.index(k)], ci)
        out[name] = FindingAUROC(points[k], lo, hi, n_pos, n)
    return out


def _macro(
    y: np.ndarray,
    known: np.ndarray,
    names: Sequence[str],
    table: tuple[list[int], dict[int, float], np.ndarray | None],
    ci: float,
    min_pos: int,
) -> MacroAUROC:
    defined, points, boots = table
    cols = [k for k in defined if _finding_counts(y, known, k)[0] >= min_pos]
    if not cols:
        return MacroAUROC(None, None, None, [])
    value = float(np.mean([points[k] for k in cols]))
    lo = hi = None
    if boots is not None:
        chosen = boots[:, [defined.index(k) for k in cols]]
        lo, hi = _percentile_ci(_nanmean_rows(chosen), ci)
    return MacroAUROC(value, lo, hi, [names[k] for k in cols])


def per_finding_auroc(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, FindingAUROC]:
    """Per-finding AUROC on known rows with percentile bootstrap CIs.

    Findings with a single class present get ``auroc=None`` (and no CI).
    """
    p, y, known, names = _check_inputs(probs, labels, mask, names)
    _check_boot(n_boot, ci)
    return _per_finding(y, known, names, _auroc_table(p, y, known, n_boot, seed), ci)


def _two_classes(y: np.ndarray, known: np.ndarray, k: int) -> bool:
    values = y[known[:, k], k]
    return bool(values.size and 0 < values.sum() < values.size)


def _macro_columns(y: np.ndarray, known: np.ndarray, min_pos: int) -> list[int]:
    """Findings that enter the macro AUROC: >= min_pos positives and both classes."""
    return [
        k
        for k in range(y.shape[1])
        if _two_classes(y, known, k) and _finding_counts(y, known, k)[0] >= min_pos
    ]


def _check_boot(n_boot: int, ci: float) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def macro_auroc(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_pos: int = MIN_POSITIVES,
) -> MacroAUROC:
    """Macro AUROC over findings with ``>= min_pos`` positives (and a negative); the CI
    resamples images jointly across findings (a resample's macro is the mean over the
    findings defined on it)."""
    p, y, known, names = _check_inputs(probs, labels, mask, names)
    _check_boot(n_boot, ci)
    return _macro(y, known, names, _auroc_table(p, y, known, n_boot, seed), ci, min_pos)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    counts = finite.sum(axis=1)
    sums = np.where(finite, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass
class PairedDifference:
    """Macro AUROC of model A minus model B on the same images, with a paired bootstrap CI.

    ``p_value``: two-sided bootstrap p-value for "no difference" (twice the smaller share of
    resampled differences on either side of 0, capped at 1).
    """

    macro_a: float | None
    macro_b: float | None
    diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    findings: list[str]
    n_boot: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap_diff(
    probs_a: Any,
    probs_b: Any,
    labels: Any,
    mask: Any | None = None,
    names: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_pos: int = MIN_POSITIVES,
) -> PairedDifference:
    """Difference in macro AUROC between two models scored on the same labelled images
    (e.g. the KG model minus the ``--no-kg`` ablation); both arms use the same resamples."""
    pa, y, known, names = _check_inputs(probs_a, labels, mask, names)
    pb, _, _, _ = _check_inputs(probs_b, labels, mask, names)
    _check_boot(n_boot, ci)
    cols = _macro_columns(y, known, min_pos)
    if not cols:
        return PairedDifference(None, None, None, None, None, None, [], n_boot, seed)
    ma = float(np.mean([auroc(pa[known[:, k], k], y[known[:, k], k]) for k in cols]))
    mb = float(np.mean([auroc(pb[known[:, k], k], y[known[:, k], k]) for k in cols]))
    lo = hi = p_value = None
    if n_boot:
        da = _nanmean_rows(_boot_aurocs(pa, y, known, cols, n_boot, seed))
        db = _nanmean_rows(_boot_aurocs(pb, y, known, cols, n_boot, seed))
        d = da - db
        lo, hi = _percentile_ci(d, ci)
        d = d[np.isfinite(d)]
        if d.size:
            p_value = float(min(1.0, 2.0 * min((d <= 0).mean(), (d >= 0).mean())))
    return PairedDifference(
        ma, mb, ma - mb, lo, hi, p_value, [names[k] for k in cols], n_boot, seed
    )


# ---------------------------------------------------------------------------------------------
# Thresholds, F1, calibration
# ---------------------------------------------------------------------------------------------


def choose_thresholds(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None = None,
    method: str = "f1",
    default: float = 0.5,
) -> dict[str, float]:
    """Per-finding decision thresholds, to be chosen on validation data.

    ``method="f1"`` maximises F1 (predict positive when ``prob >= threshold``);
    ``"youden"`` maximises sensitivity + specificity - 1. A finding with a single class
    known gets ``default``.
    """
    if method not in _THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {_THRESHOLD_METHODS}, got {method!r}")
    p, y, known, names = _check_inputs(probs, labels, mask, names)
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        if not _two_classes(y, known, k):
            out[name] = float(default)
            continue
        yk, pk = y[known[:, k], k], p[known[:, k], k]
        if method == "f1":
            precision, recall, thresholds = precision_recall_curve(yk, pk)
            precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
            with np.errstate(invalid="ignore", divide="ignore"):
                f1 = np.where(
                    precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0
                )
            out[name] = float(thresholds[int(np.argmax(f1))])
        else:
            fpr, tpr, thresholds = roc_curve(yk, pk)
            finite = np.isfinite(thresholds)
            best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
            out[name] = float(min(thresholds[best], 1.0))
    return out


def _confusion(yk: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    return {
        "tp": int(((pred == 1) & (yk == 1)).sum()),
        "fp": int(((pred == 1) & (yk == 0)).sum()),
        "fn": int(((pred == 0) & (yk == 1)).sum()),
        "tn": int(((pred == 0) & (yk == 0)).sum()),
    }


def _prf(c: dict[str, int]) -> dict[str, float]:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def threshold_metrics(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None,
    thresholds: dict[str, float],
) -> dict[str, dict[str, float | int]]:
    """F1, precision, recall and confusion counts per finding at the given thresholds
    (zero where undefined, as scikit-learn's ``zero_division=0``)."""
    p, y, known, names = _check_inputs(probs, labels, mask, names)
    missing = [n for n in names if n not in thresholds]
    if missing:
        raise ValueError(f"no threshold for: {', '.join(missing)}")
    out: dict[str, dict[str, float | int]] = {}
    for k, name in enumerate(names):
        rows = known[:, k]
        yk = y[rows, k]
        pred = (p[rows, k] >= thresholds[name]).astype(np.float64)
        c = _confusion(yk, pred)
        out[name] = {
            **_prf(c),
            "threshold": float(thresholds[name]),
            "support": int(yk.sum()),
            "n": int(rows.sum()),
            **c,
        }
    return out


def classification_report(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None,
    thresholds: dict[str, float],
) -> dict[str, dict[str, float | int]]:
    """A scikit-learn-shaped report (``output_dict=True`` keys: ``precision``, ``recall``,
    ``f1-score``, ``support``) per finding plus ``micro avg`` (pooled over every known
    label) and ``macro avg`` (mean over findings with a known positive), masked labels
    excluded."""
    per = threshold_metrics(probs, labels, mask, names, thresholds)
    out: dict[str, dict[str, float | int]] = {}
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for name, m in per.items():
        out[name] = {
            "precision": m["precision"],
            "recall": m["recall"],
            "f1-score": m["f1"],
            "support": m["support"],
        }
        for key in total:
            total[key] += int(m[key])
    micro = _prf(total)
    support = sum(int(m["support"]) for m in per.values())
    out["micro avg"] = {
        "precision": micro["precision"],
        "recall": micro["recall"],
        "f1-score": micro["f1"],
        "support": support,
    }
    with_pos = [m for m in per.values() if int(m["support"]) > 0]
    out["macro avg"] = {
        "precision": float(np.mean([m["precision"] for m in with_pos])) if with_pos else 0.0,
        "recall": float(np.mean([m["recall"] for m in with_pos])) if with_pos else 0.0,
        "f1-score": float(np.mean([m["f1"] for m in with_pos])) if with_pos else 0.0,
        "support": support,
    }
    return out


def expected_calibration_error(
    probs: Any, labels: Any, mask: Any | None = None, n_bins: int = ECE_BINS
) -> float | None:
    """ECE over every known label: ``sum_b n_b / N * |mean(y_b) - mean(p_b)|`` with
    ``n_bins`` equal-width bins on [0, 1] (a probability of exactly 1 falls in the last
    bin). None when no label is known."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y, known, _ = _check_inputs(probs, labels, mask, None)
    pk, yk = p[known], y[known]
    if pk.size == 0:
        return None
    bins = np.minimum((pk * n_bins).astype(np.int64), n_bins - 1)
    conf = np.bincount(bins, weights=pk, minlength=n_bins)
    acc = np.bincount(bins, weights=yk, minlength=n_bins)
    return float(np.abs(acc - conf).sum() / pk.size)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class ClassificationResult:
    """Everything ``report.json`` holds about classification; :meth:`as_dict` is its JSON."""

    macro_auroc: float | None
    macro_auroc_ci: list[float | None]
    macro_findings: list[str]
    per_finding: dict[str, FindingAUROC]
    thresholds: dict[str, float]
    threshold_method: str
    thresholds_source: str  # "given" (e.g. chosen on validation data) or "same data"
    f1: dict[str, dict[str, float | int]]
    ece: float | None
    classification_report: dict[str, dict[str, float | int]]
    n_boot: int
    seed: int
    ci: float
    min_pos: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"macro_auroc", "macro_auroc_ci": [lo, hi], "per_finding": {name:
        {"auroc", "ci_low", "ci_high", "n_pos", "n"}}, "f1", "thresholds", "ece",
        "classification_report", ...}``."""
        out: dict[str, Any] = _jsonable(asdict(self))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def evaluate_classification(
    probs: Any,
    labels: Any,
    mask: Any | None,
    names: Sequence[str] | None = None,
    thresholds: dict[str, float] | None = None,
    threshold_method: str = "f1",
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_pos: int = MIN_POSITIVES,
) -> ClassificationResult:
    """Per-finding AUROC with CIs, macro AUROC with CI, F1 / precision / recall at
    thresholds, ECE and a classification report.

    Args:
        probs, labels, mask, names: see the module docstring.
        thresholds: per-finding thresholds chosen on validation data with
            :func:`choose_thresholds`; None chooses them on these data (optimistic; noted).
        threshold_method: ``"f1"`` or ``"youden"`` when thresholds are chosen here.
        n_boot: bootstrap resamples (default 1000; 0 skips CIs).
        seed: bootstrap seed (default 0).
        ci: confidence level (default 0.95).
        min_pos: positives a finding needs to enter the macro AUROC (default 5).
    """
    p, y, known, names = _check_inputs(probs, labels, mask, names)
    _check_boot(n_boot, ci)
    notes: list[str] = []
    table = _auroc_table(p, y, known, n_boot, seed)
    per = _per_finding(y, known, names, table, ci)
    macro = _macro(y, known, names, table, ci, min_pos)
    for name, r in per.items():
        if r.n == 0:
            notes.append(f"{name}: no known labels; excluded")
        elif r.auroc is None:
            notes.append(
                f"{name}: only one class among {r.n} known labels; AUROC undefined, "
                "excluded from the macro AUROC"
            )
        elif r.n_pos < min_pos:
            notes.append(
                f"{name}: {r.n_pos} positive(s) < {min_pos}; excluded from the macro AUROC"
            )
    if thresholds is None:
        thresholds = choose_thresholds(p, y, known, names, method=threshold_method)
        source = "same data"
        notes.append(
            "thresholds were chosen on the evaluated data (optimistic F1); choose them on "
            "validation data and pass them in"
        )
    else:
        source = "given"
        thresholds = {n: float(thresholds[n]) for n in names if n in thresholds}
    f1 = threshold_metrics(p, y, known, names, thresholds)
    return ClassificationResult(
        macro_auroc=macro.value,
        macro_auroc_ci=[macro.ci_low, macro.ci_high],
        macro_findings=macro.findings,
        per_finding=per,
        thresholds=thresholds,
        threshold_method=threshold_method if source == "same data" else "given",
        thresholds_source=source,
        f1=f1,
        ece=expected_calibration_error(p, y, known),
        classification_report=classification_report(p, y, known, names, thresholds),
        n_boot=n_boot,
        seed=seed,
        ci=ci,
        min_pos=min_pos,
        notes=notes,
    )
