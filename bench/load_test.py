"""Load and soak test: ``kgdx serve`` at and beyond saturation, ``/v1/predict`` and STOW-RS.

Everything runs on this machine, on loopback (127.0.0.1), bounded in requests
(``--max-requests``) and minutes (``--minutes``); it stops by itself, prints a table and a
final JSON line, and exits 1 with a one-line reason (``FAIL: ...`` on stderr) when a check
fails.

What it does:

1. starts a real ``kgdx serve`` subprocess (:class:`tests.kgdx_server.KgdxServer`) in a
   temporary ``$KGDX_HOME`` with an API key (scopes ``ingest`` and ``predict``), a small
   inference queue (``KGDX_MAX_QUEUE``, default = the batch size) so that saturation is
   answered by 503 backpressure, and the study worker on (``KGDX_STABLE_SECONDS``), so
   the stored studies are scored by the same batcher while the load runs;
2. **warm-up** (``--warmup-s``) at the highest concurrency level, not measured, and on
   until a study sent by STOW-RS has been scored (every path, the study worker's too, has run);
3. **ramp**: one phase per concurrency level, ``--levels`` times the batch size (default
   1x, 2x and 4x: at saturation and beyond), ``--minutes`` shared equally between them.
   Each client loops: ``POST /v1/predict`` with a real radiograph from
   ``tests/data/samples`` (PNG, or the same pixels as a DICOM DX file), or, with
   probability ``--stow-fraction``, ``POST /dicomweb/studies`` (STOW-RS,
   ``multipart/related; type="application/dicom"``) of a new study of
   ``--stow-instances`` DX instances made with pydicom from the samples, each with unique
   Study, Series and SOP Instance UIDs. A 503 must carry ``Retry-After``; the client waits
   that long and sends the request again (up to ``--retries`` times, within the phase),
   and both the 503s and the retries are counted;
4. **verification** (not timed): every predict answered 200 is fetched back by
   ``GET /v1/results/{id}``; every instance a STOW answer acknowledged (ReferencedSOPSequence,
   0008,1199) is listed by ``GET /v1/studies/{uid}``.

Printed, per phase and in total: requests, throughput (2xx/s), p50 / p99 latency of the
2xx answers (per attempt: request sent -> whole answer read), counts by status per route,
503 retries; the RSS of the server process and its children (psutil) after the warm-up
("start"), at the end of each phase and at the end, its growth, and the peak (sampled
every 0.25 s).

Checks (exit 1 when any fails; the reasons of all that failed are listed):

- no 5xx other than 503, on any route, including the verification reads;
- no lost request: every request got an answer (a connection error or a client timeout,
  ``--timeout-s``, counts as lost; idle connections are dropped by the client after 2 s,
  before uvicorn's 5 s keep-alive timeout, so a request never races the server closing
  its connection); every 200 predict result can be read back; every
  acknowledged STOW instance is stored; a STOW answered 200 acknowledges every instance
  sent;
- every 503 carries ``Retry-After``;
- no other status than 200 and 503 for these well-formed requests (a 4xx would be a valid
  request refused);
- server RSS at the end at most ``--rss-limit-pct`` (10 %) above its value after the warm-up.

Modes:

- full (the default): the bundled checkpoint (``models/data/default/``), batch size 16,
  queue 16, clients 16 / 32 / 64, 20 s warm-up, ``--minutes 3``, at most 20000 requests;
  about 4-5 minutes with start and verification:
  ``python bench/load_test.py``
- short (``--short``, what CI runs through ``tests/bench/test_load_test_smoke.py``): the
  tiny test checkpoint built on the fly, batch size 4, queue 4, clients 4 / 8 / 16, 3 s
  warm-up, 3 phases of 5 s, at most 2000 requests; about 30-60 s:
  ``python bench/load_test.py --short``

Any figure can be overridden: ``python bench/load_test.py --minutes 10 --levels 1,2,4,8``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve_bench import percentile  # noqa: E402
from bench.stow_bench import content_type, instance_bytes, part_head  # noqa: E402

SAMPLES = ROOT / "tests" / "data" / "samples"
MB = 2**20
#: The longest Retry-After the client honours; a longer one is waited for this long.
MAX_RETRY_WAIT_S = 10.0
RSS_SAMPLE_S = 0.25
#: Client keep-alive expiry, well below uvicorn's 5 s (see :func:`drive`).
KEEPALIVE_S = 2.0
#: The warm-up goes on (up to this long) until a study sent by STOW-RS has been scored.
WARM_STUDY_WAIT_S = 90.0
READY_TIMEOUT_S = 240.0  # the real checkpoint may compute its concept features on first start
#: Full and short defaults of the options that have both.
FULL = {
    "checkpoint": "default",
    "batch_size": 16,
    "minutes": 3.0,
    "warmup_s": 20.0,
    "max_requests": 20_000,
}
SHORT = {
    "checkpoint": "tiny",
    "batch_size": 4,
    "minutes": 0.25,
    "warmup_s": 3.0,
    "max_requests": 2_000,
}


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


def predict_body(data: bytes, name: str, media_type: str) -> tuple[bytes, str]:
    """A predict request's multipart body and Content-Type (httpx's own encoder), built once."""
    import httpx

    request = httpx.Request("POST", "http://x/", files={"file": (name, data, media_type)})
    return request.read(), request.headers["Content-Type"]


def sample_pixels() -> list[tuple[str, Any]]:
    """The sample radiographs as 8-bit grey arrays, by file name."""
    import numpy as np
    from PIL import Image

    paths = sorted(SAMPLES.glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"no sample radiographs (*.png) in {SAMPLES}")
    return [(p.name, np.asarray(Image.open(p).convert("L"), dtype=np.uint8)) for p in paths]


def dx_dataset(pixels: Any) -> Any:
    """A frontal DX (PA) dataset of ``pixels``, for predict and as the STOW template."""
    from tests.service.images import dicom_dataset

    return dicom_dataset(
        pixels,
        modality="DX",
        bits=8,
        ViewPosition="PA",
        SeriesNumber="1",
        InstanceNumber="1",
        StudyDescription="XR CHEST PA",
        SeriesDescription="LOAD TEST",
    )


@dataclass
class Payloads:
    """What the clients send: predict bodies built once, STOW templates given new UIDs."""

    predict: list[tuple[str, bytes, str]]  # (label, body, content type)
    templates: list[Any]  # pydicom datasets
    stow_instances: int

    @classmethod
    def build(cls, stow_instances: int) -> Payloads:
        from tests.service.images import write_dicom

        predict = []
        templates = []
        for name, pixels in sample_pixels():
            png = (SAMPLES / name).read_bytes()
            predict.append(("png", *predict_body(png, name, "image/png")))
            ds = dx_dataset(pixels)
            dcm_name = name.replace(".png", ".dcm")
            predict.append(("dicom", *predict_body(write_dicom(ds), dcm_name, "application/dicom")))
            templates.append(ds)
        return cls(predict, templates, stow_instances)

    def study(self, rng: random.Random) -> tuple[str, list[str], bytes, str]:
        """A new study: its UID, its SOP Instance UIDs, the STOW body and Content-Type."""
        from pydicom.uid import generate_uid

        template = rng.choice(self.templates)
        study_uid, series_uid = generate_uid(), generate_uid()
        boundary = uuid.uuid4().hex
        pieces, sops = [], []
        for n in range(1, self.stow_instances + 1):
            data = instance_bytes(template, study_uid, series_uid, n)
            sops.append(str(template.SOPInstanceUID))
            pieces += [part_head(boundary, len(data)), data, b"\r\n"]
        pieces.append(f"--{boundary}--\r\n".encode())
        return study_uid, sops, b"".join(pieces), content_type(boundary)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One load phase: ``clients`` concurrent clients for at most ``seconds``."""

    name: str
    clients: int
    seconds: float
    elapsed_s: float = 0.0
    requests: int = 0  # logical requests (a 503 and its retries are one)
    statuses: Counter[str] = field(default_factory=Counter)  # "predict 200", "stow 503", ...
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)  # of 2xx, by route
    retries: int = 0  # 503s answered by waiting Retry-After and sending again
    gave_up: int = 0  # requests still 503 after the retries (or at the phase's end)
    rss_end: int = 0

    def merge(self, other: Phase) -> None:
        """Add ``other``'s requests, statuses and latencies to this phase's."""
        self.elapsed_s += other.elapsed_s
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.retries += other.retries
        self.gave_up += other.gave_up
        for route, values in other.latencies_ms.items():
            self.latencies_ms.setdefault(route, []).extend(values)

    def record(self, route: str, status: str, latency_ms: float | None) -> None:
        self.statuses[f"{route} {status}"] += 1
        if latency_ms is not None:
            self.latencies_ms.setdefault(route, []).append(latency_ms)

    @property
    def ok(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    def figures(self) -> dict[str, Any]:
        every = [x for v in self.latencies_ms.values() for x in v]
        routes = {
            route: {
                "ok": len(v),
                "p50_ms": round(percentile(v, 50), 1),
                "p99_ms": round(percentile(v, 99), 1),
            }
            for route, v in sorted(self.latencies_ms.items())
        }
        return {
            "clients": self.clients,
            "seconds": round(self.elapsed_s, 1),
            "requests": self.requests,
            "ok": self.ok,
            "ok_per_s": round(self.ok / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "p50_ms": round(percentile(every, 50), 1) if every else None,
            "p99_ms": round(percentile(every, 99), 1) if every else None,
            "routes": routes,
            "statuses": dict(sorted(self.statuses.items())),
            "retries_503": self.retries,
            "gave_up_503": self.gave_up,
            "rss_end_mb": round(self.rss_end / MB, 1),
        }


@dataclass
class Ledger:
    """Everything the checks need, across phases."""

    result_ids: list[str] = field(default_factory=list)  # predict 200s
    acked: dict[str, list[str]] = field(default_factory=dict)  # study -> acknowledged SOPs
    lost: list[str] = field(default_factory=list)  # one line each
    server_errors: Counter[str] = field(default_factory=Counter)  # 5xx other than 503
    unexpected: Counter[str] = field(default_factory=Counter)  # other non-200 statuses
    no_retry_after: int = 0


class TreeRss:
    """RSS of a process and its children (psutil), now and sampled for the peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        import psutil

        total = 0
        try:
            members = [self.process, *self.process.children(recursive=True)]
        except psutil.Error:
            return 0
        for member in members:
            with contextlib.suppress(psutil.Error):
                total += member.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.now()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


class Load:
    """The clients: one shared httpx pool, the request mix, the retry rule, the ledger."""

    def __init__(self, client: Any, key: str, payloads: Payloads, args: argparse.Namespace) -> None:
        self.client = client
        self.auth = {"Authorization": f"Bearer {key}"}
        self.payloads = payloads
        self.args = args
        self.ledger = Ledger()
        self.issued = 0

    async def run(self, phase: Phase) -> Phase:
        start = time.perf_counter()
        deadline = start + phase.seconds

        async def client(n: int) -> None:
            rng = random.Random(f"{self.args.seed}:{phase.name}:{n}")
            while time.perf_counter() < deadline and self.issued < self.args.max_requests:
                self.issued += 1
                phase.requests += 1
                if rng.random() < self.args.stow_fraction:
                    await self._stow(phase, rng, deadline)
                else:
                    _, body, ctype = rng.choice(self.payloads.predict)
                    await self._predict(phase, body, ctype, deadline)

        await asyncio.gather(*(client(n) for n in range(phase.clients)))
        phase.elapsed_s = time.perf_counter() - start
        return phase

    async def _send(
        self, phase: Phase, route: str, path: str, body: bytes, ctype: str, deadline: float
    ) -> Any:
        """POST with the 503 retry rule; the final answer, or None when none worth reading."""
        import httpx

        headers = {**self.auth, "Content-Type": ctype}
        for attempt in range(self.args.retries + 1):
            t0 = time.perf_counter()
            try:
                response = await self.client.post(path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                phase.record(route, f"no answer ({type(exc).__name__})", None)
                self.ledger.lost.append(f"{route}: no answer ({type(exc).__name__})")
                return None
            latency = (time.perf_counter() - t0) * 1e3
            status = response.status_code
            phase.record(route, str(status), latency if 200 <= status < 300 else None)
            if status != 503:
                self._check_status(route, status)
                return response
            retry_after = response.headers.get("retry-after", "")
            if not retry_after.isdigit():
                self.ledger.no_retry_after += 1
                return None
            wait = min(float(retry_after), MAX_RETRY_WAIT_S)
            if attempt == self.args.retries or time.perf_counter() + wait > deadline:
                phase.gave_up += 1
                return None
            phase.retries += 1
            await asyncio.sleep(wait)
        return None

    def _check_status(self, route: str, status: int) -> None:
        if status >= 500:
            self.ledger.server_errors[f"{route} {status}"] += 1
        elif status != 200:
            self.ledger.unexpected[f"{route} {status}"] += 1

    async def _predict(self, phase: Phase, body: bytes, ctype: str, deadline: float) -> None:
        response = await self._send(phase, "predict", "/v1/predict", body, ctype, deadline)
        if response is None or response.status_code != 200:
            return
        try:
            result_id = response.json()["id"]
        except (ValueError, KeyError, TypeError):
            self.ledger.lost.append("predict: a 200 answer without a result id")
            return
        self.ledger.result_ids.append(str(result_id))

    async def _stow(self, phase: Phase, rng: random.Random, deadline: float) -> None:
        study_uid, sops, body, ctype = self.payloads.study(rng)
        response = await self._send(phase, "stow", "/dicomweb/studies", body, ctype, deadline)
        if response is None or response.status_code not in (200, 202):
            return
        try:
            items = response.json().get("00081199", {}).get("Value") or []
            acked = [str(item["00081155"]["Value"][0]) for item in items]
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            self.ledger.lost.append("stow: an answer without a readable ReferencedSOPSequence")
            return
        if response.status_code == 200 and sorted(acked) != sorted(sops):
            self.ledger.lost.append(
                f"stow: a 200 answer acknowledged {len(acked)} of {len(sops)} instances"
            )
        if acked:
            self.ledger.acked[study_uid] = acked


async def a_study_is_done(client: Any, key: str, ledger: Ledger) -> bool:
    """Whether some study acknowledged so far has been scored and reported (``done``)."""
    auth = {"Authorization": f"Bearer {key}"}
    for uid in list(ledger.acked)[:50]:
        try:
            response = await client.get(f"/v1/studies/{uid}", headers=auth)
        except Exception:
            return False
        if response.status_code == 200 and response.json().get("status") == "done":
            return True
    return False


async def verify(client: Any, key: str, ledger: Ledger, clients: int) -> dict[str, Any]:
    """Read back every predict result and every acknowledged STOW study."""
    import httpx

    auth = {"Authorization": f"Bearer {key}"}
    found = {"results": 0, "instances": 0}
    study_states: Counter[str] = Counter()
    todo: list[tuple[str, str]] = [("result", rid) for rid in ledger.result_ids]
    todo += [("study", uid) for uid in ledger.acked]
    position = 0

    async def reader() -> None:
        nonlocal position
        while position < len(todo):
            kind, ident = todo[position]
            position += 1
            path = f"/v1/results/{ident}" if kind == "result" else f"/v1/studies/{ident}"
            try:
                response = await client.get(path, headers=auth)
            except httpx.HTTPError as exc:
                ledger.lost.append(f"verify {kind}: no answer ({type(exc).__name__})")
                continue
            if response.status_code >= 500:
                ledger.server_errors[f"verify {kind} {response.status_code}"] += 1
            if response.status_code != 200:
                ledger.lost.append(f"verify {kind}: GET answered {response.status_code}")
                continue
            if kind == "result":
                found["results"] += 1
                continue
            status = response.json()
            study_states[str(status.get("status"))] += 1
            stored = {i["sop_instance_uid"] for i in status.get("instances", [])}
            missing = [s for s in ledger.acked[ident] if s not in stored]
            found["instances"] += len(ledger.acked[ident]) - len(missing)
            if missing:
                ledger.lost.append(f"stow: {len(missing)} acknowledged instance(s) not stored")

    t0 = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(clients)))
    return {
        "results_expected": len(ledger.result_ids),
        "results_found": found["results"],
        "instances_expected": sum(len(v) for v in ledger.acked.values()),
        "instances_found": found["instances"],
        "studies": len(ledger.acked),
        "study_states": dict(sorted(study_states.items())),
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--short", action="store_true", help="the CI mode: tiny checkpoint, about 30-60 s"
    )
    p.add_argument(
        "--checkpoint",
        help="default (bundled) | tiny (built on the fly) | a checkpoint folder "
        "[default; tiny with --short]",
    )
    p.add_argument("--minutes", type=float, help="measured minutes, all phases [3; 0.25]")
    p.add_argument("--warmup-s", type=float, help="warm-up seconds, not measured [20; 3]")
    p.add_argument("--max-requests", type=int, help="most requests in all [20000; 2000]")
    p.add_argument("--batch-size", type=int, help="server KGDX_MAX_BATCH_SIZE [16; 4]")
    p.add_argument("--max-queue", type=int, help="server KGDX_MAX_QUEUE [the batch size]")
    p.add_argument(
        "--levels", default="1,2,4", help="clients per phase, times the batch size [1,2,4]"
    )
    p.add_argument(
        "--stow-fraction", type=float, default=0.25, help="share of STOW-RS requests [0.25]"
    )
    p.add_argument("--stow-instances", type=int, default=2, help="instances per STOW study [2]")
    p.add_argument("--retries", type=int, default=3, help="re-sends of a 503 [3]")
    p.add_argument("--timeout-s", type=float, default=120.0, help="client timeout [120]")
    p.add_argument("--rss-limit-pct", type=float, default=10.0, help="RSS growth limit [10]")
    p.add_argument(
        "--stable-seconds", type=float, default=2.0, help="server KGDX_STABLE_SECONDS [2]"
    )
    p.add_argument("--device", help="server KGDX_DEVICE [cpu, or $KGDX_TEST_DEVICE]")
    p.add_argument("--seed", type=int, default=0, help="request mix seed [0]")
    args = p.parse_args(argv)
    for name, value in (SHORT if args.short else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_queue is None:
        args.max_queue = args.batch_size
    try:
        multipliers = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--levels must be comma-separated integers, got {args.levels!r}")
    if not multipliers or min(multipliers) < 1:
        p.error(f"--levels must be integers >= 1, got {args.levels!r}")
    args.clients = [m * args.batch_size for m in multipliers]
    for name in ("max_requests", "batch_size", "max_queue", "stow_instances"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("minutes", "timeout_s", "rss_limit_pct"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("warmup_s", "retries", "stable_seconds"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.stow_fraction <= 1:
        p.error(f"--stow-fraction must be in [0, 1], got {args.stow_fraction}")
    return args


def server_settings(args: argparse.Namespace, checkpoint: Path | None) -> dict[str, str]:
    settings = {
        "KGDX_MAX_BATCH_SIZE": str(args.batch_size),
        "KGDX_MAX_QUEUE": str(args.max_queue),
        "KGDX_STABLE_SECONDS": str(args.stable_seconds),
        "KGDX_WORKER_POLL_S": "0.5",
        "KGDX_LOG_LEVEL": "WARNING",
    }
    if checkpoint is not None:
        settings["KGDX_CHECKPOINT"] = str(checkpoint)
    if args.device:
        settings["KGDX_DEVICE"] = args.device
    return settings


def resolve_checkpoint(args: argparse.Namespace, home: Path, tmp: Path) -> Path | None:
    """None for the bundled default (``KGDX_CHECKPOINT`` unset), else a folder."""
    from models.default_checkpoint import default_checkpoint_dir
    from tests.kgdx_server import run_cli_module

    if args.checkpoint == "default":
        if not (default_checkpoint_dir() / "checkpoint.json").is_file():
            raise FileNotFoundError(
                f"no bundled checkpoint in {default_checkpoint_dir()}; use --checkpoint tiny"
            )
        return None
    if args.checkpoint == "tiny":
        dest = tmp / "tiny-checkpoint"
        run_cli_module(["build-tiny", str(dest)], home)
        return dest
    path = Path(args.checkpoint)
    if not (path / "checkpoint.json").is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no checkpoint.json there")
    return path


async def drive(
    args: argparse.Namespace, url: str, key: str, rss: TreeRss, figures: dict[str, Any]
) -> Ledger:
    import httpx

    payloads = Payloads.build(args.stow_instances)
    top = max(args.clients)
    # uvicorn closes a connection idle for its keep-alive timeout (5 s); a POST sent on it as
    # that happens is reset (ReadError). httpx's own expiry is also 5 s, so its pool can hand
    # out a connection at that very moment: letting idle connections go well before keeps
    # the client out of that race, which is HTTP/1.1's, not the service's.
    limits = httpx.Limits(
        max_connections=top, max_keepalive_connections=top, keepalive_expiry=KEEPALIVE_S
    )
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        load = Load(client, key, payloads, args)
        phases: dict[str, Any] = {}
        if args.warmup_s > 0:
            warm = await load.run(Phase("warm-up", top, args.warmup_s))
            # Warm means every path has run once, the study worker's too (selection,
            # inference, SR): its first jobs start only after KGDX_STABLE_SECONDS, and the
            # memory they take would otherwise count as growth.
            deadline = time.monotonic() + WARM_STUDY_WAIT_S
            while not await a_study_is_done(client, key, load.ledger):
                if time.monotonic() > deadline:
                    break
                more = await load.run(Phase("warm-up", top, min(args.warmup_s, 2.0)))
                warm.merge(more)
            warm.rss_end = rss.now()
            phases["warm-up"] = warm.figures()
            print_phase(warm)
        figures["rss_start_mb"] = round(rss.now() / MB, 1)
        rss.peak = 0  # the peak after the warm-up
        measured: list[Phase] = []
        seconds = args.minutes * 60 / len(args.clients)
        for clients in args.clients:
            phase = await load.run(Phase(f"{clients // args.batch_size}x", clients, seconds))
            phase.rss_end = rss.now()
            measured.append(phase)
            phases[phase.name] = phase.figures()
            print_phase(phase)
        total = Phase("total", top, 0.0)
        for phase in measured:
            total.merge(phase)
        total.rss_end = rss.now()
        phases["total"] = total.figures()
        print_phase(total)
        figures["phases"] = phases
        figures["rss_end_mb"] = round(total.rss_end / MB, 1)
        figures["rss_peak_mb"] = round(rss.peak / MB, 1)
        figures["verify"] = await verify(client, key, load.ledger, min(top, 8))
    return load.ledger


def print_phase(phase: Phase) -> None:
    f = phase.figures()
    p50 = "n/a" if f["p50_ms"] is None else f"{f['p50_ms']:.0f}"
    p99 = "n/a" if f["p99_ms"] is None else f"{f['p99_ms']:.0f}"
    print(
        f"{phase.name:<8} clients {f['clients']:>3}  {f['seconds']:>6.1f} s  "
        f"{f['requests']:>5} requests  {f['ok_per_s']:>7.2f} 2xx/s  "
        f"p50 {p50:>6} ms  p99 {p99:>6} ms  RSS {f['rss_end_mb']:.0f} MB"
    )
    for route, r in f["routes"].items():
        print(f"  {route:<8} {r['ok']:>5} 2xx  p50 {r['p50_ms']:.0f} ms  p99 {r['p99_ms']:.0f} ms")
    statuses = ", ".join(f"{k}: {v}" for k, v in f["statuses"].items())
    print(f"  statuses: {statuses}; 503 retried {f['retries_503']}, gave up {f['gave_up_503']}")


def checks(args: argparse.Namespace, figures: dict[str, Any], ledger: Ledger) -> list[str]:
    """The failed checks, one line each."""
    failures = []
    if ledger.server_errors:
        failures.append(f"5xx other than 503: {dict(ledger.server_errors)}")
    if ledger.lost:
        first = Counter(ledger.lost).most_common(3)
        failures.append(f"{len(ledger.lost)} lost request(s): {dict(first)}")
    if ledger.no_retry_after:
        failures.append(f"{ledger.no_retry_after} 503 answer(s) without Retry-After")
    if ledger.unexpected:
        failures.append(f"unexpected statuses: {dict(ledger.unexpected)}")
    growth = figures.get("rss_growth_pct")
    if growth is not None and growth > args.rss_limit_pct:
        failures.append(
            f"server RSS grew {growth:.1f}% after the warm-up "
            f"({figures['rss_start_mb']} -> {figures['rss_end_mb']} MB; "
            f"limit {args.rss_limit_pct:g}%)"
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    from tests.kgdx_server import KgdxServer, create_api_key

    figures: dict[str, Any] = {
        "mode": "short" if args.short else "full",
        "checkpoint": args.checkpoint,
        "batch_size": args.batch_size,
        "max_queue": args.max_queue,
        "levels": args.clients,
        "stow_fraction": args.stow_fraction,
        "stow_instances": args.stow_instances,
        "warmup_s": args.warmup_s,
        "minutes": args.minutes,
        "max_requests": args.max_requests,
    }
    failures: list[str] = []
    ledger = Ledger()
    with tempfile.TemporaryDirectory(prefix="kgdx-load-test-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        home.mkdir()
        try:
            checkpoint = resolve_checkpoint(args, home, tmp)
            key = create_api_key(home, "load-test", ["ingest", "predict"])
        except Exception as exc:
            print(f"Error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        server = KgdxServer(home, server_settings(args, checkpoint))
        print(
            f"load test ({figures['mode']}): checkpoint {args.checkpoint}, batch "
            f"{args.batch_size}, queue {args.max_queue}, clients {args.clients}, "
            f"{args.minutes:g} min + {args.warmup_s:g} s warm-up, at most "
            f"{args.max_requests} requests"
        )
        rss: TreeRss | None = None
        try:
            server.start(READY_TIMEOUT_S)
            assert server.proc is not None
            figures["server_start_s"] = round(time.monotonic() - began, 1)
            rss = TreeRss(server.proc.pid)
            ledger = asyncio.run(drive(args, server.url, key, rss, figures))
            if not server.running:
                failures.append(f"the server exited with {server.proc.returncode}")
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            if rss is not None:
                rss.close()
            if failures or ledger.server_errors or ledger.lost:
                print(f"--- kgdx log (tail) ---\n{server.log_tail(3000)}", file=sys.stderr)
            server.stop(timeout=30)
    if "rss_start_mb" in figures and "rss_end_mb" in figures and figures["rss_start_mb"]:
        figures["rss_growth_pct"] = round(
            100 * (figures["rss_end_mb"] / figures["rss_start_mb"] - 1), 2
        )
    failures += checks(args, figures, ledger)
    figures["cpus"] = os.cpu_count()
    figures["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    figures["wall_s"] = round(time.monotonic() - began, 1)
    figures["failures"] = failures
    figures["pass"] = not failures
    return report(args, figures)


def report(args: argparse.Namespace, f: dict[str, Any]) -> int:
    if "rss_growth_pct" in f:
        print(
            f"server RSS: {f['rss_start_mb']} MB after warm-up -> {f['rss_end_mb']} MB at the end "
            f"({f['rss_growth_pct']:+.1f}%, limit {args.rss_limit_pct:g}%); peak "
            f"{f['rss_peak_mb']} MB"
        )
    v = f.get("verify")
    if v:
        states = ", ".join(f"{k} {n}" for k, n in v["study_states"].items()) or "none"
        print(
            f"verified in {v['seconds']} s: {v['results_found']}/{v['results_expected']} "
            f"predict results read back, {v['instances_found']}/{v['instances_expected']} "
            f"STOW instances stored in {v['studies']} studies (studies: {states})"
        )
    print(
        f"{f['cpus']} CPUs, load average {f['load_avg'][0]} -> {f['load_avg'][1]}; "
        f"wall {f['wall_s']} s"
    )
    if f["failures"]:
        print("FAIL: " + "; ".join(f["failures"]), file=sys.stderr)
    else:
        print("PASS")
    print(json.dumps(f, sort_keys=True))
    return 0 if f["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
