"""STOW-RS benchmark: DICOMweb ingest into ``kgdx serve``, the PACS round trip, memory.

Everything runs on this machine, on loopback (127.0.0.1), bounded in requests and seconds; it
stops by itself, prints a table and a final JSON line, and exits 1 when a target is missed or
a phase fails.

Figures (issue 5, "Benchmarks"):

1. **STOW ingest**: a ``--instances``-instance study (DX, ``--size`` x ``--size`` 16-bit,
   distinct SOP Instance UIDs, generated with pydicom) in one ``multipart/related;
   type="application/dicom"`` body, sent chunked (httpx streaming, 65524-byte chunks as
   Orthanc's libcurl sends them) to ``POST /dicomweb/studies``, ``--rounds`` times, a new
   study each round. Timed from the request's start to the whole answer read, so it covers
   parsing, spooling, validation and durable storage (fsync + database row) of every
   instance, as kgdx stores everything before it answers. Reported: instances/s and MB/s
   (body bytes) of the best and the median round. Not gated.
2. **Orthanc stable event -> SR stored back** (skipped, saying why, with ``--skip-orthanc``
   or when Orthanc or its DICOMweb plugin is not installed): a real Orthanc
   (:mod:`tests.orthanc`; ``StableAge`` ``--stable-age``) forwards the study to a second
   ``kgdx serve`` (``KGDX_STABLE_SECONDS`` ``--kgdx-stable``) with its ``OnStableStudy`` Lua
   hook; kgdx scores it and pushes a DICOM SR back by STOW-RS. One radiograph is uploaded;
   the stable event is the moment the ``StableStudy`` entry of the study shows in Orthanc's
   ``/changes`` (polled every 50 ms, so up to 50 ms late), or the STOW arrival at kgdx when
   that came first (the forward follows the event, so the earlier of the two is the closer
   bound); the SR stored is the moment a QIDO-RS ``Modality=SR`` search of the study in
   Orthanc first lists it (also polled every 50 ms). Also reported from kgdx's
   ``GET /v1/studies/{uid}``: the STOW arrival (the instance's ``received_at``), the job's
   creation and the SR's push, as a breakdown. The figure holds the configured waits
   (``KGDX_STABLE_SECONDS`` and up to one ``worker_poll_s``), so they are printed beside
   it. Not gated.
3. **Memory while a big study streams in**: ``--big-instances`` instances of about
   ``--big-mb / --big-instances`` MB each (``--big-mb`` MB in all), generated one at a time
   while the body is sent (the client never holds more than one instance), posted in one
   chunked body; the RSS of the kgdx server process is sampled every 50 ms (psutil) from
   just before the request until its answer, plus the kernel's high-water mark (VmHWM)
   when it rose during the upload (it catches a peak between samples). Target: growth
   (peak - start) < 50 MB.

MB is 2**20 bytes throughout. Each run uses its own temporary ``$KGDX_HOME`` (SQLite, an API
key with the ``ingest`` and ``predict`` scopes) and the bundled default checkpoint when there
is one, else the tiny test checkpoint (:func:`tests.kgdx_server.checkpoint_for_home`). The
ingest server runs with ``KGDX_STABLE_SECONDS`` at its maximum, so no job (inference) runs
beside the uploads; the Orthanc phase uses a copy of the home made before any upload.

Usage:
  python bench/stow_bench.py                    # about 1-3 minutes
  python bench/stow_bench.py --quick --skip-orthanc
  python bench/stow_bench.py --instances 100 --rounds 5 --big-mb 500
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 2**20
#: Chunk size of the streamed bodies: what Orthanc's libcurl sends (tests/orthanc.py).
CHUNK = 65524
TARGETS = {"rss_growth_mb": 50.0}
SAMPLE_S = 0.05
#: KGDX_STABLE_SECONDS of the ingest server: no study goes quiet during the run.
NO_JOBS_STABLE_S = "86400"
REQUEST_TIMEOUT_S = 300.0
SR_TIMEOUT_S = 120.0
#: Real chest X-rays for the Orthanc phase, in order of preference (else generated pixels).
CXR_CANDIDATES = (
    ROOT.parent / "shared" / "data" / "cxr" / "images" / "nih_00029548_012.png",
    ROOT / "tests" / "data" / "samples" / "nih_00028490_000.png",
)


# ---------------------------------------------------------------------------------------------
# DICOM bodies
# ---------------------------------------------------------------------------------------------


def dx_template(side: int, seed: int = 0) -> Any:
    """A DX (For Presentation, PA) 16-bit ``side`` x ``side`` dataset, to be given new
    UIDs per instance (:func:`instance_bytes`)."""
    import numpy as np

    from tests.service.images import dicom_dataset

    rng = np.random.default_rng(seed)
    ramp = np.linspace(2000, 40000, side, dtype=np.float32)[None, :]
    pixels = (ramp + rng.normal(0, 800, (side, side)).astype(np.float32)).clip(0, 65535)
    return dicom_dataset(
        pixels.astype(np.uint16),
        modality="DX",
        bits=16,
        ViewPosition="PA",
        SeriesNumber="1",
        SeriesDescription="STOW BENCH",
        StudyDescription="XR CHEST PA",
    )


def instance_bytes(template: Any, study_uid: str, series_uid: str, number: int) -> bytes:
    """``template`` as a Part 10 file with this study and series and a fresh SOP Instance UID."""
    from pydicom.uid import generate_uid

    from tests.service.images import write_dicom

    template.StudyInstanceUID = study_uid
    template.SeriesInstanceUID = series_uid
    template.SOPInstanceUID = generate_uid()
    template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
    template.InstanceNumber = str(number)
    data: bytes = write_dicom(template)
    return data


def part_head(boundary: str, size: int) -> bytes:
    """A part's delimiter and headers, as Orthanc frames them."""
    return (
        f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size}\r\n\r\n"
    ).encode()


