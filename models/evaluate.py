"""``kgdx evaluate``: score a checkpoint on a labelled image set and write ``report.json``.

:func:`run_evaluation` loads the checkpoint (default: the bundled one) with its ontology,
reads a labels CSV in the format of ``../shared/data/cxr/labels.csv`` (unknown labels masked,
see :class:`~models.data.CsvImageDataset`), predicts in batches and writes, under ``OUT``:

- ``report.json``: ``model``, ``ontology``, ``data`` (counts), ``macro_auroc`` and
  ``macro_auroc_ci`` (findings with >= 5 positives), ``per_finding`` (``{name: {auroc,
  ci_low, ci_high, n_pos, n}}``, bootstrap 95% CIs), ``f1`` and ``classification_report`` at
  ``thresholds`` (``thresholds_source``: ``"given"`` when the checkpoint stores validation-
  chosen thresholds, else ``"same data"``, and ``notes`` says so), ``ece``, ``notes``,
  ``timing``; with ``faithfulness`` the deletion test (:mod:`models.faithfulness`) on every
  known positive label; with ``boxes`` the ``localisation`` of each boxed positive finding's
  heat map (pointing game, IoBB > 0.1 / 0.25, Wilson CIs; :mod:`models.localisation`);
  ``zero_shot`` (``{name: {concept_id, auroc, ci_low, ci_high, n_pos, n}}``) for findings
  the checkpoint held out of training (``extra.excluded_findings``) whose column is in the
  CSV, scored from their graph nodes (:func:`~models.inference.zero_shot_scores`);
- ``roc.png``: ROC curves of every finding.

Boxes are drawn on the 1024 px NIH originals: each is scaled to the image's size, then moved
into model-input coordinates through the letterbox :class:`~models.transforms.Geometry` of
the image, where the heat map lives.
"""

from __future__ import annotations

import csv
import dataclasses
import json as _json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from models.data import CsvImageDataset, labels_summary
from models.errors import DataError
from models.faithfulness import (
    DeletionConfig,
    DeletionRecord,
    deletion_test,
    summarise_deletion,
)
from models.inference import EVIDENCE_METHODS, Predictor, zero_shot_scores
from models.jsonfile import clean_json, write_json
from models.localisation import (
    NIH_ORIGINAL_SIZE,
    Box,
    LocalisationResult,
    localisation_report,
    localise,
    read_bbox_csv,
    scale_box,
)
from models.metrics import evaluate_classification, per_finding_auroc
from models.roc_plot import plot_roc

#: Images per forward pass.
BATCH_SIZE = 32
REPORT_FILE = "report.json"
ROC_FILE = "roc.png"
_SHOWN_SKIPPED = 20


def _check_inputs(
    data: Path, images: Path, out: Path, boxes: Path | None, limit: int | None
) -> None:
    if not data.is_file():
        raise DataError(f"labels CSV not found: {data}")
    if not images.is_dir():
        raise DataError(f"images folder not found: {images}")
    if boxes is not None and not boxes.is_file():
        raise DataError(f"bounding-box file not found: {boxes}")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")


