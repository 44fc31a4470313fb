"""Patient-wise splits: no patient's images on two sides of a split.

Patients (groups) are shuffled with a seeded generator and laid end to end along [0, 1),
each taking a length proportional to its number of images, from a random start (systematic
sampling); a patient goes to the split whose fraction interval holds its midpoint. Row
proportions then come out within about one patient of the fractions, and a stratum with a
single patient lands in each split with probability equal to its fraction. With
``stratify_key`` the dealing runs separately within each stratum (a group's stratum is its
most frequent value), which keeps e.g. pneumonia / normal or source proportions alike across
splits. Same rows + same seed -> same split, whatever the row order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from models.errors import DataError

Row = Mapping[str, Any]
Key = str | Callable[[Row], Hashable]

#: Names given to unnamed fractions, by count.
_DEFAULT_NAMES = {1: ("train",), 2: ("train", "val"), 3: ("train", "val", "test")}


def _named_fractions(fractions: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    if isinstance(fractions, Mapping):
        named = {str(k): float(v) for k, v in fractions.items()}
    else:
        values = [float(f) for f in fractions]
        names = _DEFAULT_NAMES.get(len(values), tuple(f"split{i}" for i in range(len(values))))
        named = dict(zip(names, values, strict=True))
    if not named:
        raise ValueError("fractions is empty: give at least one split")
    bad = {k: v for k, v in named.items() if not v > 0}
    if bad:
        raise ValueError(f"fractions must be > 0, got {bad}")
    total = sum(named.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {total:g} from {named}")
    return named


def _key_fn(key: Key, what: str) -> Callable[[Row], Hashable]:
    if callable(key):
        return key

    def get(row: Row) -> Hashable:
        try:
            value = row[key]
        except KeyError:
            raise DataError(
                f"{what} {key!r} is not a field of the rows; fields: {', '.join(map(str, row))}"
            ) from None
        return value

    return get


def _groups(rows: Sequence[Row], indices: Sequence[int], group_key: Key) -> dict[str, list[int]]:
    """Row indices by group, keyed by the group's string value."""
    get = _key_fn(group_key, "group_key")
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        value = get(rows[i])
        if value is None or str(value).strip() == "":
            raise DataError(f"row {i} has an empty group ({group_key!r}) value")
        groups[str(value)].append(int(i))
    return dict(groups)


def patient_split(
    rows: Sequence[Row],
    fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.2),
    seed: int = 0,
    group_key: Key = "patient_id",
    stratify_key: Key | None = None,
) -> dict[str, list[int]]:
    """Split row indices patient-wise.

    Args:
        rows: one mapping per image (e.g. ``CsvImageDataset.rows``).
        fractions: row fractions per split, summing to 1: a sequence (2 -> ``train, val``,
            3 -> ``train, val, test``) or a mapping ``{name: fraction}`` (default
            ``(0.8, 0.2)``).
        seed: shuffling seed (default 0).
        group_key: field (or function of a row) naming the patient (default
            ``"patient_id"``).
        stratify_key: optional field (or function) to stratify by; a patient's stratum is its
            most frequent value (ties: the smallest as a string).

    Returns:
        ``{name: sorted row indices}`` in the order of ``fractions``.

    Raises:
        ValueError: bad fractions.
        DataError: no rows, a missing field, an empty group value, or fewer patients than
            splits (some split would be empty).
    """
    named = _named_fractions(fractions)
    if len(rows) == 0:
        raise DataError("cannot split an empty set of rows")
    groups = _groups(rows, range(len(rows)), group_key)
    if len(groups) < len(named):
        raise DataError(f"{len(groups)} patient(s) cannot fill {len(named)} splits {list(named)}")
    strata: dict[str, list[str]] = defaultdict(list)
    if stratify_key is None:
        strata[""] = sorted(groups)
    else:
        get = _key_fn(stratify_key, "stratify_key")
        for name, group_rows in groups.items():
            counts = Counter(str(get(rows[i])) for i in group_rows)
            top = max(counts.values())
            strata[min(v for v, c in counts.items() if c == top)].append(name)
    rng = np.random.default_rng(seed)
    names = list(named)
    cuts = np.cumsum([named[n] for n in names])[:-1]  # upper bounds of all but the last
    out: dict[str, list[int]] = {n: [] for n in names}
    for stratum in sorted(strata):
        patients = sorted(strata[stratum])
        order = rng.permutation(len(patients))
        total = sum(len(groups[m]) for m in patients)
        # systematic sampling: lay the shuffled patients along [0, 1) by row count from a
        # random start; a patient goes to the split whose interval holds its midpoint
        position = float(rng.random()) * total
        for j in order:
            group = groups[patients[j]]
            u = ((position + len(group) / 2) / total) % 1.0
            out[names[int(np.searchsorted(cuts, u, side="right"))]].extend(group)
            position += len(group)
    empty = [n for n in names if not out[n]]
    if empty:
        raise DataError(
            f"split(s) {empty} got no rows: too few patients ({len(groups)}) for fractions {named}"
        )
    return {n: sorted(v) for n, v in out.items()}


def label_fraction_subset(
    indices: Sequence[int],
    fraction: float,
    seed: int = 0,
    rows: Sequence[Row] | None = None,
    group_key: Key = "patient_id",
) -> list[int]:
    """A patient-wise subset holding about ``fraction`` of ``indices`` (the 10%-labels runs).

    Patients are shuffled with ``seed`` and taken whole, in that order, until the subset
    reaches ``fraction * len(indices)`` rows (the last patient is kept only if that lands
    closer to the target; at least one patient). Subsets for growing fractions with one seed
    are nested (10% inside 50%).

    Args:
        indices: the candidate row indices (e.g. a training split).
        fraction: in (0, 1]; 1 returns every index.
        seed: shuffling seed.
        rows: the rows ``indices`` point into; None treats each index as its own patient.
        group_key: field (or function) naming the patient, as in :func:`patient_split`.

    Returns:
        sorted row indices, a subset of ``indices``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    idx = [int(i) for i in indices]
    if not idx:
        raise DataError("cannot take a fraction of an empty set of indices")
    if fraction == 1:
        return sorted(idx)
    groups = {str(i): [i] for i in idx} if rows is None else _groups(rows, idx, group_key)
    names = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    target = fraction * len(idx)
    chosen: list[int] = []
    for j in order:
        group = groups[names[j]]
        # a prefix of one shuffled patient order, so subsets are nested across fractions;
        # the last patient is kept only when that lands closer to the target
        if chosen and len(chosen) + len(group) - target > target - len(chosen):
            break
        chosen.extend(group)
        if len(chosen) >= target:
            break
    return sorted(chosen)
