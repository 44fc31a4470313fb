"""STOW-RS end to end: status codes and DICOM JSON bodies, durability, idempotence, bad input.

The service runs without a model (its checkpoint is missing): storing instances must not
wait for one, and no study worker runs, so what the tests see is what STOW did. Most tests go
through the TestClient; chunked uploads and the memory bound need real HTTP, so they use a
uvicorn server on a loopback port in a thread (:func:`live_server`, shared with the QIDO-RS
tests).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import service.multipart as mp
from service.apikeys import ApiKeyStore
from service.app import create_app
from service.db import ServiceDatabase
from service.instances import InstanceStore
from service.logs import hash_uid
from service.multipart import MultipartLimits
from service.settings import Settings
from service.state import AppState
from tests.service import images

BOUNDARY = "0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
DX = str(images.DX_STORAGE)
SR = str(images.BASIC_TEXT_SR)

# FailureReason / WarningReason values (service.stow)
OUT_OF_RESOURCES = 0xA700
NOT_SOP_CLASS = 0xA900
STUDY_MISMATCH = 0xA901
CANNOT_UNDERSTAND = 0xC000
ELEMENTS_DISCARDED = 0xB006


class Reply(Protocol):
    """An HTTP response: httpx's (live server) or the TestClient's (httpx2)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self, **kwargs: Any) -> Any: ...


# -- the service -----------------------------------------------------------------------------


@dataclass
class Service:
    """A kgdx app with its home, keys, and a client (TestClient or live base URL)."""

    app: FastAPI
    home: Path
    keys: dict[str, str]
    client: TestClient | None = None
    url: str = ""

    def auth(self, scope: str = "ingest") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}

    @property
    def state(self) -> AppState:
        state: AppState = self.app.state.kgdx
        return state

    @property
    def store(self) -> InstanceStore:
        assert self.state.instances is not None
        return self.state.instances

    def files(self) -> list[Path]:
        return sorted(p for p in (self.home / "instances").rglob("*") if p.is_file())

    def spooled(self) -> list[Path]:
        return sorted((self.home / "spool").iterdir())


