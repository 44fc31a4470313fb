"""Classification metrics: fast AUROC vs scikit-learn, bootstrap CIs, masking, thresholds,
ECE, the paired KG-vs-ablation difference and the report's JSON shape."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

from models.metrics import (
    _bootstrap_weights,
    _SortedScores,
    auroc,
    choose_thresholds,
    classification_report,
    evaluate_classification,
    expected_calibration_error,
    macro_auroc,
    paired_bootstrap_diff,
    per_finding_auroc,
    threshold_metrics,
)


def _data(n: int = 300, k: int = 4, signal: float = 1.5, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, k)) < 0.3).astype(np.float64)
    logits = signal * labels + rng.normal(size=(n, k))
    probs = 1 / (1 + np.exp(-logits))
    if ties:
        probs = np.round(probs, 1)
    mask = (rng.random((n, k)) < 0.8).astype(np.float64)
    return probs, labels, mask


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", [2, 17, 500])
def test_auroc_matches_sklearn(ties: bool, n: int) -> None:
    rng = np.random.default_rng(n)
    y = np.r_[0, 1, (rng.random(n - 2) < 0.4)].astype(float)
    s = rng.random(n)
    if ties:
        s = np.round(s, 1)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auroc_one_class_is_none() -> None:
    assert auroc([0.1, 0.9], [1, 1]) is None
    assert auroc([], []) is None


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_bootstrap_auroc_equals_sklearn_on_materialised_resamples(ties: bool) -> None:
    rng = np.random.default_rng(1)
    n = 60
    y = (rng.random(n) < 0.4).astype(float)
    s = np.round(rng.random(n), 1) if ties else rng.random(n)
    weights = next(_bootstrap_weights(n, 20, seed=3))
    assert weights.shape == (20, n) and np.all(weights.sum(axis=1) == n)
    fast = _SortedScores(s, y).auroc(weights)
    for b in range(20):
        idx = np.repeat(np.arange(n), weights[b].astype(int))
        if len(np.unique(y[idx])) < 2:
            assert np.isnan(fast[b])
        else:
            assert fast[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_masked_rows_are_ignored() -> None:
    probs, labels, mask = _data()
    garbage = probs.copy()
    garbage[mask == 0] = 1 - garbage[mask == 0]  # changing unknown cells changes nothing
    a = per_finding_auroc(probs, labels, mask, n_boot=50)
    b = per_finding_auroc(garbage, labels, mask, n_boot=50)
    assert a == b
    for k, r in enumerate(a.values()):
        rows = mask[:, k] > 0
        assert r.auroc == pytest.approx(roc_auc_score(labels[rows, k], probs[rows, k]))
        assert r.n == rows.sum() and r.n_pos == labels[rows, k].sum()


def test_bootstrap_ci_contains_point_is_seeded_and_shrinks_with_n() -> None:
    probs, labels, mask = _data(200)
    r1 = per_finding_auroc(probs, labels, mask, n_boot=300, seed=0)
    assert r1 == per_finding_auroc(probs, labels, mask, n_boot=300, seed=0)
    assert r1 != per_finding_auroc(probs, labels, mask, n_boot=300, seed=1)
    big = per_finding_auroc(*_data(3000), n_boot=300, seed=0)
    for small_r, big_r in zip(r1.values(), big.values(), strict=True):
        assert small_r.ci_low <= small_r.auroc <= small_r.ci_high
        assert big_r.ci_high - big_r.ci_low < small_r.ci_high - small_r.ci_low


def test_single_class_and_rare_findings_are_excluded_from_macro() -> None:
    probs, labels, mask = _data(200, k=3)
    labels[:, 1] = 0  # one class only
    labels[:, 2] = 0
    labels[:3, 2] = 1  # 3 positives < 5
    mask[:3, 2] = 1
    result = evaluate_classification(probs, labels, mask, ["a", "b", "c"], n_boot=100)
    assert result.per_finding["b"].auroc is None and result.per_finding["b"].ci_low is None
    assert result.per_finding["c"].auroc is not None and result.per_finding["c"].n_pos == 3
    assert result.macro_findings == ["a"]
    assert result.macro_auroc == pytest.approx(result.per_finding["a"].auroc)
    assert any("b: only one class" in n for n in result.notes)
    assert any("c: 3 positive(s) < 5" in n for n in result.notes)


def test_macro_auroc_ci_resamples_images_jointly() -> None:
    probs, labels, mask = _data(400, k=5)
    m = macro_auroc(probs, labels, mask, n_boot=400, seed=0)
    per = per_finding_auroc(probs, labels, mask, n_boot=0)
    assert m.value == pytest.approx(np.mean([r.auroc for r in per.values()]))
    assert m.ci_low < m.value < m.ci_high
    # averaging 5 findings: the macro CI is narrower than a single finding's
    single = per_finding_auroc(probs, labels, mask, n_boot=400, seed=0)["label_0"]
    assert m.ci_high - m.ci_low < single.ci_high - single.ci_low


def test_paired_difference() -> None:
    probs, labels, mask = _data(400, k=5, signal=1.0)
    same = paired_bootstrap_diff(probs, probs, labels, mask, n_boot=200)
    assert same.diff == 0 and same.ci_low == 0 and same.ci_high == 0 and same.p_value == 1.0
    rng = np.random.default_rng(9)
    better = 1 / (1 + np.exp(-(3.0 * labels + rng.normal(size=labels.shape))))
    d = paired_bootstrap_diff(better, probs, labels, mask, n_boot=500, seed=0)
    assert d.diff == pytest.approx(d.macro_a - d.macro_b)
    assert 0 < d.ci_low < d.diff < d.ci_high and d.p_value < 0.01
    assert d.macro_a == pytest.approx(macro_auroc(better, labels, mask, n_boot=0).value)
    # the same resamples serve both arms: the paired CI is narrower than the arms' CIs
    base = macro_auroc(probs, labels, mask, n_boot=500, seed=0)
    slightly = np.clip(probs + rng.normal(scale=0.01, size=probs.shape), 0, 1)
    close = paired_bootstrap_diff(slightly, probs, labels, mask, n_boot=500, seed=0)
    assert close.ci_high - close.ci_low < (base.ci_high - base.ci_low) / 5
    json.dumps(d.as_dict())


def test_thresholds_f1_and_youden_on_separable_data() -> None:
    probs = np.array([[0.1], [0.2], [0.35], [0.6], [0.7], [0.9]])
    labels = np.array([[0], [0], [0], [1], [1], [1]])
    for method in ("f1", "youden"):
        t = choose_thresholds(probs, labels, None, ["x"], method=method)
        assert 0.35 < t["x"] <= 0.6
        m = threshold_metrics(probs, labels, None, ["x"], t)["x"]
        assert (m["f1"], m["precision"], m["recall"], m["tp"], m["fp"]) == (1.0, 1.0, 1.0, 3, 0)
    assert choose_thresholds(probs, np.zeros_like(labels), None, ["x"]) == {"x": 0.5}
    with pytest.raises(ValueError, match="method"):
        choose_thresholds(probs, labels, None, ["x"], method="max")


def test_threshold_metrics_match_sklearn_on_known_rows() -> None:
    probs, labels, mask = _data(300, k=3)
    t = {"label_0": 0.5, "label_1": 0.4, "label_2": 0.6}
    ours = threshold_metrics(probs, labels, mask, None, t)
    for k, name in enumerate(t):
        rows = mask[:, k] > 0
        p, r, f, _ = precision_recall_fscore_support(
            labels[rows, k], probs[rows, k] >= t[name], average="binary", zero_division=0
        )
        assert (ours[name]["precision"], ours[name]["recall"], ours[name]["f1"]) == pytest.approx(
            (p, r, f)
        )
    report = classification_report(probs, labels, mask, None, t)
    assert set(report) == {*t, "micro avg", "macro avg"}
    assert report["micro avg"]["support"] == sum(int(ours[n]["support"]) for n in t)
    assert report["macro avg"]["f1-score"] == pytest.approx(np.mean([ours[n]["f1"] for n in t]))


def test_expected_calibration_error() -> None:
    # two bins: p=0.1 with 10% positives (calibrated), p=0.9 with 50% positives (off by 0.4)
    probs = np.r_[np.full(10, 0.1), np.full(10, 0.9)][:, None]
    labels = np.r_[np.eye(1, 10, 0)[0], np.r_[np.ones(5), np.zeros(5)]][:, None]
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.4)
    assert expected_calibration_error(np.ones((4, 1)), np.zeros((4, 1))) == pytest.approx(1.0)
    mask = np.zeros((4, 1))
    assert expected_calibration_error(np.ones((4, 1)), np.zeros((4, 1)), mask) is None


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.array([[1.5], [0.2]]), np.array([[1], [0]]), "probabilities in \\[0, 1\\]"),
        (np.array([[0.5], [0.2]]), np.array([[2], [0]]), "must be 0 or 1"),
        (np.zeros((3, 2)), np.zeros((3, 1)), "must both be \\(N, K\\)"),
        (np.array([[np.nan], [0.2]]), np.array([[1], [0]]), "NaN"),
    ],
)
def test_input_validation(probs, labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        per_finding_auroc(probs, labels, None, n_boot=0)


def test_report_json_shape_and_speed() -> None:
    names = [f"f{k}" for k in range(15)]
    probs, labels, mask = _data(2000, k=15, seed=4)
    val = _data(500, k=15, seed=5)
    thresholds = choose_thresholds(*val, names)
    start = time.perf_counter()
    result = evaluate_classification(probs, labels, mask, names, thresholds=thresholds, n_boot=1000)
    elapsed = time.perf_counter() - start
    report = json.loads(json.dumps(result.as_dict()))
    assert set(report) >= {
        "macro_auroc",
        "macro_auroc_ci",
        "per_finding",
        "f1",
        "thresholds",
        "ece",
        "classification_report",
    }
    assert set(report["per_finding"]["f0"]) == {"auroc", "ci_low", "ci_high", "n_pos", "n"}
    lo, hi = report["macro_auroc_ci"]
    assert lo < report["macro_auroc"] < hi
    assert report["thresholds_source"] == "given" and report["thresholds"] == thresholds
    assert 0 <= report["ece"] <= 1
    assert elapsed < 10, f"1000 bootstrap resamples of 2000 x 15 took {elapsed:.1f} s"
