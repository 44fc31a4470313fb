"""Service benchmark: ``kgdx serve`` over HTTP against the same pipeline in-process.

Everything runs on this machine, on loopback (127.0.0.1), bounded in requests and seconds; it
stops by itself, prints a table and a final JSON line, and exits 1 when a target is missed.

Targets (issue 4):
  HTTP throughput / in-process throughput at saturation            >= 0.9
  per-request HTTP + queue overhead at low load, p50               <= 2 ms
Reported, not gated: dynamic batching / batch size 1 at 16 clients (aim >= 1.3 on 2 CPUs),
p50 / p99 latency, peak RSS of the server process. With the tiny checkpoint the throughput
ratio is reported but not gated: its forward pass takes a few milliseconds, so the ratio
measures the HTTP stack alone rather than the service's share of a real model's work.

Definitions:
  in-process   decode -> preprocess -> forward -> explain (+ ontology paths) in this process,
               one stage after another on one thread: images decoded one by one, then
               ``InferencePipeline.run_batch`` (preprocess included) on batches of
               ``max_batch_size``; the start-up heap frozen out of the garbage collector's
               full passes, as the server's lifespan does (service.heap). The server runs
               the same stages, but decodes and preprocesses each request on its decode
               threads (service.pipeline.decode_prepared) while the batch before it is in
               the model, so its worker starts each batch at the forward pass.
  HTTP         ``POST /v1/predict`` (multipart PNG, API key) to a ``kgdx serve`` subprocess,
               over ``--concurrency`` keep-alive connections of a lean load generator
               (requests encoded once, as wrk does: the client shares the 2 cores with the
               server, and httpx would take about 1 ms of CPU per request from it);
               throughput counts 200s.
  overhead     at concurrency 1: the client-observed latency (request sent -> whole response
               read) minus the server's own ``timings.decode_ms + inference_ms +
               explain_ms`` from the response. It holds the HTTP stack (parsing, multipart,
               auth, middleware, JSON), the queue wait (including the batcher's
               ``max_wait_ms`` window), the response envelope (``respond``; the findings'
               JSON is built and encoded by the batch worker after the paths, as
               ``kgdx predict`` builds it, and counts in ``explain_ms``, in-process too),
               the thumbnail and the result/audit writes, and the loopback round trip.
  batching     throughput at 16 clients of the server with the configured
               ``max_batch_size`` over a second server with ``max_batch_size 1``.

The machine may be shared and noisy: the in-process and HTTP measurements are interleaved
over ``--rounds`` rounds, each server is warmed up first, and the best round of each is
compared. Two servers run side by side (batched and batch size 1); only one is loaded at a
time.

Checkpoint: ``--checkpoint DIR``; else the bundled default (``models/data/default/``) when it
exists; else (or with ``--tiny``) a tiny checkpoint built in a temporary ``$KGDX_HOME`` like
the service tests'. Each run uses its own temporary ``$KGDX_HOME`` (SQLite, API key).

Usage:
  python bench/serve_bench.py                 # default checkpoint if present, else tiny
  python bench/serve_bench.py --tiny --requests 300 --seconds 5 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLES = ROOT / "tests" / "data" / "samples"

TARGETS = {"http_over_inprocess": 0.9, "overhead_p50_ms": 2.0}
AIMS = {"batching_ratio": 1.3}  # reported, not gated
BATCHING_CLIENTS = 16
READY_TIMEOUT_S = 240.0  # the real checkpoint may compute its concept features on first start
START = time.monotonic()


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Load:
    """One load phase against one server (or the in-process pipeline)."""

    ok: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    overheads_ms: list[float] = field(default_factory=list)  # latency - server compute
    queue_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Setup: checkpoint, home, key
# ---------------------------------------------------------------------------------------------


def build_tiny_checkpoint(tmp: Path, home: Path) -> Path:
    """The service tests' tiny model (6-concept ontology, 32 px), saved under ``tmp``."""
    from dataclasses import replace

    import torch

    from kg.tensors import to_arrays
    from tests.models.conftest import IN_DIM, tiny_config, tiny_ontology
    from tests.models.tiny_checkpoint import save_tiny, store_ontology, tiny_model

    ontology = tiny_ontology()
    arrays = to_arrays(ontology)
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(arrays.num_nodes, IN_DIM, generator=g), dim=-1
    )
    version = store_ontology(ontology, features, home)
    model = tiny_model(arrays, features, config=replace(tiny_config(), text_dim=384))
    return save_tiny(tmp / "tiny-checkpoint", model, version, name=ontology.name)