def _csv_columns(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels CSV {path}: {e}") from e
    return [c.strip() for c in header]


def _progress(total: int, quiet: bool, desc: str) -> Any:
    return tqdm(
        total=total,
        desc=desc,
        unit="img",
        file=sys.stderr,
        disable=quiet or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def run_evaluation(
    data: Path,
    images: Path,
    out: Path,
    checkpoint: Path | None = None,
    boxes: Path | None = None,
    faithfulness: bool = False,
    split: str | None = None,
    limit: int | None = None,
    quiet: bool = False,
    json: bool = False,
    *,
    predictor: Predictor | None = None,
    batch_size: int = BATCH_SIZE,
    n_boot: int = 1000,
    deletion: DeletionConfig | None = None,
    evidence: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a labelled image set; write ``report.json`` and ``roc.png``.

    Args:
        data: labels CSV (``image`` column, one 0/1 column per finding, optional
            ``labeled_findings``, ``split``).
        images: the folder the ``image`` column is relative to.
        out: output folder (created).
        checkpoint: checkpoint folder (default: the bundled checkpoint).
        boxes: ``BBox_List_2017.csv(.gz)`` for the localisation section.
        faithfulness: run the deletion test on every known positive label.
        split: keep only rows whose ``split`` column has this value.
        limit: evaluate only the first ``limit`` rows (after ``split``).
        quiet: no progress bar.
        json: print the report as JSON instead of a short summary.
        predictor: an already loaded :class:`Predictor` (then ``checkpoint`` is ignored).
        batch_size: images per forward pass (default 32).
        n_boot: bootstrap resamples for the CIs (default 1000).
        deletion: settings of the deletion test (default :class:`DeletionConfig`).
        evidence: how the deletion test's evidence is ranked, ``"attribution"`` or
            ``"attention"`` (default: the predictor's :attr:`Predictor.evidence`,
            ``"attribution"``). Scores and heat maps need neither, so without
            ``faithfulness`` the attribution's backward pass is skipped.

    Returns:
        the report (as written to ``report.json``).

    Raises:
        DataError: missing files, no usable rows, none of the model's label columns.
        CheckpointError: no checkpoint, or one that does not fit the ontology.
    """
    started = time.perf_counter()
    data, images, out = Path(data), Path(images), Path(out)
    boxes = Path(boxes) if boxes is not None else None
    _check_inputs(data, images, out, boxes, limit)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if evidence is not None and evidence not in EVIDENCE_METHODS:
        raise DataError(
            f"--evidence must be one of {', '.join(EVIDENCE_METHODS)}, got {evidence!r}"
        )
    columns = _csv_columns(data)
    annotations = read_bbox_csv(boxes) if boxes is not None else None
    if predictor is None:
        predictor = Predictor.load(checkpoint)
    ranked_by = evidence or predictor.evidence
    notes: list[str] = []

    # -- data -----------------------------------------------------------------------------
    present = [n for n in predictor.names if n in columns]
    if not present:
        raise DataError(
            f"{data}: none of the model's label columns are in the file (model: "
            f"{', '.join(predictor.names)}; file: {', '.join(columns)})"
        )
    absent = [n for n in predictor.names if n not in present]
    if absent:
        notes.append(f"label columns not in the data, not evaluated: {', '.join(absent)}")
    # findings held out of training, scored zero-shot from their graph nodes
    zero_shot = {
        name: cid
        for name, cid in predictor.excluded.items()
        if name in columns and name not in predictor.names and predictor.model.gnn is not None
    }
    dataset = CsvImageDataset(data, images, [*present, *zero_shot], split=split, transform=None)
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(range(limit))
    cols = [predictor.names.index(n) for n in present]  # model output column per name

    wanted_boxes: dict[tuple[str, str], list[Box]] = defaultdict(list)
    if annotations is not None:
        for a in annotations:
            wanted_boxes[(a.image, a.finding)].append(a.box)
    box_findings = {f for _, f in wanted_boxes}
    unscored = sorted(box_findings - set(predictor.names))
    if annotations is not None and unscored:
        notes.append(f"boxes of findings the model does not score, ignored: {unscored}")

    # -- predict --------------------------------------------------------------------------
    config = deletion or DeletionConfig()
    probs_all: list[np.ndarray] = []
    zs_all: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[tuple[str, str]] = list(dataset.skipped)
    records: list[DeletionRecord] = []
    loc_results: list[LocalisationResult] = []
    loc_skipped_negative = 0
    size = predictor.image_size
    n = len(dataset)
    with _progress(n, quiet, "evaluating") as bar:
        for start in range(0, n, batch_size):
            idx: list[int] = []
            arrays: list[np.ndarray] = []
            for i in range(start, min(start + batch_size, n)):
                try:
                    arrays.append(dataset.load(i))
                    idx.append(i)
                except DataError as e:
                    skipped.append((dataset.ids[i], f"unreadable: {e}"))
            bar.update(min(start + batch_size, n) - start)
            if not idx:
                continue
            batch, geometries = predictor.preprocess(arrays)
            output = predictor.predict(batch, evidence=ranked_by if faithfulness else "attention")
            probs_all.append(output.probabilities.numpy()[:, cols])
            if zero_shot:
                zs_all.append(zero_shot_scores(predictor, batch, list(zero_shot.values())))
            kept.extend(idx)
            if faithfulness:
                y, m = dataset.labels[idx], dataset.mask[idx]
                pairs = [
                    (row, cols[j])
                    for row in range(len(idx))
                    for j in range(len(cols))
                    if y[row, j] > 0 and m[row, j] > 0
                ]
                records += deletion_test(
                    predictor.model, batch, output, pairs, config, image_keys=idx
                )
            if wanted_boxes:
                maps = output.heatmaps()  # (b, K, rows, cols)
                for row, i in enumerate(idx):
                    geo = geometries[row]
                    for k, name in enumerate(predictor.names):
                        found = wanted_boxes.get((dataset.ids[i], name))
                        if not found:
                            continue
                        if name in present:
                            j = present.index(name)
                            if dataset.mask[i, j] > 0 and dataset.labels[i, j] <= 0:
                                loc_skipped_negative += 1
                                continue
                        on_model = [
                            Box(
                                *geo.box_to_model(
                                    scale_box(
                                        b, NIH_ORIGINAL_SIZE, (geo.orig_height, geo.orig_width)
                                    ).as_tuple()
                                )
                            )
                            for b in found
                        ]
                        loc_results.append(
                            localise(dataset.ids[i], name, maps[row, k], on_model, size)
                        )
    if not kept:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"{data}: no image could be read{first}")

    # -- metrics --------------------------------------------------------------------------
    probs = np.concatenate(probs_all)
    n_present = len(present)
    labels, mask = dataset.labels[kept][:, :n_present], dataset.mask[kept][:, :n_present]
    thresholds = None
    if predictor.thresholds is not None:
        thresholds = {name: predictor.thresholds[name] for name in present}
    result = evaluate_classification(
        probs, labels, mask, present, thresholds=thresholds, n_boot=n_boot
    )
    if thresholds is not None:
        notes.append("thresholds are the checkpoint's (chosen on its validation data)")
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(
        probs,
        labels,
        mask,
        present,
        out / ROC_FILE,
        title=f"ROC: {predictor.model_name} {predictor.model_version} on {data.name}",
    )
    summary = labels_summary(dataset.subset(kept))
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {
        **predictor.describe(),
        "data": {
            "labels_csv": str(data),
            "images": str(images),
            "split": split,
            "limit": limit,
            "label_names": present,
            "n_images": len(kept),
            "n_skipped": len(skipped),
            "skipped": [f"{name}: {why}" for name, why in skipped[:_SHOWN_SKIPPED]],
            **{k: v for k, v in summary.items() if k not in ("n", "label_names", "skipped")},
        },
    }
    classification = result.as_dict()
    report.update(classification)
    report["notes"] = list(classification.get("notes", [])) + notes
    report["roc"] = ROC_FILE
    if faithfulness:
        report["faithfulness"] = {
            "evidence": ranked_by if predictor.model.gnn is not None else "attention",
            **summarise_deletion(records, predictor.names, config),
        }
        if not records:
            report["notes"].append("faithfulness: no known positive label to test")
    if zero_shot:
        zs_auroc = per_finding_auroc(
            np.concatenate(zs_all),
            dataset.labels[kept][:, n_present:],
            dataset.mask[kept][:, n_present:],
            list(zero_shot),
            n_boot=n_boot,
        )
        report["zero_shot"] = {
            name: {"concept_id": zero_shot[name], **dataclasses.asdict(r)}
            for name, r in zs_auroc.items()
        }
    if annotations is not None:
        report["localisation"] = localisation_report(loc_results)
        report["localisation_info"] = {
            "boxes_file": str(boxes),
            "scored": len(loc_results),
            "skipped_negative_label": loc_skipped_negative,
            "image_size": size,
        }
        if not loc_results:
            report["notes"].append("localisation: no box falls on an evaluated positive image")
    report["timing"] = {
        "seconds": round(seconds, 3),
        "images_per_second": round(len(kept) / seconds, 3) if seconds > 0 else None,
        "device": str(predictor.device),
    }
    report = clean_json(report)
    write_json(out / REPORT_FILE, report)
    if json:
        print(_json.dumps(report, indent=2))
    else:
        print(format_summary(report, out))
    return report


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_summary(report: dict[str, Any], out: Path) -> str:
    """A few lines for a person: data, macro AUROC with CI, per finding, extras."""
    model, onto, data = report["model"], report["ontology"], report["data"]
    lines = [
        f"Evaluated {data['n_images']} images ({data['n_skipped']} skipped) with "
        f"{model['name']} {model['version']} on ontology {onto['name']}@{onto['version']}",
    ]
    lo, hi = report.get("macro_auroc_ci") or [None, None]
    lines.append(
        f"macro AUROC {_fmt(report.get('macro_auroc'))} (95% CI {_fmt(lo)}-{_fmt(hi)}) over "
        f"{len(report.get('macro_findings') or [])} findings with >= {report.get('min_pos')} "
        "positives"
    )
    for name, r in (report.get("per_finding") or {}).items():
        f1 = (report.get("f1") or {}).get(name, {}).get("f1")
        lines.append(
            f"  {name:<20} AUROC {_fmt(r['auroc'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            f"  F1 {_fmt(f1)}  n_pos={r['n_pos']} n={r['n']}"
        )
    lines.append(f"ECE {_fmt(report.get('ece'))}; thresholds: {report.get('thresholds_source')}")
    faith = report.get("faithfulness")
    if faith:
        o = faith["overall"]
        ci = o.get("ratio_ci") or [None, None]
        lines.append(
            f"faithfulness: evidence drop {_fmt(o['evidence_drop'], 4)} vs random "
            f"{_fmt(o['random_drop'], 4)}, ratio {_fmt(o['ratio'], 2)} "
            f"[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}] over {o['n_pairs']} positive findings "
            f"(evidence ranked by {faith.get('evidence', 'attention')})"
        )
    for name, r in (report.get("zero_shot") or {}).items():
        lines.append(
            f"zero-shot {name} ({r['concept_id']}): AUROC {_fmt(r['auroc'])} "
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] n_pos={r['n_pos']} n={r['n']}"
        )
    loc = report.get("localisation")
    if loc and "overall" in loc:
        o = loc["overall"]
        lines.append(
            f"localisation: pointing {_fmt(o['pointing'])}, IoBB>0.1 {_fmt(o['iobb_0_1'])}, "
            f"IoBB>0.25 {_fmt(o['iobb_0_25'])} over {o['n']} boxed findings"
        )
    for note in report.get("notes") or []:
        lines.append(f"note: {note}")
    lines.append(f"report: {out / REPORT_FILE}, ROC curves: {out / ROC_FILE}")
    return "\n".join(lines)
