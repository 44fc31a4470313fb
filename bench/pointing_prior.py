"""Pointing-game reference: how far one fixed grid cell gets, and where each arm's maps peak.

The pointing game (a finding's heat-map peak inside a radiologist's box) is scored on a
coarse grid here: 4 x 4 cells at the protocol's 128 px. A location prior can then do well
without looking at the image, so this script puts the arms' figures next to it:

1. the fixed cell: the one grid cell whose centre falls inside the most boxes of the
   validation carve-out (the protocol's early-stopping rows, patient-disjoint from the
   test split), then scored on the test split's boxed findings with a Wilson 95% CI;
2. each trained arm of ``bench/quality.py`` (``--out``, default ``runs/quality``) whose
   checkpoint is there: its pointing on the carve-out's boxes (the figure to choose a recipe
   by) and on the test boxes, and how concentrated its peaks are
   (the share on its most frequent cell: a map that always peaks in one place is a prior).

It is a reference, not a target: it prints a table and a JSON line and exits 0 (1 only when
nothing can be scored). About a minute on the 2-core CPU once the arms are trained.

Usage (bench/quality.py's options):
  python bench/pointing_prior.py [--out runs/quality] [--data ../shared/data] [--config ...]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality as Q  # noqa: E402  (bench/quality.py: the protocol's split, arms and scoring)

from models.data import CsvImageDataset, LabelledImageDataset  # noqa: E402
from models.localisation import wilson_ci  # noqa: E402
from models.text_encoder import SupportsEncode  # noqa: E402
from models.train_data import build_datasets  # noqa: E402

#: Arms whose heat maps are compared (their checkpoints under ``--out``).
ARMS = ("kg", "nokg", "densenet")


class _Wrapping:
    """A scorer built on another one: its names, input size and preprocessing."""

    def __init__(self, base: Q.Scorer):
        self.base = base
        self.names = list(base.names)

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[Any, list[Any]]:
        return self.base.preprocess(images)


class FixedCellScorer(_Wrapping):
    """Another scorer's preprocessing, with a map that is 1 at ``cell`` and 0 elsewhere."""

    def __init__(self, base: Q.Scorer, grid: tuple[int, int], cell: tuple[int, int]):
        super().__init__(base)
        self.grid = grid
        self.cell = cell

    def score(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        b, k = int(batch.shape[0]), len(self.names)
        maps = np.zeros((b, k, *self.grid), dtype=np.float32)
        maps[..., self.cell[0], self.cell[1]] = 1.0
        return np.zeros((b, k), dtype=np.float32), maps

    def zero_shot(self, batch: Any, concept_ids: list[str]) -> np.ndarray:
        raise Q.QualityError("a fixed cell is a location prior: it scores no finding")


class PeakRecorder(_Wrapping):
    """Another scorer, unchanged, noting each map's peak cell as the images go by (so the
    peaks come from the same pass that scores the pointing game)."""

    def __init__(self, base: Q.Scorer):
        super().__init__(base)
        self.peaks: list[np.ndarray] = []  # (B, K) flat peak cell per image batch

    def score(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        probs, maps = self.base.score(batch)
        self.peaks.append(maps.reshape(maps.shape[0], maps.shape[1], -1).argmax(-1))
        return probs, maps

    def zero_shot(self, batch: Any, concept_ids: list[str]) -> np.ndarray:
        return self.base.zero_shot(batch, concept_ids)

    def top_cell(self, data: LabelledImageDataset, boxes: dict) -> tuple[float, int]:
        """The most frequent peak cell of the boxed findings' maps, and its share."""
        flat = np.concatenate(self.peaks)
        peaks = Counter(
            int(flat[i, k])
            for i, image in enumerate(data.ids)
            for k, name in enumerate(self.names)
            if (image, name) in boxes
        )
        cell, count = peaks.most_common(1)[0]
        return count / sum(peaks.values()), cell


def boxed(data: LabelledImageDataset, boxes_csv: Path) -> tuple[LabelledImageDataset, dict]:
    """The images of ``data`` that have boxes, and their boxes."""
    boxes = Q.boxes_on_test(boxes_csv, set(data.ids))
    keep = {image for image, _ in boxes}
    return data.subset([i for i, x in enumerate(data.ids) if x in keep]), boxes


def load_scorer(
    arm_name: str, opts: Q.Options, encoder: SupportsEncode | None = None
) -> Q.Scorer | None:
    """The arm's scorer, ``None`` when it has not been trained under ``opts.out``."""
    from models.baseline import BaselinePredictor

    arm = Q.ARMS[arm_name]
    model_dir = opts.out / arm.name / Q.MODEL_DIR
    if not model_dir.is_dir():
        return None
    config = Q.arm_config(arm, opts)
    if arm.kind == "kgdx":
        return Q.KgdxScorer(Q.load_kgdx(config, model_dir, encoder))
    return Q.BaselineScorer(BaselinePredictor.load(model_dir, config.train.device))


def _rounded(ci: Sequence[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 3) for v in ci]


def main(argv: Sequence[str] | None = None, encoder: SupportsEncode | None = None) -> int:
    """Takes bench/quality.py's options (``--out``, ``--data``, ``--config``, ``--set``), so
    the arms are loaded with the recipe they were trained with."""
    opts, _ = Q.parse_args(argv)
    paths = Q.DataPaths(opts.data)
    scorers = {name: s for name in ARMS if (s := load_scorer(name, opts, encoder)) is not None}
    if not scorers:
        print(f"Error: no trained arm under {opts.out} (run bench/quality.py first)")
        return 1
    reference = next(iter(scorers.values()))
    config = Q.arm_config(Q.ARMS[next(iter(scorers))], opts)
    carve_all = build_datasets(config.data, config.preprocess_config()).val
    carve, carve_boxes = boxed(carve_all, paths.boxes)
    test_all = CsvImageDataset(
        paths.labels, paths.images, config.data.label_names, split=Q.TEST_SPLIT, strict=True
    )
    test, test_boxes = boxed(test_all, paths.boxes)
    if not test_boxes:
        print(f"Error: no boxed finding on the test split's images ({paths.boxes})")
        return 1
    batch, _ = reference.preprocess([test.load(0)])
    grid = tuple(reference.score(batch)[1].shape[-2:])
    assert len(grid) == 2
    rows, cols = int(grid[0]), int(grid[1])

    def hits(scorer: Q.Scorer, data: LabelledImageDataset, boxes: dict) -> np.ndarray:
        return Q.score_dataset(scorer, data, boxes).loc_hit

    def fixed_hits(cell: tuple[int, int], data: LabelledImageDataset, boxes: dict) -> np.ndarray:
        return hits(FixedCellScorer(reference, (rows, cols), cell), data, boxes)

    figures: dict[str, Any] = {
        "grid": [rows, cols],
        "carve_boxed_findings": len(carve_boxes),
        "test_boxed_findings": 0,
        "fixed_cell": None,
        "fixed_cell_carve_pointing": None,
        "fixed_cell_test_pointing": None,
        "fixed_cell_test_ci": None,
        "arms": {},
    }
    lines = [f"grid {rows} x {cols}; boxed findings: carve-out {len(carve_boxes)}"]
    if carve_boxes:  # the cell is chosen on the carve-out only, never on the test boxes
        on_carve = {
            (r, c): float(fixed_hits((r, c), carve, carve_boxes).mean())
            for r in range(rows)
            for c in range(cols)
        }
        cell = max(on_carve, key=lambda rc: (on_carve[rc], -rc[0], -rc[1]))
        fixed = fixed_hits(cell, test, test_boxes)
        figures.update(
            fixed_cell=list(cell),
            fixed_cell_carve_pointing=round(on_carve[cell], 3),
            fixed_cell_test_pointing=round(float(fixed.mean()), 3),
            fixed_cell_test_ci=_rounded(wilson_ci(int(fixed.sum()), len(fixed))),
        )
        lines.append(
            f"fixed cell {cell} (best on the carve-out, {on_carve[cell]:.3f}): test pointing "
            f"{fixed.mean():.3f} {figures['fixed_cell_test_ci']}"
        )
    else:
        lines.append("no boxed finding in the validation carve-out: no fixed cell chosen")
    for name, scorer in scorers.items():
        recorder = PeakRecorder(scorer)
        hit = hits(recorder, test, test_boxes)
        share, top = recorder.top_cell(test, test_boxes)
        figures["test_boxed_findings"] = len(hit)
        # the carve-out's figure is the one to choose a recipe by; the test figure reports it
        carve_hit = hits(scorer, carve, carve_boxes) if carve_boxes else None
        figures["arms"][name] = {
            "carve_pointing": None if carve_hit is None else round(float(carve_hit.mean()), 3),
            "test_pointing": round(float(hit.mean()), 3),
            "test_ci": _rounded(wilson_ci(int(hit.sum()), len(hit))),
            "top_peak_cell": [top // cols, top % cols],
            "top_peak_share": round(share, 3),
        }
        on_carve_text = "" if carve_hit is None else f"carve-out pointing {carve_hit.mean():.3f}, "
        lines.append(
            f"{name:9s} {on_carve_text}test pointing {hit.mean():.3f} "
            f"{figures['arms'][name]['test_ci']}; "
            f"{share:.0%} of its peaks on cell {(top // cols, top % cols)}"
        )
    print("\n".join(lines))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