def content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def chunked(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for i in range(0, len(data), CHUNK):
        yield bytes(view[i : i + CHUNK])


@dataclass
class Study:
    """One study's whole multipart body, built before it is timed."""

    study_uid: str
    boundary: str
    body: bytes
    instances: int


def build_study(template: Any, instances: int) -> Study:
    from pydicom.uid import generate_uid

    study_uid, series_uid = generate_uid(), generate_uid()
    boundary = f"{uuid.uuid4()}-{uuid.uuid4()}"
    pieces = []
    for n in range(1, instances + 1):
        data = instance_bytes(template, study_uid, series_uid, n)
        pieces += [part_head(boundary, len(data)), data, b"\r\n"]
    pieces.append(f"--{boundary}--".encode())
    return Study(study_uid, boundary, b"".join(pieces), instances)


@dataclass
class StreamedStudy:
    """A study generated while it is sent: one instance in memory at a time."""

    template: Any
    instances: int
    study_uid: str = ""
    boundary: str = field(default_factory=lambda: f"{uuid.uuid4()}-{uuid.uuid4()}")
    sent: int = 0

    def __iter__(self) -> Iterator[bytes]:
        from pydicom.uid import generate_uid

        self.study_uid, series_uid = generate_uid(), generate_uid()
        for n in range(1, self.instances + 1):
            data = instance_bytes(self.template, self.study_uid, series_uid, n)
            yield part_head(self.boundary, len(data))
            yield from chunked(data)
            yield b"\r\n"
            self.sent += len(data)
            del data
        yield f"--{self.boundary}--".encode()


def check_answer(response: Any, instances: int) -> None:
    """A 200 Store Instances Response naming every instance; else ``RuntimeError``."""
    if response.status_code != 200:
        raise RuntimeError(f"STOW answered {response.status_code}: {response.text[:500]}")
    stored = response.json().get("00081199", {}).get("Value") or []
    if len(stored) != instances:
        raise RuntimeError(f"STOW stored {len(stored)} of {instances} instances")


# ---------------------------------------------------------------------------------------------
# RSS sampling
# ---------------------------------------------------------------------------------------------


def high_water_mark(pid: int) -> int:
    """The kernel's peak RSS (VmHWM) of ``pid`` in bytes, 0 where /proc lacks it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the RSS of ``pid`` (and of this process) every :data:`SAMPLE_S` seconds."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.server = psutil.Process(pid)
        self.client = psutil.Process()
        self.samples: list[int] = []
        self.client_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append(self.server.memory_info().rss)
                self.client_peak = max(self.client_peak, self.client.memory_info().rss)
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self.start = self.server.memory_info().rss
        self.client_start = self.client.memory_info().rss
        self.hwm_before = high_water_mark(self.server.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.end = self.server.memory_info().rss
        self.hwm_after = high_water_mark(self.server.pid)

    @property
    def peak(self) -> int:
        peak = max([self.start, self.end, *self.samples])
        if self.hwm_after > self.hwm_before:  # a new lifetime peak: it happened during upload
            peak = max(peak, self.hwm_after)
        return peak


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def post_stow(url: str, key: str, body: Any, boundary: str) -> Any:
    import httpx

    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": content_type(boundary),
        "Accept": "application/dicom+json",
    }
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        return client.post(f"{url}/dicomweb/studies", content=body, headers=headers)


def ingest_phase(args: argparse.Namespace, url: str, key: str) -> dict[str, Any]:
    template = dx_template(args.size)
    warm = build_study(template, 2)  # first request: imports, database, spool folder
    check_answer(post_stow(url, key, chunked(warm.body), warm.boundary), 2)
    rounds = []
    body_mb = 0.0
    for r in range(args.rounds):
        study = build_study(template, args.instances)
        t0 = time.perf_counter()
        response = post_stow(url, key, chunked(study.body), study.boundary)
        elapsed = time.perf_counter() - t0
        check_answer(response, args.instances)
        row = {
            "seconds": round(elapsed, 3),
            "instances_per_s": round(args.instances / elapsed, 1),
            "mb_per_s": round(len(study.body) / MB / elapsed, 1),
        }
        rounds.append(row)
        body_mb = len(study.body) / MB
        print(
            f"ingest round {r + 1}: {args.instances} instances, {len(study.body) / MB:.1f} MB "
            f"in {elapsed:.2f} s = {row['instances_per_s']} inst/s, {row['mb_per_s']} MB/s"
        )
        del study
    best = max(rounds, key=lambda row: row["instances_per_s"])
    return {
        "instances": args.instances,
        "instance_size": f"{args.size}x{args.size} 16-bit",
        "body_mb": round(body_mb, 1),
        "rounds": rounds,
        "best_instances_per_s": best["instances_per_s"],
        "best_mb_per_s": best["mb_per_s"],
        "median_instances_per_s": round(statistics.median(r["instances_per_s"] for r in rounds), 1),
        "median_mb_per_s": round(statistics.median(r["mb_per_s"] for r in rounds), 1),
    }


def memory_phase(args: argparse.Namespace, url: str, key: str, pid: int) -> dict[str, Any]:
    per_instance = args.big_mb * MB / args.big_instances
    side = max(16, int(math.sqrt(per_instance / 2)))
    template = dx_template(side, seed=1)
    study = StreamedStudy(template, args.big_instances)
    time.sleep(0.5)  # let the server settle after the ingest rounds
    with RssSampler(pid) as rss:
        t0 = time.perf_counter()
        response = post_stow(url, key, iter(study), study.boundary)
        elapsed = time.perf_counter() - t0
    check_answer(response, args.big_instances)
    growth = (rss.peak - rss.start) / MB
    print(
        f"big study: {args.big_instances} x {side}x{side} 16-bit = {study.sent / MB:.0f} MB in "
        f"{elapsed:.1f} s; server RSS {rss.start / MB:.0f} -> peak {rss.peak / MB:.0f} MB "
        f"(+{growth:.1f} MB, {len(rss.samples)} samples)"
    )
    return {
        "instances": args.big_instances,
        "instance_size": f"{side}x{side} 16-bit",
        "sent_mb": round(study.sent / MB, 1),
        "seconds": round(elapsed, 2),
        "mb_per_s": round(study.sent / MB / elapsed, 1),
        "rss_start_mb": round(rss.start / MB, 1),
        "rss_peak_mb": round(rss.peak / MB, 1),
        "rss_end_mb": round(rss.end / MB, 1),
        "rss_growth_mb": round(growth, 1),
        "samples": len(rss.samples),
        "hwm_rose": rss.hwm_after > rss.hwm_before,
        "client_rss_growth_mb": round((rss.client_peak - rss.client_start) / MB, 1),
    }


def radiograph() -> tuple[bytes, Any, str]:
    """A DX radiograph with patient and study tags: a real chest X-ray when one is here."""
    import numpy as np
    from PIL import Image

    from tests.service.images import dicom_dataset, gray_array, write_dicom

    source = next((p for p in CXR_CANDIDATES if p.is_file()), None)
    if source is not None:
        pixels = np.asarray(Image.open(source).convert("L"), dtype=np.uint8)
    else:
        pixels = gray_array(256, 256, bits=8)
    ds = dicom_dataset(
        pixels,
        modality="DX",
        bits=8,
        PatientName="Bench^Stow",
        PatientID="PID-STOW-BENCH",
        AccessionNumber="ACC-STOW-BENCH",
        StudyDate="20240102",
        StudyTime="101500",
        StudyID="1",
        StudyDescription="XR CHEST PA",
        SeriesNumber="1",
        InstanceNumber="1",
        BodyPartExamined="CHEST",
        ImageType=["ORIGINAL", "PRIMARY"],
        PatientOrientation=["L", "F"],
        ViewPosition="PA",
    )
    return write_dicom(ds), ds, source.name if source else "generated"


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def orthanc_phase(
    args: argparse.Namespace, home: Path, checkpoint: Path | None, key: str, work: Path
) -> dict[str, Any]:
    """Orthanc -> kgdx -> SR back in Orthanc for one radiograph; the figures."""
    from tests.kgdx_server import KgdxServer, free_port
    from tests.orthanc import orthanc_server

    kgdx_port = free_port()
    figures: dict[str, Any] = {
        "orthanc_stable_age_s": args.stable_age,
        "kgdx_stable_seconds": args.kgdx_stable,
    }
    with orthanc_server(
        server_url=f"http://127.0.0.1:{kgdx_port}/dicomweb/",
        server_headers={"Authorization": f"Bearer {key}"},
        stable_age=args.stable_age,
        keep_dir=work,
    ) as orthanc:
        settings = {
            "KGDX_STABLE_SECONDS": str(args.kgdx_stable),
            "KGDX_SR_DESTINATION_URL": f"{orthanc.dicomweb_url}/",
        }
        if checkpoint is not None:
            settings["KGDX_CHECKPOINT"] = str(checkpoint)
        kgdx = KgdxServer(home, settings, port=kgdx_port, log_dir=work)
        try:
            kgdx.start()
            figures.update(_round_trip(orthanc, kgdx, key))
        except Exception:
            print(f"--- kgdx log (tail) ---\n{kgdx.log_tail(2000)}", file=sys.stderr)
            print(f"--- Orthanc log (tail) ---\n{orthanc.log_tail(2000)}", file=sys.stderr)
            raise
        finally:
            kgdx.stop(timeout=15)
    return figures


def _round_trip(orthanc: Any, kgdx: Any, key: str) -> dict[str, Any]:
    import httpx

    from service.settings import Settings

    data, ds, source = radiograph()
    study_uid = str(ds.StudyInstanceUID)
    since = orthanc.get("/changes?last")["Last"]
    t_upload = time.time()
    study_id = orthanc.upload(data)["ParentStudy"]
    t_stable: float | None = None
    stable_date = None
    t_sr: float | None = None
    deadline = time.monotonic() + SR_TIMEOUT_S
    qido = f"{orthanc.dicomweb_url}/studies/{study_uid}/instances"
    with httpx.Client(timeout=10.0) as client:
        while t_sr is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SR in Orthanc {SR_TIMEOUT_S:.0f} s after the upload")
            now = time.time()
            if t_stable is None:
                page = client.get(f"{orthanc.url}/changes", params={"since": since}).json()
                for change in page["Changes"]:
                    if change["ChangeType"] == "StableStudy" and change["ID"] == study_id:
                        t_stable, stable_date = now, change.get("Date")
                since = page["Last"]
            else:
                r = client.get(qido, params={"Modality": "SR"})
                if r.status_code == 200 and r.content and r.json():
                    t_sr = now
                    break
            time.sleep(SAMPLE_S)
    status = kgdx.get(f"/v1/studies/{study_uid}", key).json()
    received = [_epoch(i["received_at"]) for i in status["instances"]]
    arrival = min((t for t in received if t is not None), default=None)
    jobs = status.get("jobs") or [{}]
    job_created = _epoch(jobs[0].get("created_at"))
    pushed = _epoch(jobs[0].get("sr_pushed_at"))
    assert t_stable is not None
    seen = t_stable
    if arrival is not None:
        # The forward follows the event: when kgdx had the study before the poll saw the
        # event, the arrival is the closer bound on when it happened.
        t_stable = min(t_stable, arrival)

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 3)

    return {
        "image": source,
        "worker_poll_s": Settings().worker_poll_s,
        "upload_to_stable_s": span(t_upload, t_stable),
        "stable_to_sr_s": span(t_stable, t_sr),
        "stable_to_stow_arrival_s": span(t_stable, arrival),
        "stable_seen_after_arrival_s": span(arrival, seen),
        "stow_arrival_to_sr_s": span(arrival, t_sr),
        "stow_arrival_to_job_s": span(arrival, job_created),
        "job_to_sr_pushed_s": span(job_created, pushed),
        "sr_pushed_to_qido_s": span(pushed, t_sr),
        "upload_to_sr_s": span(t_upload, t_sr),
        "orthanc_stable_date": stable_date,
        "job_state": jobs[0].get("state"),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--instances", type=int, default=None, help="instances per study [50]")
    p.add_argument("--rounds", type=int, default=None, help="ingest rounds [3]")
    p.add_argument("--size", type=int, default=512, help="ingest instance side, pixels [512]")
    p.add_argument("--big-mb", type=int, default=None, help="MB of the big study [200]")
    p.add_argument("--big-instances", type=int, default=40, help="instances of it [40]")
    p.add_argument("--skip-orthanc", action="store_true", help="no Orthanc round trip")
    p.add_argument("--stable-age", type=int, default=1, help="Orthanc's StableAge, s [1]")
    p.add_argument("--kgdx-stable", type=float, default=1.0, help="KGDX_STABLE_SECONDS there [1]")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for the smoke test (10 instances, 2 rounds, 40 MB)",
    )
    args = p.parse_args(argv)
    defaults = (50, 3, 200) if not args.quick else (10, 2, 40)
    for name, default in zip(("instances", "rounds", "big_mb"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("instances", "rounds", "size", "big_mb", "big_instances", "stable_age"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kgdx_stable < 0:
        p.error(f"--kgdx-stable must be >= 0, got {args.kgdx_stable}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    from tests.kgdx_server import KgdxServer, checkpoint_for_home, create_api_key
    from tests.orthanc import OrthancUnavailable, missing_reason

    figures: dict[str, Any] = {"quick": args.quick}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kgdx-stow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        home.mkdir()
        checkpoint = checkpoint_for_home(home, tmp)
        figures["checkpoint"] = "default" if checkpoint is None else "tiny"
        key = create_api_key(home, "stow-bench", ["ingest", "predict"])
        pacs_home = tmp / "pacs-home"
        if not args.skip_orthanc:
            shutil.copytree(home, pacs_home)  # before any upload: no stray studies there
        settings = {"KGDX_STABLE_SECONDS": NO_JOBS_STABLE_S, "KGDX_LOG_LEVEL": "WARNING"}
        if checkpoint is not None:
            settings["KGDX_CHECKPOINT"] = str(checkpoint)
        print(f"checkpoint: {figures['checkpoint']}; home {home}")
        server = KgdxServer(home, settings)
        try:
            server.start()
            assert server.proc is not None
            figures["ingest"] = ingest_phase(args, server.url, key)
            figures["memory"] = memory_phase(args, server.url, key, server.proc.pid)
        except Exception as exc:
            errors.append(f"ingest server: {type(exc).__name__}: {exc}")
            print(f"--- kgdx log (tail) ---\n{server.log_tail(2000)}", file=sys.stderr)
        finally:
            server.stop(timeout=20)

        reason = "--skip-orthanc" if args.skip_orthanc else missing_reason()
        if reason is None:
            try:
                figures["orthanc"] = orthanc_phase(args, pacs_home, checkpoint, key, tmp)
            except OrthancUnavailable as exc:
                reason = f"Orthanc did not start: {exc}"
            except Exception as exc:
                errors.append(f"orthanc round trip: {type(exc).__name__}: {exc}")
        if reason is not None:
            figures["orthanc"] = {"skipped": reason}
    figures["errors"] = errors
    figures["cpus"] = os.cpu_count()
    figures["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    figures["wall_s"] = round(time.monotonic() - began, 1)
    return report(figures)


def _fmt(value: Any, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.2f} {unit}"


def report(f: dict[str, Any]) -> int:
    misses = []
    rows: list[tuple[str, str, str]] = [
        (
            "checkpoint / cpus / load average",
            f"{f['checkpoint']} / {f['cpus']} / {f['load_avg'][0]} -> {f['load_avg'][1]}",
            "",
        )
    ]
    ingest = f.get("ingest")
    if ingest:
        rows += [
            (
                f"STOW ingest, {ingest['instances']} x {ingest['instance_size']} "
                f"({ingest['body_mb']} MB)",
                f"best {ingest['best_instances_per_s']} inst/s, {ingest['best_mb_per_s']} MB/s; "
                f"median {ingest['median_instances_per_s']} inst/s, "
                f"{ingest['median_mb_per_s']} MB/s ({len(ingest['rounds'])} rounds)",
                "",
            )
        ]
    o = f.get("orthanc", {})
    if "skipped" in o:
        rows.append(("Orthanc stable event -> SR stored", f"skipped: {o['skipped']}", ""))
    elif o:
        rows += [
            (
                "Orthanc stable event -> SR stored",
                f"{_fmt(o['stable_to_sr_s'])} (StableAge {o['orthanc_stable_age_s']} s, "
                f"KGDX_STABLE_SECONDS {o['kgdx_stable_seconds']}, worker poll "
                f"{o['worker_poll_s']} s)",
                "",
            ),
            (
                "  stable -> STOW at kgdx -> job -> SR pushed -> QIDO",
                f"{_fmt(o['stable_to_stow_arrival_s'])} + {_fmt(o['stow_arrival_to_job_s'])} + "
                f"{_fmt(o['job_to_sr_pushed_s'])} + {_fmt(o['sr_pushed_to_qido_s'])}",
                "",
            ),
            (
                "  upload -> stable event / -> SR",
                f"{_fmt(o['upload_to_stable_s'])} / {_fmt(o['upload_to_sr_s'])}",
                "",
            ),
        ]
    m = f.get("memory")
    if m:
        if m["rss_growth_mb"] >= TARGETS["rss_growth_mb"]:
            misses.append("rss_growth_mb")
        rows += [
            (
                f"big study {m['sent_mb']} MB ({m['instances']} x {m['instance_size']})",
                f"{m['seconds']} s, {m['mb_per_s']} MB/s",
                "",
            ),
            (
                "  server RSS start / peak / growth",
                f"{m['rss_start_mb']} / {m['rss_peak_mb']} / +{m['rss_growth_mb']} MB "
                f"({m['samples']} samples at {SAMPLE_S * 1e3:.0f} ms; client "
                f"+{m['client_rss_growth_mb']} MB)",
                f"growth < {TARGETS['rss_growth_mb']:.0f} MB",
            ),
        ]
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, target in rows:
        print(f"{name:<{width}}  {value}{'  [' + target + ']' if target else ''}")
    for miss in misses:
        print(f"MISS: {miss} = {f['memory'][miss]} (target < {TARGETS[miss]})")
    for error in f["errors"]:
        print(f"ERROR: {error}")
    f["targets"] = TARGETS
    f["misses"] = misses
    f["pass"] = not misses and not f["errors"]
    print(json.dumps(f, sort_keys=True))
    return 0 if f["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
