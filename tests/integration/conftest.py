"""Fixtures of the integration tests: a real Orthanc, a real ``kgdx serve``, a STOW capture.

- :func:`orthanc_available`: skips (saying why) when the Orthanc binary or its DICOMweb
  plugin is not installed; every Orthanc fixture depends on it.
- :class:`StowCapture` / ``stow_capture``: a tiny HTTP server standing in for kgdx's DICOMweb
  root; it records each request exactly as it came off the socket (headers, every chunk of a
  chunked body) and answers what the test tells it to.
- ``kgdx_template`` (session): a ``$KGDX_HOME`` with the checkpoint's ontology in its store
  and an ``ingest`` API key, made once; ``kgdx_home`` copies it for one test.
- ``pacs``: a :class:`Pacs` with Orthanc forwarding to a kgdx server and kgdx pushing its SR
  back to Orthanc, both started, both always stopped.
- :func:`real_radiograph`: a DX radiograph (DICOM Part 10 bytes) from a real NIH chest X-ray
  of ``../shared/data/cxr`` (or, in a clone without it, of ``tests/data/samples``).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.kgdx_server import (
    KgdxServer,
    checkpoint_for_home,
    create_api_key,
    free_port,
)
from tests.orthanc import OrthancServer, OrthancUnavailable, missing_reason, orthanc_server

#: Real chest radiographs: the project's data set (``../shared/data/cxr``, read-only) when it is
#: there, else the NIH samples committed under ``tests/data/samples`` (a clean clone in CI).
REPO_ROOT = Path(__file__).resolve().parents[2]
CXR_DIR = REPO_ROOT.parent / "shared" / "data" / "cxr" / "images"
SAMPLES_DIR = REPO_ROOT / "tests" / "data" / "samples"
#: Two 256x256 NIH PA views each: (data set file, committed sample) in order of preference.
CXR_IMAGES = {
    "first": ("nih_00029548_012.png", "nih_00028490_000.png"),
    "second": ("nih_00029548_013.png", "nih_00020751_003.png"),
}


# ---------------------------------------------------------------------------------------------
# Orthanc availability
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def orthanc_available() -> None:
    """Skip with the reason when Orthanc or its DICOMweb plugin is not installed."""
    reason = missing_reason()
    if reason:
        pytest.skip(f"Orthanc unavailable: {reason}")


# ---------------------------------------------------------------------------------------------
# A real radiograph as DICOM
# ---------------------------------------------------------------------------------------------


def cxr_path(which: str = "first") -> Path:
    """A real NIH chest X-ray (PNG): from ``../shared/data/cxr`` or the committed samples."""
    shared, sample = CXR_IMAGES[which]
    for path in (CXR_DIR / shared, SAMPLES_DIR / sample):
        if path.is_file():
            return path
    pytest.skip(f"no real chest X-ray: neither {CXR_DIR / shared} nor {SAMPLES_DIR / sample}")


def real_radiograph(
    which: str = "first",
    *,
    study_uid: str | None = None,
    accession: str = "ACC-E2E-0001",
    patient_id: str = "PID-E2E-0001",
    patient_name: str = "Test^Orthanc^E2E",
) -> tuple[bytes, Any]:
    """A DX radiograph (Digital X-Ray Image Storage - For Presentation, PA, MONOCHROME2,
    8 bits) of a real chest X-ray (:func:`cxr_path`), with patient and study tags; the
    Part 10 bytes and the pydicom dataset."""
    from pydicom.uid import generate_uid

    from tests.service.images import dicom_dataset, write_dicom

    pixels = np.asarray(Image.open(cxr_path(which)).convert("L"), dtype=np.uint8)
    ds = dicom_dataset(
        pixels,
        modality="DX",
        photometric="MONOCHROME2",
        bits=8,
        PatientName=patient_name,
        PatientID=patient_id,
        PatientSex="M",
        PatientBirthDate="19700101",
        AccessionNumber=accession,
        StudyDate="20240102",
        StudyTime="101500",
        StudyID="1",
        StudyDescription="XR CHEST PA",
        ReferringPhysicianName="",
        SeriesNumber="1",
        SeriesDescription="CHEST PA",
        InstanceNumber="1",
        BodyPartExamined="CHEST",
        ImageType=["ORIGINAL", "PRIMARY"],
        Manufacturer="kgdx-tests",
        PatientOrientation=["L", "F"],
        ViewPosition="PA",
        PresentationIntentType="FOR PRESENTATION",
        PixelIntensityRelationship="LOG",
        PixelIntensityRelationshipSign=1,
        ImagerPixelSpacing=[0.5, 0.5],
        BurnedInAnnotation="NO",
        LossyImageCompression="00",
    )
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    else:
        ds.StudyInstanceUID = generate_uid()
    return write_dicom(ds), ds


# ---------------------------------------------------------------------------------------------
# A STOW-RS capture server (stands in for kgdx in the harness tests)
# ---------------------------------------------------------------------------------------------


@dataclass
class Captured:
    """One request as received: request line, headers (in order), and the body.

    ``chunks`` holds the size of every chunk of a ``Transfer-Encoding: chunked`` body (empty
    when the body came with a ``Content-Length``); ``body`` is the de-chunked body.
    """

    method: str
    path: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    chunks: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def boundary(self) -> str:
        ctype = self.header("Content-Type") or ""
        return ctype.split("boundary=", 1)[-1].split(";")[0].strip().strip('"')

    def study_uids(self) -> set[str]:
        """StudyInstanceUIDs of the DICOM parts (empty when the body is not multipart)."""
        import pydicom

        uids = set()
        try:
            parts = split_multipart(self.body, self.boundary)[1]
        except (ValueError, AssertionError):
            return set()
        for _, content in parts:
            ds = pydicom.dcmread(BytesIO(content), stop_before_pixels=True)
            uids.add(str(ds.StudyInstanceUID))
        return uids


#: Answer of the capture server: (status, content type, body) for a captured request.
Responder = Callable[[Captured], tuple[int, str, bytes]]


class StowCapture:
    """A threaded HTTP server on 127.0.0.1 that records every request and answers with
    ``responder`` (default: a valid Store Instances Response listing every part)."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.requests: list[Captured] = []
        self.responder: Responder = responder or store_instances_response
        self._lock = threading.Lock()
        capture = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                headers = list(self.headers.items())
                chunks: list[int] = []
                if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
                    body = bytearray()
                    while True:
                        line = self.rfile.readline()
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            break
                        chunks.append(size)
                        body += self.rfile.read(size)
                        self.rfile.readline()  # CRLF after the chunk
                    data = bytes(body)
                else:
                    data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                req = Captured(self.command, self.path, self.request_version, headers, data, chunks)
                with capture._lock:
                    capture.requests.append(req)
                status, ctype, answer = capture.responder(req)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_POST = _handle
            do_GET = _handle
            do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def for_study(self, study_uid: str) -> list[Captured]:
        """The requests that carried instances of this study, oldest first."""
        with self._lock:
            requests = list(self.requests)
        return [r for r in requests if study_uid in r.study_uids()]

    @property
    def url(self) -> str:
        """The DICOMweb root to give Orthanc (with its trailing slash)."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicomweb/"

    def start(self) -> StowCapture:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def split_multipart(body: bytes, boundary: str) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """``body`` of a multipart message: (preamble, [(part headers, part content)], epilogue)
    exactly as framed, CRLF rules of RFC 2046 applied."""
    delim = b"--" + boundary.encode()
    first = body.index(delim)
    preamble = body[:first]
    rest = body[first + len(delim) :]
    parts = []
    while not rest.startswith(b"--"):
        assert rest.startswith(b"\r\n"), rest[:20]
        nxt = rest.index(b"\r\n" + delim)
        part = rest[2:nxt]
        head, _, content = part.partition(b"\r\n\r\n")
        parts.append((head, content))
        rest = rest[nxt + 2 + len(delim) :]
    return preamble, parts, rest[2:]


def store_instances_response(req: Captured) -> tuple[int, str, bytes]:
    """A valid PS3.18 Store Instances Response naming every part of ``req``."""
    import json

    import pydicom

    boundary = req.boundary
    items = []
    if boundary:
        for _, content in split_multipart(req.body, boundary)[1]:
            ds = pydicom.dcmread(BytesIO(content), stop_before_pixels=True)
            items.append(
                {
                    "00081150": {"vr": "UI", "Value": [str(ds.SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [str(ds.SOPInstanceUID)]},
                }
            )
    body = {"00081199": {"vr": "SQ", "Value": items}} if items else {"00081199": {"vr": "SQ"}}
    return 200, "application/dicom+json", json.dumps(body).encode()


@pytest.fixture(scope="module")
def module_capture() -> Iterator[StowCapture]:
    capture = StowCapture().start()
    try:
        yield capture
    finally:
        capture.stop()


@pytest.fixture(scope="module")
def module_orthanc(orthanc_available: None, module_capture: StowCapture) -> Iterator[OrthancServer]:
    """One Orthanc for a module, forwarding to ``module_capture`` (StableAge 1 s)."""
    try:
        with orthanc_server(
            server_url=module_capture.url,
            server_headers={"Authorization": "Bearer kgdx_test_key"},
            stable_age=1,
        ) as orthanc:
            yield orthanc
    except OrthancUnavailable as exc:
        pytest.skip(f"Orthanc unavailable: {exc}")


@pytest.fixture
def stow_capture(module_capture: StowCapture) -> Iterator[StowCapture]:
    """The module's capture server, emptied, answering a valid response (tests may set
    ``responder``)."""
    module_capture.requests.clear()
    module_capture.responder = store_instances_response
    yield module_capture
    module_capture.responder = store_instances_response


@pytest.fixture
def orthanc_to_capture(module_orthanc: OrthancServer, stow_capture: StowCapture) -> OrthancServer:
    """An Orthanc whose ``OnStableStudy`` forwards to ``stow_capture``; each test uses its own
    studies, so the Orthanc is shared by the module."""
    return module_orthanc


# ---------------------------------------------------------------------------------------------
# kgdx + Orthanc wired together
# ---------------------------------------------------------------------------------------------


@dataclass
class KgdxTemplate:
    """A prepared ``$KGDX_HOME`` to copy: ontology stored, ``ingest`` + ``admin`` keys."""

    home: Path
    checkpoint: Path | None
    ingest_key: str
    read_key: str


@pytest.fixture(scope="session")
def kgdx_template(
    orthanc_available: None, tmp_path_factory: pytest.TempPathFactory
) -> KgdxTemplate:
    work = tmp_path_factory.mktemp("kgdx-template")
    home = work / "home"
    home.mkdir()
    checkpoint = checkpoint_for_home(home, work)
    ingest = create_api_key(home, "orthanc", ["ingest"])
    reader = create_api_key(home, "e2e-tests", ["predict", "ingest", "admin"])
    return KgdxTemplate(home, checkpoint, ingest, reader)


@dataclass
class Pacs:
    """Orthanc and kgdx pointed at each other; ``kgdx`` may be killed and restarted."""

    orthanc: OrthancServer
    kgdx: KgdxServer
    ingest_key: str
    read_key: str

    def study_status(self, study_uid: str) -> dict[str, Any] | None:
        """kgdx's ``GET /v1/studies/{uid}`` (``None`` while it answers 404)."""
        r = self.kgdx.get(f"/v1/studies/{study_uid}", self.read_key)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def diagnostics(self) -> str:
        return (
            f"--- Orthanc log (tail) ---\n{self.orthanc.log_tail(4000)}\n"
            f"--- kgdx log (tail) ---\n{self.kgdx.log_text()[-6000:]}"
        )