def create_key() -> str:
    """A ``predict`` API key in the current ``$KGDX_HOME`` database."""
    from service.apikeys import ApiKeyStore
    from service.db import ServiceDatabase

    with ServiceDatabase() as db:
        db.create_all()
        return ApiKeyStore(db).create("serve-bench", ["predict"])[1]


def multipart(image: bytes, name: str) -> tuple[bytes, str]:
    """A predict request's body and Content-Type, encoded once (httpx's own encoder)."""
    import httpx

    request = httpx.Request("POST", "http://x/", files={"file": (name, image, "image/png")})
    return request.read(), request.headers["Content-Type"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------------------------


class Server:
    """``kgdx serve`` as a subprocess on a free loopback port, its RSS sampled by psutil."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        cmd = [sys.executable, "-c", "from service.cli import main; main()", "serve"]
        self.proc = subprocess.Popen(
            [*cmd, "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.peak_rss = 0
        self._stop_sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        import psutil

        try:
            process = psutil.Process(self.proc.pid)
            while not self._stop_sampling.wait(0.05):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
        except psutil.Error:
            pass

    def _high_water_mark(self) -> int:
        """The kernel's peak RSS (VmHWM) for the process, 0 where /proc lacks it."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: kgdx serve exited {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: not ready after {timeout_s:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> int | None:
        """SIGTERM (graceful drain), then kill after 30 s; returns the exit code."""
        self.peak_rss = max(self.peak_rss, self._high_water_mark())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stop_sampling.set()
        self._sampler.join(2)
        self._log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# Loads
# ---------------------------------------------------------------------------------------------


class RawClient:
    """One keep-alive HTTP/1.1 connection that sends pre-encoded requests.

    The load generator shares the server's CPU, so it must cost little: each request is
    encoded once (headers and multipart body as bytes) and a response is read as a status
    line, headers and ``Content-Length`` bytes, as wrk or hey would. httpx costs about a
    millisecond of CPU per request here, which on 2 cores is taken from the server.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(
            (k.strip().lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])
        )
        if "content-length" not in headers:
            raise ConnectionError(f"response without Content-Length (status {status})")
        body = await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


def encode_request(url: str, key: str, body: bytes, content_type: str) -> bytes:
    """``POST /v1/predict`` as the bytes on the wire."""
    host = url.split("://", 1)[1]
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def http_load(
    url: str,
    key: str,
    bodies: list[tuple[bytes, str]],
    *,
    concurrency: int,
    requests: int,
    seconds: float,
    parse: bool = False,
) -> Load:
    """``requests`` predict calls (or as many as ``seconds`` allow) from ``concurrency``
    keep-alive connections; with ``parse``, each response's server timings are read for the
    overhead."""
    load = Load()
    issued = 0
    raws = [encode_request(url, key, body, ctype) for body, ctype in bodies]
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    clients = [RawClient(host, int(port)) for _ in range(concurrency)]
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(client: RawClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            raw = raws[issued % len(raws)]
            issued += 1
            t0 = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(client.request(raw), 120)
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                load.errors[type(e).__name__] += 1
                await client.close()
                continue
            latency = (time.perf_counter() - t0) * 1e3
            if status != 200:
                load.errors[str(status)] += 1
                continue
            load.ok += 1
            load.latencies_ms.append(latency)
            if parse:
                timings = json.loads(body)["timings"]
                server = timings["decode_ms"] + timings["inference_ms"] + timings["explain_ms"]
                load.overheads_ms.append(latency - server)
                load.queue_ms.append(timings["queue_ms"])

    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        load.elapsed_s = time.perf_counter() - start
        for c in clients:
            await c.close()
    return load


def inprocess_load(
    pipeline: Any,
    options: Any,
    images: list[tuple[bytes, str]],
    *,
    batch_size: int,
    requests: int,
    seconds: float,
) -> Load:
    """decode -> run_batch over ``requests`` images in batches of ``batch_size``."""
    from service.pipeline import PredictRequest, decode

    load = Load()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while done < requests and time.perf_counter() < deadline:
        n = min(batch_size, requests - done)
        t0 = time.perf_counter()
        batch = []
        for i in range(done, done + n):
            data, name = images[i % len(images)]
            batch.append(PredictRequest(decode(data, "image/png", name), None, options))
        results = pipeline.run_batch(batch)
        assert len(results) == n and all(r.explanation.findings for r in results)
        load.latencies_ms.extend([(time.perf_counter() - t0) * 1e3] * n)
        done += n
    load.ok = done
    load.elapsed_s = time.perf_counter() - start
    return load


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=400, help="most requests per phase [400]")
    p.add_argument("--seconds", type=float, default=6.0, help="most seconds per phase [6]")
    p.add_argument(
        "--concurrency", type=int, default=32, help="clients at saturation [32] (2x batch)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best taken [3]")
    p.add_argument("--tiny", action="store_true", help="a tiny checkpoint built on the fly")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: bundled)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda [auto]")
    p.add_argument("--max-batch-size", type=int, default=16, help="server batch size [16]")
    p.add_argument(
        "--max-wait-ms", type=float, default=None, help="server batch window [service default]"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads, here and in the servers [torch's default]",
    )
    p.add_argument("--budget-s", type=float, default=170.0, help="stop new rounds after [170]")
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "rounds", "max_batch_size", "threads"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.seconds > 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    if args.tiny and args.checkpoint:
        p.error("give --tiny or --checkpoint, not both")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    if args.threads is not None:
        # before torch is imported: the servers inherit it, this process sets it below too
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    from models.checkpoint import INFO_FILE
    from models.default_checkpoint import default_checkpoint_dir

    checkpoint: Path | None = args.checkpoint
    kind = "given"
    if checkpoint is None and not args.tiny:
        if (default_checkpoint_dir() / INFO_FILE).is_file():
            checkpoint, kind = default_checkpoint_dir(), "default"
        else:
            print(f"no default checkpoint at {default_checkpoint_dir()}: using --tiny")
            args.tiny = True
    images = [(p.read_bytes(), p.name) for p in sorted(SAMPLES.glob("*.png"))]
    if not images:
        print(f"Error: no sample images in {SAMPLES}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="kgdx-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        home.mkdir()
        os.environ["KGDX_HOME"] = str(home)
        for var in ("KGDX_DB_URL", "KGDX_ONTOLOGY", "KGDX_CHECKPOINT", "KGDX_NO_AUTH"):
            os.environ.pop(var, None)
        if args.tiny:
            checkpoint, kind = build_tiny_checkpoint(tmp, home), "tiny"
        assert checkpoint is not None
        os.environ["KGDX_CHECKPOINT"] = str(checkpoint)
        key = create_key()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "KGDX_DRAIN_TIMEOUT_S": "20"}
        common = ["--device", args.device]
        if args.max_wait_ms is not None:
            common += ["--max-wait-ms", str(args.max_wait_ms)]
        print(f"checkpoint: {kind} ({checkpoint}); samples: {len(images)} from {SAMPLES}")
        batched = Server(
            "batched", [*common, "--max-batch-size", str(args.max_batch_size)], env, tmp / "a.log"
        )
        servers = [batched]
        try:
            batched.wait_ready()  # first, alone: it stores the ontology and feature cache
            single = Server("batch1", [*common, "--max-batch-size", "1"], env, tmp / "b.log")
            servers.append(single)
            figures = run_phases(args, images, key, batched, single)
        finally:
            exits = {s.name: s.stop() for s in servers}
        figures["server_exit"] = exits
        figures["peak_rss_mb"] = round(batched.peak_rss / 2**20, 1)
        figures["peak_rss_mb_batch1"] = round(servers[-1].peak_rss / 2**20, 1)
    figures["checkpoint"] = kind
    figures["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    figures["wall_s"] = round(time.monotonic() - began, 1)
    return report(figures)


def run_phases(
    args: argparse.Namespace,
    images: list[tuple[bytes, str]],
    key: str,
    batched: Server,
    single: Server,
) -> dict[str, Any]:
    import torch

    from kg.store import GraphStore
    from service.app import load_model
    from service.heap import freeze_startup_heap
    from service.metrics import Metrics
    from service.pipeline import PredictOptions
    from service.settings import Settings
    from service.state import AppState

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # the in-process pipeline, loaded like `kgdx predict` while the second server starts
    settings = Settings(device=args.device)
    state = AppState(settings=settings, metrics=Metrics(), store=GraphStore(settings.db_url))
    load_model(state)
    assert state.pipeline is not None and state.predictor is not None
    pipeline = state.pipeline
    freeze_startup_heap()  # as the server's lifespan does once its model is loaded
    options = PredictOptions(
        top_k_paths=settings.top_k_paths,
        evidence_k=settings.evidence_k,
        max_hops=settings.max_path_hops,
    )
    single.wait_ready()
    bodies = [multipart(data, name) for data, name in images]
    n, secs, c = args.requests, args.seconds, args.concurrency
    bs = args.max_batch_size

    def http(server: Server, clients: int, requests: int, parse: bool = False) -> Load:
        load = asyncio.run(
            http_load(
                server.url,
                key,
                bodies,
                concurrency=clients,
                requests=requests,
                seconds=secs,
                parse=parse,
            )
        )
        if load.errors:
            raise RuntimeError(f"{server.name}: failed requests {dict(load.errors)}")
        return load

    # warm-up: first batches allocate, first requests open the databases
    inprocess_load(pipeline, options, images, batch_size=bs, requests=2 * bs, seconds=secs)
    http(batched, c, 2 * c)
    http(single, BATCHING_CLIENTS, BATCHING_CLIENTS)

    rounds: list[dict[str, Load]] = []
    for r in range(args.rounds):
        if r and time.monotonic() - START > args.budget_s:
            print(f"time budget reached: {r} round(s)")
            break
        row = {
            "inprocess": inprocess_load(
                pipeline, options, images, batch_size=bs, requests=n, seconds=secs
            ),
            "http": http(batched, c, n),
            "batched16": http(batched, BATCHING_CLIENTS, n),
            "batch1_16": http(single, BATCHING_CLIENTS, n),
        }
        rounds.append(row)
        print(
            f"round {r + 1}: in-process {row['inprocess'].rps:7.1f}/s  "
            f"HTTP {row['http'].rps:7.1f}/s"
            f"  16 clients: batched {row['batched16'].rps:7.1f}/s, "
            f"batch 1 {row['batch1_16'].rps:7.1f}/s"
        )
    low = http(batched, 1, min(n, 200), parse=True)

    def best(name: str) -> Load:
        return max((row[name] for row in rounds), key=lambda load: load.rps)

    inproc, sat, b16, s16 = best("inprocess"), best("http"), best("batched16"), best("batch1_16")
    return {
        "device": str(state.predictor.device),
        "torch_threads": torch.get_num_threads(),
        "rounds": len(rounds),
        "requests_per_phase": n,
        "concurrency": c,
        "max_batch_size": bs,
        "max_wait_ms": settings.max_wait_ms if args.max_wait_ms is None else args.max_wait_ms,
        "inprocess_rps": round(inproc.rps, 2),
        "http_rps": round(sat.rps, 2),
        "http_over_inprocess": round(sat.rps / inproc.rps, 3),
        "ratio_per_round": [round(row["http"].rps / row["inprocess"].rps, 3) for row in rounds],
        "http_p50_ms": round(percentile(sat.latencies_ms, 50), 2),
        "http_p99_ms": round(percentile(sat.latencies_ms, 99), 2),
        "low_load_p50_ms": round(percentile(low.latencies_ms, 50), 2),
        "low_load_p99_ms": round(percentile(low.latencies_ms, 99), 2),
        "overhead_p50_ms": round(percentile(low.overheads_ms, 50), 3),
        "overhead_p99_ms": round(percentile(low.overheads_ms, 99), 3),
        "low_load_queue_p50_ms": round(percentile(low.queue_ms, 50), 3),
        "low_load_requests": low.ok,
        "batched16_rps": round(b16.rps, 2),
        "batch1_16_rps": round(s16.rps, 2),
        "batching_ratio": round(b16.rps / s16.rps, 3),
        "batched16_p50_ms": round(percentile(b16.latencies_ms, 50), 2),
        "batch1_16_p50_ms": round(percentile(s16.latencies_ms, 50), 2),
        "ok_requests": sum(load.ok for row in rounds for load in row.values()) + low.ok,
        "mean_round_ratio": round(
            statistics.fmean(row["http"].rps / row["inprocess"].rps for row in rounds), 3
        ),
    }


def report(f: dict[str, Any]) -> int:
    misses = []
    gate_ratio = f["checkpoint"] != "tiny"
    if gate_ratio and f["http_over_inprocess"] < TARGETS["http_over_inprocess"]:
        misses.append("http_over_inprocess")
    if f["overhead_p50_ms"] > TARGETS["overhead_p50_ms"]:
        misses.append("overhead_p50_ms")
    rows = [
        (
            "checkpoint / device / threads",
            f"{f['checkpoint']} / {f['device']} / {f['torch_threads']} "
            f"(cpus {os.cpu_count()}, load average {f['load_avg'][0]} -> {f['load_avg'][1]})",
            "",
        ),
        ("in-process pipeline (batched)", f"{f['inprocess_rps']:.1f} img/s", ""),
        (f"HTTP at saturation ({f['concurrency']} clients)", f"{f['http_rps']:.1f} req/s", ""),
        (
            "HTTP / in-process",
            f"{f['http_over_inprocess']:.3f} (rounds {f['ratio_per_round']})",
            f">= {TARGETS['http_over_inprocess']}"
            + ("" if gate_ratio else "; not gated with the tiny model"),
        ),
        ("latency at saturation p50 / p99", f"{f['http_p50_ms']} / {f['http_p99_ms']} ms", ""),
        (
            "latency at 1 client p50 / p99",
            f"{f['low_load_p50_ms']} / {f['low_load_p99_ms']} ms",
            "",
        ),
        (
            "HTTP + queue overhead p50 (p99)",
            f"{f['overhead_p50_ms']} ({f['overhead_p99_ms']}) ms, of which queue "
            f"{f['low_load_queue_p50_ms']} ms",
            f"<= {TARGETS['overhead_p50_ms']} ms",
        ),
        (
            f"16 clients: batch {f['max_batch_size']} / batch 1",
            f"{f['batched16_rps']:.1f} / {f['batch1_16_rps']:.1f} req/s = "
            f"{f['batching_ratio']:.2f}x",
            f"aim >= {AIMS['batching_ratio']} (not gated)",
        ),
        (
            "peak RSS of the server",
            f"{f['peak_rss_mb']} MB (batch 1: {f['peak_rss_mb_batch1']})",
            "",
        ),
        ("server exit codes after SIGTERM", str(f["server_exit"]), ""),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, target in rows:
        print(f"{name:<{width}}  {value}{'  [' + target + ']' if target else ''}")
    for miss in misses:
        print(f"MISS: {miss} = {f[miss]} (target {TARGETS[miss]})")
    f["targets"] = TARGETS
    f["gated"] = ["overhead_p50_ms", *(["http_over_inprocess"] if gate_ratio else [])]
    f["misses"] = misses
    f["pass"] = not misses
    print(json.dumps(f, sort_keys=True))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
