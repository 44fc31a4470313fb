"""Training throughput: the KG model versus the same image backbone alone.

Both arms take full training steps (forward, masked BCE, backward, AdamW step) on the same
random batches, at the same backbone, image size and batch size; the steps are interleaved
(KG, bare, KG, bare, ...) so a machine shared with other work slows both alike. The KG model
is the one ``models/configs/default.toml`` describes (its ``[model]`` section), over the
bundled chest graph with random concept features (the text encoder only runs once, offline,
so it does not enter a step's cost). The bare arm is :class:`~models.image_encoder.
ImageEncoder` (backbone + 1x1 projection) + mean pool + one linear layer.

Prints images/s of each arm and their ratio; exits 1 when the KG model reaches less than
0.8x the bare backbone's throughput (the issue's target: entity embeddings once per step).

On a CPU shared with other processes the KG arm suffers more than the bare one: its many
small operations (GNN message passing, attention) each wait for both OpenMP threads, and a
busy core makes every wait a scheduler slice. Compare with ``--threads 1`` there: it shows
the arithmetic overhead without the synchronisation cost.

    python bench/train_speed.py [--backbone densenet121] [--image-size 128] [--batch-size 32]
                                [--steps 20] [--device auto]
                                [--compile none|default|reduce-overhead]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kg.tensors import to_arrays  # noqa: E402
from models.builder import build_model, load_graph, map_targets, model_config  # noqa: E402
from models.data import NIH_FINDINGS  # noqa: E402
from models.image_encoder import ImageEncoder, ImageEncoderConfig  # noqa: E402
from models.inference import amp_dtype  # noqa: E402
from models.losses import masked_bce  # noqa: E402
from models.train_config import load_training_config  # noqa: E402

TARGET_RATIO = 0.8
DEFAULT_CONFIG = ROOT / "models" / "configs" / "default.toml"


class BareClassifier(nn.Module):
    """The image encoder alone with a linear head: what the KG model is measured against."""

    def __init__(self, config: ImageEncoderConfig, num_findings: int):
        super().__init__()
        self.encoder = ImageEncoder(config)
        self.head = nn.Linear(config.out_dim, num_findings)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images).tokens  # (B, P, D)
        return self.head(tokens.mean(1))  # (B, K)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model settings")
    parser.add_argument("--backbone", default=None, help="override model.image.backbone")
    parser.add_argument("--image-size", type=int, default=None, help="override the input size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per arm")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )
    parser.add_argument(
        "--compile",
        default="none",
        choices=("none", "default", "reduce-overhead"),
        help="torch.compile both arms with this mode (reduce-overhead: CUDA graphs)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    overrides = []
    if args.backbone:
        overrides.append(f'model.image.backbone="{args.backbone}"')
    if args.image_size:
        overrides.append(f"model.image.image_size={args.image_size}")
    cfg = load_training_config(args.config, overrides, check_files=False)
    torch.manual_seed(0)
    ontology = load_graph(cfg.ontology.spec)
    targets = list(map_targets(ontology, NIH_FINDINGS, cfg.ontology.label_map).values())
    arrays = to_arrays(ontology)
    features = torch.nn.functional.normalize(torch.randn(arrays.num_nodes, 384), dim=-1)
    kg_config = model_config(cfg.model, targets, 384, use_kg=True)
    kg = build_model(kg_config, arrays, features).to(device).train()
    bare = BareClassifier(kg_config.image, len(targets)).to(device).train()
    cuda = device.type == "cuda"
    if cuda:  # as models.trainer does on CUDA: channels_last, autocast, TF32
        kg = kg.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        bare = bare.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_kg: nn.Module = kg
    run_bare: nn.Module = bare
    if args.compile != "none":
        run_kg = torch.compile(kg, mode=args.compile)  # type: ignore[assignment]
        run_bare = torch.compile(bare, mode=args.compile)  # type: ignore[assignment]

    def autocast() -> contextlib.AbstractContextManager[object]:
        dtype = amp_dtype(device)  # bf16, or fp16 where the GPU lacks it, as the trainer
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    size = kg_config.image.image_size
    b, k = args.batch_size, len(targets)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 1, size, size, generator=g).to(device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, k, generator=g) < 0.2).float().to(device)
    m = torch.ones(b, k, device=device)
    opt_kg = torch.optim.AdamW(kg.parameters(), lr=1e-4)
    opt_bare = torch.optim.AdamW(bare.parameters(), lr=1e-4)

    def step_kg() -> None:
        opt_kg.zero_grad(set_to_none=True)
        with autocast():
            loss = masked_bce(run_kg(x).logits, y, m)  # one GNN pass for the whole batch
        loss.backward()
        opt_kg.step()

    def step_bare() -> None:
        opt_bare.zero_grad(set_to_none=True)
        with autocast():
            loss = masked_bce(run_bare(x), y, m)
        loss.backward()
        opt_bare.step()

    wall: dict[str, list[float]] = {"kg": [], "bare": []}
    cpu: dict[str, list[float]] = {"kg": [], "bare": []}
    for i in range(args.warmup + args.steps):
        for name, step in (("kg", step_kg), ("bare", step_bare)):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    kg_ips = b / statistics.median(wall["kg"])
    bare_ips = b / statistics.median(wall["bare"])
    ratio = kg_ips / bare_ips
    cpu_ratio = statistics.median(cpu["bare"]) / statistics.median(cpu["kg"])
    n_kg = sum(p.numel() for p in kg.parameters())
    n_bare = sum(p.numel() for p in bare.parameters())
    print(
        f"device {device}, backbone {kg_config.image.backbone}, {size} px, batch {b}, "
        f"{args.steps} timed steps per arm (median), {torch.get_num_threads()} CPU thread(s), "
        f"{f'{amp_dtype(device)} autocast, channels_last' if cuda else 'float32'}, "
        f"compile {args.compile}"
    )
    print(f"KG model      {kg_ips:8.1f} images/s  ({n_kg / 1e6:.2f} M parameters)")
    print(f"backbone only {bare_ips:8.1f} images/s  ({n_bare / 1e6:.2f} M parameters)")
    if device.type == "cpu":
        # on a machine shared with other work, wall time swings; CPU time per step does not
        print(f"CPU-time ratio {cpu_ratio:.3f} (process CPU seconds per step, bare / KG)")
    verdict = "ok" if ratio >= TARGET_RATIO else "MISS"
    print(f"ratio {ratio:.3f} (target >= {TARGET_RATIO}): {verdict}")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
