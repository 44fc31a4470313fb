"""Where an image's time goes in the in-process pipeline, stage by stage (a report, no target).

Loads the checkpoint as ``kgdx serve`` does (bundled default unless ``--checkpoint``), then
runs batches of the repository's sample radiographs through each stage of
:class:`service.pipeline.InferencePipeline` separately. It prints milliseconds per image for
decode, preprocess, forward, heat maps and evidence, ontology paths and the findings' JSON.
The paths are timed twice, on the warm cached finder and on the uncached walk the cache
replaced (``tests/kg/reference_paths.py``), on the same explanations.

Usage:
  python bench/pipeline_stages.py [--batch-size 16] [--batches 10] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLES = ROOT / "tests" / "data" / "samples"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="images per batch [16]")
    p.add_argument("--batches", type=int, default=10, help="timed batches, after 2 warm [10]")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: bundled)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.batches < 1:
        p.error("--batch-size and --batches must be >= 1")
    images = [(f.read_bytes(), f.name) for f in sorted(SAMPLES.glob("*.png"))]
    if not images:
        print(f"Error: no sample images in {SAMPLES}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kgdx-stages-") as home:
        os.environ["KGDX_HOME"] = home
        for var in ("KGDX_DB_URL", "KGDX_ONTOLOGY"):
            os.environ.pop(var, None)
        if args.checkpoint is not None:
            os.environ["KGDX_CHECKPOINT"] = str(args.checkpoint)
        figures = run(images, args.batch_size, args.batches)
    width = max(len(k) for k in figures["ms_per_image"])
    for stage, ms in figures["ms_per_image"].items():
        print(f"{stage:<{width}}  {ms:7.3f} ms an image")
    print(json.dumps(figures, sort_keys=True))
    return 0


def run(images: list[tuple[bytes, str]], batch_size: int, batches: int) -> dict[str, Any]:
    from kg.store import GraphStore
    from service.app import load_model
    from service.heap import freeze_startup_heap
    from service.metrics import Metrics
    from service.pipeline import (
        PredictOptions,
        decode,
        explain,
        finding_paths,
        findings_json,
        predict,
        preprocess,
    )
    from service.settings import Settings
    from service.state import AppState
    from tests.kg.reference_paths import ReferencePathFinder

    settings = Settings()
    state = AppState(settings=settings, metrics=Metrics(), store=GraphStore(settings.db_url))
    load_model(state)
    assert state.pipeline is not None and state.predictor is not None
    freeze_startup_heap()  # as the server's lifespan does
    predictor, finder = state.predictor, state.pipeline.finder
    walk = ReferencePathFinder(finder.graph)
    options = PredictOptions(
        top_k_paths=settings.top_k_paths,
        evidence_k=settings.evidence_k,
        max_hops=settings.max_path_hops,
    )
    total: dict[str, float] = defaultdict(float)
    counting = False

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if counting:
            total[stage] += time.perf_counter() - t0

    for b in range(batches + 2):
        counting = b >= 2  # two warm-up batches first
        picked = [images[(b * batch_size + i) % len(images)] for i in range(batch_size)]
        with timed("decode"):
            decoded = [decode(data, "image/png", name) for data, name in picked]
        with timed("preprocess"):
            batch, geometries = preprocess(predictor, decoded)
        with timed("forward"):
            output = predict(predictor, batch)
        with timed("heat maps and evidence"):
            explained = explain(predictor, output, geometries, options.evidence_k)
        for expl in explained:
            for stage, f in (("paths (cached)", finder), ("paths (walk, before)", walk)):
                with timed(stage):
                    paths = {
                        x.concept_id: finding_paths(
                            f, x, k=options.top_k_paths, max_hops=options.max_hops
                        )
                        for x in expl.findings
                    }
            with timed("findings JSON"):
                findings_json(expl, paths, options, None)
    n = batches * batch_size
    per_image = {stage: round(s / n * 1e3, 3) for stage, s in total.items()}
    per_image["in all (cached paths)"] = round(
        sum(v for k, v in per_image.items() if k != "paths (walk, before)"), 3
    )
    return {
        "batch_size": batch_size,
        "images": n,
        "checkpoint": str(predictor.checkpoint_dir),
        "ms_per_image": per_image,
    }


if __name__ == "__main__":
    sys.exit(main())