#: Orthanc's StableAge and kgdx's KGDX_STABLE_SECONDS in the end-to-end tests.
ORTHANC_STABLE_AGE = 2
KGDX_STABLE_SECONDS = 3


@pytest.fixture
def make_pacs(kgdx_template: KgdxTemplate, tmp_path: Path) -> Iterator[Callable[..., Pacs]]:
    """``make_pacs(**kgdx_settings)``: Orthanc + kgdx (fresh copy of the template home)."""
    stack = []

    def make(**settings: str) -> Pacs:
        home = tmp_path / "kgdx-home"
        shutil.copytree(kgdx_template.home, home)
        kgdx_port = free_port()
        kgdx_root = f"http://127.0.0.1:{kgdx_port}/dicomweb/"
        cm = orthanc_server(
            server_url=kgdx_root,
            server_headers={"Authorization": f"Bearer {kgdx_template.ingest_key}"},
            stable_age=ORTHANC_STABLE_AGE,
            keep_dir=tmp_path,
        )
        try:
            orthanc = cm.__enter__()
        except OrthancUnavailable as exc:
            pytest.skip(f"Orthanc unavailable: {exc}")
        stack.append(cm)
        env = {
            "KGDX_STABLE_SECONDS": str(KGDX_STABLE_SECONDS),
            "KGDX_SR_DESTINATION_URL": f"{orthanc.dicomweb_url}/",
            "KGDX_LOG_LEVEL": "INFO",
        }
        if kgdx_template.checkpoint is not None:
            env["KGDX_CHECKPOINT"] = str(kgdx_template.checkpoint)
        env.update(settings)
        kgdx = KgdxServer(home, env, port=kgdx_port, log_dir=tmp_path)
        stack.append(kgdx)
        kgdx.start()
        return Pacs(orthanc, kgdx, kgdx_template.ingest_key, kgdx_template.read_key)

    try:
        yield make
    finally:
        for item in reversed(stack):
            if isinstance(item, KgdxServer):
                item.kill()
            else:
                item.__exit__(None, None, None)
