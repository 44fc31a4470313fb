"""``kgdx train`` and ``kgdx evaluate``: thin shells over :mod:`models.trainer` and
:mod:`models.evaluate`, mounted on the ``kgdx`` root by :mod:`service.cli`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kg.console import USER_ERRORS, handle_errors, print_json, progress_enabled
from models.errors import ModelError

if ModelError not in USER_ERRORS:
    USER_ERRORS.append(ModelError)

QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or epoch lines.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


@handle_errors
def train(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="Training config (TOML: data, ontology, model, preprocess, train tables).",
        ),
    ],
    no_kg: Annotated[
        bool,
        typer.Option(
            "--no-kg", help="Ablation: free label embeddings instead of the ontology GNN."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (default: train.out, else runs/<name>)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run saved in OUT/state.")
    ] = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Missing or unreadable images are fatal.")
    ] = False,
    max_minutes: Annotated[
        float | None,
        typer.Option("--max-minutes", help="Time budget (overrides train.max_minutes)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a config value, e.g. --set train.epochs=2 (repeatable).",
        ),
    ] = None,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a model from a TOML config; the best epoch's checkpoint goes to OUT.

    Config errors (unknown keys, missing files, unmapped labels, empty splits) stop before
    training. Unreadable images are skipped and listed unless --strict. A NaN loss stops
    the run and keeps the last good checkpoint. Retrain the bundled checkpoint with
    `kgdx train --config models/configs/default.toml`.

    Example: kgdx train --config models/configs/default.toml --out runs/default --no-kg
    """
    from models.train_config import load_training_config
    from models.trainer import train_model

    overrides = list(set_ or [])
    if max_minutes is not None:
        overrides.append(f"train.max_minutes={max_minutes}")
    cfg = load_training_config(config, overrides)

    def echo(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    result = train_model(
        cfg,
        out,
        no_kg=no_kg,
        resume=resume,
        strict=strict,
        progress=progress_enabled(quiet),
        echo=echo,
    )
    if json:
        print_json(result.as_dict())
        return
    if result.best_epoch is None:
        typer.echo(f"no checkpoint written ({result.stopped}); log: {result.log_path}")
        return
    shown = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    typer.echo(
        f"{result.stopped} after {result.epochs_run} epoch(s) in {result.seconds / 60:.1f} min; "
        f"best {result.monitor} {shown} at epoch {result.best_epoch}"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    if result.stopped in ("time budget", "stop_after_epochs"):
        typer.echo(f"resume with: kgdx train --config {config} --out {result.out_dir} --resume")
    if result.skipped:
        typer.echo(
            f"skipped {len(result.skipped)} image(s); see data.skipped_images in checkpoint.json",
            file=sys.stderr,
        )


@handle_errors
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Labels CSV (cxr labels.csv format).")],
    images: Annotated[Path, typer.Option("--images", help="Folder the image column names.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where report.json and roc.png go.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", help="Checkpoint folder (default: the bundled one)."),
    ] = None,
    boxes: Annotated[
        Path | None,
        typer.Option("--boxes", help="BBox_List_2017.csv(.gz): score heat-map localisation."),
    ] = None,
    faithfulness: Annotated[
        bool, typer.Option("--faithfulness", help="Run the evidence deletion test.")
    ] = False,
    evidence: Annotated[
        str,
        typer.Option(
            "--evidence",
            help="Rank evidence by 'attribution' (default: each concept's first-order effect "
            "on the finding) or 'attention' (the fusion attention).",
        ),
    ] = "attribution",
    split: Annotated[
        str | None, typer.Option("--split", help="Only rows whose split column is NAME.")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N rows.")] = None,
    quiet: QuietOpt = False,
    json: JsonOpt = False,
) -> None:
    """Evaluate a checkpoint on labelled images: report.json (AUROC with CIs) and roc.png.

    Example: kgdx evaluate --data cxr/labels.csv --images cxr/images --split val --out runs/eval
    """
    from models.evaluate import run_evaluation

    run_evaluation(
        data=data,
        images=images,
        out=out,
        checkpoint=checkpoint,
        boxes=boxes,
        faithfulness=faithfulness,
        evidence=evidence,
        split=split,
        limit=limit,
        quiet=quiet,
        json=json,
    )