@contextmanager
def kgdx_app(home: Path) -> Iterator[Service]:
    """An app on ``home`` (no model), with a key per scope; ``$KGDX_HOME`` set meanwhile."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KGDX_HOME", str(home))
        for name in ("KGDX_DB_URL", "KGDX_ONTOLOGY", "KGDX_UID_SALT", "KGDX_NO_AUTH"):
            env.delenv(name, raising=False)
        with ServiceDatabase() as db:
            db.create_all()
            keys = {
                scope: ApiKeyStore(db).create(f"stow-{scope}", [scope])[1]
                for scope in ("predict", "ingest", "admin")
            }
        app = create_app(Settings(checkpoint=home / "no-model"))
        yield Service(app, home, keys)


@contextmanager
def live_server(home: Path) -> Iterator[Service]:
    """The app served by uvicorn on 127.0.0.1 in a thread, for real HTTP clients."""
    with kgdx_app(home) as svc:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(
            svc.app, host="127.0.0.1", port=port, log_config=None, lifespan="on", workers=1
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="kgdx-live", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        svc.url = f"http://127.0.0.1:{port}"
        try:
            yield svc
        finally:
            server.should_exit = True
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with (
        kgdx_app(tmp_path_factory.mktemp("stow-home")) as service,
        TestClient(service.app, raise_server_exceptions=False) as client,
    ):
        service.client = client
        yield service


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with live_server(tmp_path_factory.mktemp("stow-live")) as service:
        yield service


# -- bodies ----------------------------------------------------------------------------------


def dx(study: str | None = None, **attrs: object) -> Dataset:
    """A small DX radiograph (in ``study`` when given)."""
    if study is not None:
        attrs["StudyInstanceUID"] = study
    kwargs: dict[str, Any] = {"rows": 16, "columns": 16, "bits": 8, **attrs}
    return images.dicom_dataset(**kwargs)


def multipart(
    *parts: bytes | Dataset | tuple[str | None, bytes], boundary: str = BOUNDARY
) -> bytes:
    """A STOW-RS body; a part is a dataset, DICOM bytes, or (Content-Type or None, bytes)."""
    out = []
    for part in parts:
        kind: str | None
        if isinstance(part, Dataset):
            kind, data = "application/dicom", images.write_dicom(part)
        elif isinstance(part, bytes):
            kind, data = "application/dicom", part
        else:
            kind, data = part
        head = f"--{boundary}\r\n" + (f"Content-Type: {kind}\r\n" if kind else "") + "\r\n"
        out += [head.encode(), data, b"\r\n"]
    out.append(f"--{boundary}--".encode())
    return b"".join(out)


def post(
    svc: Service,
    body: bytes,
    *,
    study: str | None = None,
    content_type: str = CONTENT_TYPE,
    scope: str | None = "ingest",
) -> Reply:
    assert svc.client is not None
    path = "/dicomweb/studies" + (f"/{study}" if study else "")
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    if scope:
        headers.update(svc.auth(scope))
    return svc.client.post(path, content=body, headers=headers)


def referenced(body: dict[str, Any]) -> list[dict[str, Any]]:
    seq = body["00081199"]
    assert seq["vr"] == "SQ"
    items: list[dict[str, Any]] = seq.get("Value", [])
    return items


def failed(body: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = body.get("00081198", {}).get("Value", [])
    return items


def value(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def assert_dicom_json(r: Reply, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body: dict[str, Any] = r.json()
    assert "00081199" in body  # always, even when empty
    return body


def assert_error(r: Reply, status: int, fragment: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert fragment.lower() in body["error"]["message"].lower(), body


# -- success ---------------------------------------------------------------------------------


def test_all_stored_is_200_with_references_and_retrieve_urls(svc: Service) -> None:
    study = generate_uid()
    instances = [dx(study), dx(study), dx(study, ViewPosition="LL")]
    r = post(svc, multipart(*instances))
    body = assert_dicom_json(r, 200)
    base = "http://testserver/dicomweb/studies"
    assert body["00081190"] == {"vr": "UR", "Value": [f"{base}/{study}"]}
    assert "00081198" not in body
    items = referenced(body)
    assert [value(i, "00081155") for i in items] == [d.SOPInstanceUID for d in instances]
    for item, ds in zip(items, instances, strict=True):
        assert value(item, "00081150") == DX
        assert value(item, "00081190") == (
            f"{base}/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
        assert "00081196" not in item
    # Durable before the answer: a row and a file each, the bytes as sent.
    for ds in instances:
        row = svc.store.get(ds.SOPInstanceUID)
        assert row is not None and row.study_uid == study and row.skip_reason is None
        assert svc.store.path_of(row).read_bytes() == images.write_dicom(ds)
    assert svc.store.get(instances[2].SOPInstanceUID).view_position == "LL"  # type: ignore[union-attr]
    assert svc.spooled() == []
    # The audit trail has the hashed UIDs, never the clear ones.
    audit = svc.state.audit
    assert audit is not None
    last = audit.recent(1)[0]
    assert last["route"] == "/dicomweb/studies" and last["status"] == 200
    assert last["study_uid_hash"] == hash_uid(study)
    assert last["instance_uid_hash"] == hash_uid(instances[0].SOPInstanceUID)


def test_study_url_stores_instances_of_that_study(svc: Service) -> None:
    study = generate_uid()
    r = post(svc, multipart(dx(study), dx(study)), study=study)
    body = assert_dicom_json(r, 200)
    assert len(referenced(body)) == 2
    assert value(body, "00081190").endswith(f"/dicomweb/studies/{study}")


def test_no_preamble_and_unlabelled_parts_are_accepted(svc: Service) -> None:
    bare, labelled = dx(), dx()
    body = multipart((None, images.write_dicom(bare, preamble=False)), labelled)
    r = post(svc, body)
    assert len(referenced(assert_dicom_json(r, 200))) == 2
    assert svc.store.get(bare.SOPInstanceUID) is not None


def test_non_image_sop_class_is_stored_and_skipped(svc: Service) -> None:
    sr = dcmread(io.BytesIO(images.no_pixel_dicom_bytes()))
    image = dx(sr.StudyInstanceUID)
    r = post(svc, multipart(sr, image))
    items = referenced(assert_dicom_json(r, 200))
    assert [value(i, "00081150") for i in items] == [SR, DX]
    row = svc.store.get(sr.SOPInstanceUID)
    assert row is not None and row.skip_reason == "non-image SOP class (Basic Text SR Storage)"
    assert svc.store.get(image.SOPInstanceUID).skip_reason is None  # type: ignore[union-attr]
    assert svc.store.path_of(row).exists()


# -- idempotence -----------------------------------------------------------------------------


def test_resending_is_idempotent(svc: Service) -> None:
    study = generate_uid()
    first, second = dx(study), dx(study)
    body = multipart(first, second)
    one = assert_dicom_json(post(svc, body), 200)
    files_before = svc.files()
    rows_before = svc.store.by_study(study)
    again = assert_dicom_json(post(svc, body), 200)  # Orthanc re-forwarding the study
    assert again == one
    assert svc.files() == files_before and svc.store.by_study(study) == rows_before

    # The same SOP Instance UID with other bytes: the first copy stays, with a warning.
    changed = images.dicom_dataset(rows=16, columns=16, bits=8, seed=7)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(changed, keyword, getattr(first, keyword))
    changed.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    third = dx(study)
    r = post(svc, multipart(changed, third))
    answer = assert_dicom_json(r, 202)
    assert "00081198" not in answer  # a warning, not a failure: Orthanc still counts it sent
    items = referenced(answer)
    assert [value(i, "00081196") for i in items] == [ELEMENTS_DISCARDED, None]
    row = svc.store.get(first.SOPInstanceUID)
    assert row is not None
    assert svc.store.path_of(row).read_bytes() == images.write_dicom(first)
    assert len(svc.store.by_study(study)) == 3


# -- partial and total failure ---------------------------------------------------------------


def test_mixed_good_and_bad_parts_is_202(svc: Service) -> None:
    good = dx()
    no_study = dx()
    del no_study.StudyInstanceUID
    body = multipart(
        good,
        ("text/plain", b"Clinical indication: cough"),
        images.non_image_bytes("pdf"),
        no_study,
    )
    r = post(svc, body)
    body_json = assert_dicom_json(r, 202)
    assert [value(i, "00081155") for i in referenced(body_json)] == [good.SOPInstanceUID]
    failures = failed(body_json)
    assert [value(f, "00081197") for f in failures] == [
        CANNOT_UNDERSTAND,
        CANNOT_UNDERSTAND,
        NOT_SOP_CLASS,
    ]
    assert value(failures[2], "00081155") == no_study.SOPInstanceUID
    assert value(failures[2], "00081150") == DX
    assert failures[0]["00081155"] == {"vr": "UI"}  # unknown: present, empty
    assert svc.store.get(no_study.SOPInstanceUID) is None
    assert svc.spooled() == []


def test_nothing_stored_is_409_with_an_empty_referenced_sequence(svc: Service) -> None:
    r = post(svc, multipart(images.non_image_bytes("text"), ("application/json", b"{}")))
    body = assert_dicom_json(r, 409)
    assert body["00081199"] == {"vr": "SQ", "Value": []}
    assert body["00081190"] == {"vr": "UR"}
    assert [value(f, "00081197") for f in failed(body)] == [CANNOT_UNDERSTAND] * 2


def test_study_uid_mismatch_fails_those_instances(svc: Service) -> None:
    study, other = generate_uid(), generate_uid()
    inside, outside = dx(study), dx(other)
    r = post(svc, multipart(inside, outside), study=study)
    body = assert_dicom_json(r, 202)
    assert [value(i, "00081155") for i in referenced(body)] == [inside.SOPInstanceUID]
    (failure,) = failed(body)
    assert value(failure, "00081197") == STUDY_MISMATCH == 43265
    assert value(failure, "00081155") == outside.SOPInstanceUID
    assert svc.store.get(outside.SOPInstanceUID) is None
    r = post(svc, multipart(dx(other)), study=study)
    assert [value(f, "00081197") for f in failed(assert_dicom_json(r, 409))] == [STUDY_MISMATCH]


# -- malformed requests: JSON error bodies ----------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        f"multipart/form-data; boundary={BOUNDARY}",
        f'multipart/related; type="application/json"; boundary={BOUNDARY}',
        f"multipart/related; boundary={BOUNDARY}",
    ],
)
def test_wrong_media_type_is_415(svc: Service, content_type: str) -> None:
    assert_error(post(svc, multipart(dx()), content_type=content_type), 415, "multipart/related")


def test_missing_boundary_is_400(svc: Service) -> None:
    r = post(svc, multipart(dx()), content_type='multipart/related; type="application/dicom"')
    assert_error(r, 400, "boundary")


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_unterminated_body_is_400_and_stores_nothing(svc: Service, keep: float) -> None:
    good = dx()
    body = multipart(dx(), good)
    r = post(svc, body[: int(len(body) * keep)])
    assert_error(r, 400, "unterminated")
    assert svc.store.get(good.SOPInstanceUID) is None
    assert svc.spooled() == []


def test_no_parts_and_bad_url_uid_are_400(svc: Service) -> None:
    assert_error(post(svc, f"--{BOUNDARY}--".encode()), 400, "no parts")
    assert_error(post(svc, multipart(dx()), study="1.2.x"), 400, "not a valid")


def test_over_the_size_limit_is_413(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.routes.dicomweb as routes

    monkeypatch.setattr(
        routes, "limits_from_settings", lambda _: MultipartLimits(max_bytes=4096, max_parts=2)
    )
    big = dx(rows=64, columns=64)
    assert_error(post(svc, multipart(big)), 413, "larger than 4096")
    assert_error(post(svc, multipart(dx(), dx(), dx())), 413, "more than 2 parts")
    assert svc.spooled() == []


# -- a full disk -----------------------------------------------------------------------------


def test_a_full_disk_fails_the_instance_and_the_service_keeps_serving(
    svc: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = generate_uid()
    ok, victim = dx(study), dx(study)
    victim_bytes = images.write_dicom(victim)
    real = mp._write

    def write(fh: IO[bytes], data: bytes) -> None:
        if data == victim_bytes[: len(data)]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, data)

    monkeypatch.setattr(mp, "_write", write)
    r = post(svc, multipart(ok, victim_bytes))
    body = assert_dicom_json(r, 202)
    assert [value(i, "00081155") for i in referenced(body)] == [ok.SOPInstanceUID]
    (failure,) = failed(body)
    assert value(failure, "00081197") == OUT_OF_RESOURCES
    assert value(failure, "00081155") == victim.SOPInstanceUID  # named from its first bytes
    assert svc.store.get(victim.SOPInstanceUID) is None
    assert not any(victim.SOPInstanceUID in p.name for p in svc.files())
    assert svc.spooled() == []

    # Storing (not spooling) hits the full disk: also 0xA700, nothing half-written.
    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mp, "_write", real)
    monkeypatch.setattr("service.instances.os.replace", full)
    body = assert_dicom_json(post(svc, multipart(victim)), 409)
    assert [value(f, "00081197") for f in failed(body)] == [OUT_OF_RESOURCES]
    assert svc.spooled() == [] and svc.store.get(victim.SOPInstanceUID) is None

    monkeypatch.undo()  # space again: the PACS re-sends, and it lands
    body = assert_dicom_json(post(svc, multipart(victim)), 200)
    assert svc.store.get(victim.SOPInstanceUID) is not None


# -- auth, PHI -------------------------------------------------------------------------------


def test_ingest_scope_is_required(svc: Service) -> None:
    body = multipart(dx())
    assert_error(post(svc, body, scope=None), 401, "API key")
    assert_error(post(svc, body, scope="predict"), 403, "ingest")
    assert_dicom_json(post(svc, body, scope="admin"), 200)


def test_no_patient_data_in_answers_or_logs(svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ok = dx()
    r = post(svc, multipart(ok, images.non_image_bytes("html")))
    assert r.status_code == 202
    text = r.text + caplog.text
    for planted in (images.PATIENT_NAME, images.PATIENT_ID, images.ACCESSION_NUMBER):
        assert planted not in text
    assert ok.SOPInstanceUID not in caplog.text and ok.StudyInstanceUID not in caplog.text


# -- real HTTP: chunked bodies and a bounded memory ----------------------------------------------


def test_chunked_upload_with_boundaries_split_across_chunks(live: Service) -> None:
    study = generate_uid()
    instances = [dx(study) for _ in range(3)]
    body = multipart(*instances)

    def chunks() -> Iterator[bytes]:
        i, sizes = 0, [1, 2, 3, 5, 7, 11, 13, 97, 1000]
        while i < len(body):
            size = sizes[i % len(sizes)]
            yield body[i : i + size]
            i += size

    headers = {"Content-Type": CONTENT_TYPE, **live.auth()}
    r = httpx.post(f"{live.url}/dicomweb/studies", content=chunks(), headers=headers, timeout=60)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    items = referenced(assert_dicom_json(r, 200))
    assert [value(i, "00081155") for i in items] == [d.SOPInstanceUID for d in instances]
    assert value(items[0], "00081190").startswith(f"{live.url}/dicomweb/studies/{study}/")


def _big_header(study: str, rows: int, columns: int) -> tuple[Dataset, bytes]:
    """A DX header whose 16-bit Pixel Data (rows x columns) follows as a separate stream."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = images.DX_STORAGE
    ds.SOPClassUID = images.DX_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    length = rows * columns * 2
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length)
    return ds, images.write_dicom(ds) + pixel_header


