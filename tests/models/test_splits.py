"""Patient-wise splits and label-fraction subsets."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from models.errors import DataError
from models.splits import label_fraction_subset, patient_split

LABELS_CSV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "labels.csv"


def _rows(n_patients: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """Patients with 1-6 images; ~30% of patients positive (all their images)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "1" if rng.random() < 0.3 else "0"
        for i in range(int(rng.integers(1, 7))):
            rows.append({"image": f"p{p}_{i}.png", "patient_id": f"p{p}", "y": label})
    return rows


def _patients(rows, idx) -> set[str]:
    return {rows[i]["patient_id"] for i in idx}


@pytest.mark.parametrize(
    "fractions",
    [(0.8, 0.2), (0.7, 0.15, 0.15), {"train": 0.6, "val": 0.2, "test": 0.2}, {"a": 0.5, "b": 0.5}],
)
@pytest.mark.parametrize("stratify", [None, "y"])
def test_no_leakage_full_coverage_and_proportions(fractions, stratify) -> None:
    rows = _rows()
    split = patient_split(rows, fractions, seed=1, stratify_key=stratify)
    named = (
        dict(fractions)
        if isinstance(fractions, dict)
        else dict(zip(["train", "val", "test"], fractions, strict=False))
    )
    assert list(split) == list(named)
    all_idx = sorted(i for idx in split.values() for i in idx)
    assert all_idx == list(range(len(rows)))  # every row exactly once
    names = list(split)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not _patients(rows, split[names[a]]) & _patients(rows, split[names[b]])
    for name, frac in named.items():
        assert len(split[name]) / len(rows) == pytest.approx(frac, abs=0.03)


def test_stratification_keeps_label_balance() -> None:
    rows = _rows(600)
    split = patient_split(rows, (0.8, 0.2), seed=3, stratify_key="y")
    overall = np.mean([r["y"] == "1" for r in rows])
    for idx in split.values():
        assert np.mean([rows[i]["y"] == "1" for i in idx]) == pytest.approx(overall, abs=0.02)


def test_deterministic_and_independent_of_row_order() -> None:
    rows = _rows()
    a = patient_split(rows, seed=7)
    assert a == patient_split(rows, seed=7)
    assert a != patient_split(rows, seed=8)
    perm = np.random.default_rng(0).permutation(len(rows))
    shuffled = [rows[i] for i in perm]
    b = patient_split(shuffled, seed=7)
    for name in a:
        assert _patients(rows, a[name]) == _patients(shuffled, b[name])


def test_callable_keys() -> None:
    rows = [{"name": f"P{i // 2}-{i}"} for i in range(40)]
    split = patient_split(rows, (0.5, 0.5), group_key=lambda r: r["name"].split("-")[0])
    groups = [{rows[i]["name"].split("-")[0] for i in idx} for idx in split.values()]
    assert not groups[0] & groups[1]


@pytest.mark.parametrize(
    ("fractions", "match"),
    [((0.5, 0.6), "sum to 1"), ((1.2, -0.2), "must be > 0"), ((), "empty")],
)
def test_bad_fractions(fractions, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        patient_split(_rows(10), fractions)


def test_too_few_patients_and_missing_key() -> None:
    rows = [{"patient_id": "a"}, {"patient_id": "a"}]
    with pytest.raises(DataError, match="1 patient\\(s\\) cannot fill 2 splits"):
        patient_split(rows)
    with pytest.raises(DataError, match="group_key 'subject' is not a field"):
        patient_split(rows, group_key="subject")
    with pytest.raises(DataError, match="empty"):
        patient_split([])
    with pytest.raises(DataError, match="empty group"):
        patient_split([{"patient_id": ""}, {"patient_id": "b"}])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_label_fraction_subset_patient_wise(fraction: float) -> None:
    rows = _rows(500)
    train = patient_split(rows, seed=0)["train"]
    sub = label_fraction_subset(train, fraction, seed=0, rows=rows)
    assert set(sub) <= set(train) and sub == sorted(sub)
    assert len(sub) / len(train) == pytest.approx(fraction, abs=0.01)
    chosen = _patients(rows, sub)
    per_patient = Counter(rows[i]["patient_id"] for i in train)
    assert sum(per_patient[p] for p in chosen) == len(sub)  # whole patients only


def test_label_fraction_subsets_are_nested_and_seeded() -> None:
    rows = _rows(300)
    idx = list(range(len(rows)))
    small = label_fraction_subset(idx, 0.1, seed=5, rows=rows)
    large = label_fraction_subset(idx, 0.5, seed=5, rows=rows)
    assert set(small) <= set(large)
    assert small == label_fraction_subset(idx, 0.1, seed=5, rows=rows)
    assert small != label_fraction_subset(idx, 0.1, seed=6, rows=rows)
    assert label_fraction_subset(idx, 1.0) == idx
    assert len(label_fraction_subset(idx, 0.2, seed=0)) == round(0.2 * len(idx))  # image-wise
    with pytest.raises(ValueError, match="fraction must be in"):
        label_fraction_subset(idx, 0.0)
    with pytest.raises(DataError):
        label_fraction_subset([], 0.5)


@pytest.mark.skipif(not LABELS_CSV.is_file(), reason="../shared/data/cxr not available")
def test_real_rows_split_by_patient_and_source() -> None:
    with open(LABELS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    split = patient_split(train, (0.85, 0.15), seed=0, stratify_key="source")
    assert not _patients(train, split["train"]) & _patients(train, split["val"])
    assert len(split["val"]) / len(train) == pytest.approx(0.15, abs=0.01)
    # the shipped train/val columns are patient-wise too
    assert not {r["patient_id"] for r in rows if r["split"] == "train"} & {
        r["patient_id"] for r in rows if r["split"] == "val"
    }
