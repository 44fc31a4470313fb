"""GPU inference check: throughput and latency of a checkpoint with AMP, per batch size.

Loads the default checkpoint (or ``--checkpoint DIR``; ``--random-init``, or a missing default
checkpoint, builds the default model config over the bundled graph with random weights and
features instead),
then times :meth:`models.inference.Predictor.predict` (``--evidence attention``, the default
here: inference mode, autocast bf16/fp16, the outputs copied back to the CPU, as the service
does by default; ``--evidence attribution``, as with ``KGDX_EVIDENCE=attribution``, adds
the evidence attribution's backward pass through fusion and decoder, in float32) on random
inputs at the model's image size for batch sizes 1 / 8 / 32 / 128. Prints images/s, p50 /
p99 latency per batch and peak GPU memory per batch size, and a JSON line with the same
figures.

Without CUDA it prints a note, times batch 1 and 8 on the CPU for reference, and exits 0.
Bounded to about three minutes on an H100: each batch size stops after ``--max-seconds``.

Usage: python bench/gpu_check.py [--checkpoint DIR | --random-init] [--iters 50]
       [--batch-sizes 1,8,32,128] [--max-seconds 20] [--device auto|cpu|cuda]
       [--evidence attention|attribution]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models.errors import ModelError  # noqa: E402
from models.inference import EVIDENCE_METHODS, Predictor, amp_dtype, pick_device  # noqa: E402

CPU_BATCH_SIZES = (1, 8)
CPU_ITERS = 5


def random_predictor(device: torch.device) -> Predictor:
    """The default model config over the bundled graph, random weights and concept features
    (no text encoder needed): same shapes and compute as a trained default model."""
    from kg.bundled import bundled_label_map_path, bundled_ontology_path
    from kg.loaders import load_ontology
    from kg.mapping import map_labels, require_all
    from kg.tensors import to_arrays
    from models.config import KgdxModelConfig
    from models.data import NIH_FINDINGS
    from models.model import KgdxModel

    ontology = load_ontology(bundled_ontology_path())
    mapped = require_all(map_labels(list(NIH_FINDINGS), ontology, bundled_label_map_path()))
    labels = {name: mapped.resolved[name] for name in NIH_FINDINGS}
    config = KgdxModelConfig(targets=list(labels.values()))
    arrays = to_arrays(ontology)
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(arrays.num_nodes, config.gnn.in_dim), dim=-1
    )
    model = KgdxModel(config, arrays, features).to(device).eval()
    model.info = {"model_name": config.name, "labels": labels}
    return Predictor(
        model,
        arrays,
        ontology_name=ontology.name,
        ontology_version=ontology.content_hash(),
        device=device,
        model_version="random-init",
    )


def time_batch(
    predictor: Predictor, batch_size: int, iters: int, warmup: int, max_seconds: float
) -> dict[str, Any]:
    """Latency of ``predict`` on one random batch already on the device."""
    device = predictor.device
    size = predictor.image_size
    x = torch.randn(batch_size, 1, size, size, device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        predictor.predict(x)
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        predictor.predict(x)  # returns CPU tensors: includes the device sync
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > max_seconds:
            break
    ms = np.array(times) * 1e3
    out: dict[str, Any] = {
        "batch_size": batch_size,
        "iters": len(times),
        "images_per_s": round(batch_size * len(times) / float(np.sum(times)), 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }
    if cuda:
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder")
    parser.add_argument(
        "--random-init", action="store_true", help="time the default model with random weights"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--iters", type=int, default=50, help="timed forwards per batch size")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per batch size")
    parser.add_argument(
        "--evidence",
        choices=EVIDENCE_METHODS,
        default="attention",
        help="how predict ranks evidence: attention (AMP inference only, the default here) or "
        "attribution (adds a float32 backward pass through fusion and decoder)",
    )
    args = parser.parse_args(argv)

    try:
        device = pick_device(args.device)
    except ModelError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    cuda = device.type == "cuda"
    if not cuda:
        print("note: CUDA is not available; timing the CPU at batch 1 and 8 for reference only")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    random_init = args.random_init
    if not random_init and args.checkpoint is None:
        from models.default_checkpoint import default_checkpoint_dir

        if not (default_checkpoint_dir() / "checkpoint.json").is_file():
            print(
                f"note: no default checkpoint at {default_checkpoint_dir()}; timing the default "
                "model with random weights instead (same compute as a trained default model "
                "only if the default training config keeps the default model config)"
            )
            random_init = True
    try:
        if random_init:
            predictor = random_predictor(device)
        else:
            predictor = Predictor.load(args.checkpoint, device=device)
    except ModelError as e:
        print(
            f"Error: {e} (or pass --random-init to time the default model untrained)",
            file=sys.stderr,
        )
        return 1
    load_s = time.perf_counter() - t0
    predictor.evidence = args.evidence
    cfg = predictor.config
    dtype = amp_dtype(device)
    header = {
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "amp": str(dtype).replace("torch.", "") if dtype else "off (fp32)",
        "evidence": args.evidence,
        "model": f"{predictor.model_name} {predictor.model_version}",
        "backbone": cfg.image.backbone,
        "image_size": predictor.image_size,
        "entities": predictor.model.num_entities,
        "findings": len(predictor.targets),
        "load_s": round(load_s, 2),
    }
    print(" ".join(f"{k}={v}" for k, v in header.items()))

    if cuda:
        sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
        iters, warmup = args.iters, args.warmup
    else:
        sizes, iters, warmup = list(CPU_BATCH_SIZES), CPU_ITERS, 1
    rows: list[dict[str, Any]] = []
    print(f"{'batch':>6} {'img/s':>10} {'p50 ms':>10} {'p99 ms':>10} {'peak MiB':>10}")
    for bs in sizes:
        try:
            row = time_batch(predictor, bs, iters, warmup, args.max_seconds)
        except torch.cuda.OutOfMemoryError:
            row = {"batch_size": bs, "error": "out of GPU memory"}
            torch.cuda.empty_cache()
        rows.append(row)
        if "error" in row:
            print(f"{bs:>6} {row['error']}")
            continue
        peak = row.get("peak_gpu_mib", "-")
        print(
            f"{bs:>6} {row['images_per_s']:>10} {row['p50_ms']:>10} {row['p99_ms']:>10} {peak:>10}"
        )
    print(json.dumps({**header, "results": rows, "cuda": cuda}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