def test_a_large_study_streams_with_flat_memory(live: Service) -> None:
    parts, rows, columns = 20, 1600, 1600  # 20 x 5.1 MB
    study = generate_uid()
    headers = [_big_header(study, rows, columns) for _ in range(parts)]
    block = bytes(range(256)) * 256  # 64 KiB of pixel data, sent again and again
    pixel_bytes = rows * columns * 2
    total = 0

    def body() -> Iterator[bytes]:
        nonlocal total
        for _, head in headers:
            first = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + head
            total += len(first)
            yield first
            left = pixel_bytes
            while left:
                piece = block[: min(left, len(block))]
                total += len(piece)
                yield piece
                left -= len(piece)
            yield b"\r\n"
        yield f"--{BOUNDARY}--".encode()

    request_headers = {"Content-Type": CONTENT_TYPE, **live.auth()}
    with httpx.Client(timeout=120) as client:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            r = client.post(f"{live.url}/dicomweb/studies", content=body(), headers=request_headers)
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
    items = referenced(assert_dicom_json(r, 200))
    assert len(items) == parts
    assert total > 100 * 10**6
    assert peak < 16 * 2**20, f"peak Python memory grew by {peak / 2**20:.1f} MiB"
    pixels = (block * (pixel_bytes // len(block) + 1))[:pixel_bytes]
    expected = hashlib.sha256(headers[0][1] + pixels)
    row = live.store.get(headers[0][0].SOPInstanceUID)
    assert row is not None and row.size == len(headers[0][1]) + pixel_bytes
    assert row.sha256 == expected.hexdigest()
    stored = dcmread(live.store.path_of(row))
    assert stored.pixel_array.shape == (rows, columns)
