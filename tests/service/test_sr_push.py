"""The STOW-RS client that sends SRs back to the PACS: request shape, answers, errors."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import httpx
import pydicom
import pytest
import uvicorn
from pydicom.dataset import Dataset
from pydicom.uid import UID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.sr_push import (
    PermanentPushError,
    TransientPushError,
    push_sr,
)
from tests.postgres import free_port
from tests.service.images import dicom_dataset, write_dicom

ROOT = "http://pacs.test/dicom-web"
SOP = "1.2.826.0.1.3680043.10.1336.77"


def sr_like(sop: str = SOP) -> bytes:
    ds = dicom_dataset(rows=16, columns=16)
    ds.SOPInstanceUID = UID(sop)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
    return write_dicom(ds)


# -- a STOW-RS response body -----------------------------------------------------------------


def stow_answer(
    stored: list[str] = (),  # type: ignore[assignment]
    failed: list[tuple[str, int]] = (),  # type: ignore[assignment]
    retrieve: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": []}}
    for sop in stored:
        item: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.34"]},
            "00081155": {"vr": "UI", "Value": [sop]},
        }
        if retrieve:
            item["00081190"] = {"vr": "UR", "Value": [retrieve]}
        body["00081199"]["Value"].append(item)
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": [sop]},
                    "00081197": {"vr": "US", "Value": [reason]},
                }
                for sop, reason in failed
            ],
        }
    return body


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def parse_stow(request_ct: str, body: bytes) -> list[bytes]:
    """The parts of a multipart/related body (a test-side reader, boundary from the header)."""
    params = dict(p.strip().split("=", 1) for p in request_ct.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in head
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


# -- unit tests on a mock transport ----------------------------------------------------------


def test_the_request_is_a_stow_rs_multipart_related_post() -> None:
    data = sr_like()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, json=stow_answer(["1.2.826.0.1.3680043.10.1336.77"], retrieve="u")
        )

    outcome = push_sr(data, ROOT + "/", client=mock(handler))
    assert outcome.status == 200 and not outcome.already_stored
    assert outcome.sop_instance_uid == "1.2.826.0.1.3680043.10.1336.77"
    assert outcome.retrieve_url == "u"
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == ROOT + "/studies"
    ct = request.headers["content-type"]
    assert ct.startswith('multipart/related; type="application/dicom"; boundary=')
    assert request.headers["accept"] == "application/dicom+json"
    assert "authorization" not in request.headers
    assert parse_stow(ct, request.content) == [data]


def test_a_dataset_is_written_as_part10() -> None:
    ds = pydicom.dcmread(BytesIO(sr_like()))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=stow_answer([str(ds.SOPInstanceUID)]))

    push_sr(ds, ROOT, client=mock(handler))
    part = parse_stow(seen[0].headers["content-type"], seen[0].content)[0]
    assert part[128:132] == b"DICM"
    assert pydicom.dcmread(BytesIO(part)).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"user": "kgdx", "password": "s3"},
            "Basic " + base64.b64encode(b"kgdx:s3").decode(),
        ),
        ({"token": "tok-123"}, "Bearer tok-123"),
    ],
)
def test_authentication(kwargs: dict[str, Any], expected: str) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization", ""))
        return httpx.Response(200, json=stow_answer([SOP]))

    push_sr(sr_like(), ROOT, client=mock(handler), **kwargs)
    assert seen == [expected]


@pytest.mark.parametrize(
    ("status", "body", "already"),
    [
        (200, stow_answer([SOP]), False),
        (202, stow_answer([SOP], [("1.2.3", 0xC000)]), False),  # ours stored, another failed
        (409, stow_answer([], [(SOP, 0x0111)]), True),  # duplicate SOP Instance
        (202, stow_answer([], [(SOP, 0x0111)]), True),
        (409, None, True),  # conflict, no reason given: the usual answer to a re-send
        (409, stow_answer([]), True),
    ],
)
def test_stored_or_already_there_is_success(status: int, body: Any, already: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body) if body is not None else httpx.Response(status)

    outcome = push_sr(sr_like(), ROOT, client=mock(handler))
    assert (outcome.status, outcome.already_stored) == (status, already)


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (503, None, TransientPushError, "STOW-RS HTTP 503"),
        (500, stow_answer([]), TransientPushError, "STOW-RS HTTP 500"),
        (429, None, TransientPushError, "STOW-RS HTTP 429"),
        (408, None, TransientPushError, "STOW-RS HTTP 408"),
        (409, stow_answer([], [(SOP, 0xA700)]), TransientPushError, "out of resources (0xA700)"),
        (409, stow_answer([], [(SOP, 0xC000)]), PermanentPushError, "instance refused (0xC000)"),
        (409, stow_answer([], [(SOP, 0xA900)]), PermanentPushError, "instance refused (0xA900)"),
        (400, None, PermanentPushError, "STOW-RS HTTP 400"),
        (401, None, PermanentPushError, "STOW-RS HTTP 401"),
        (403, None, PermanentPushError, "STOW-RS HTTP 403"),
        (404, None, PermanentPushError, "STOW-RS HTTP 404"),
        (415, None, PermanentPushError, "STOW-RS HTTP 415"),
        (200, stow_answer(["1.2.3"]), PermanentPushError, "does not reference the instance"),
        (200, None, PermanentPushError, "does not reference the instance"),
    ],
)
def test_failures_are_transient_or_permanent(
    status: int, body: Any, error: type[Exception], message: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if body is None:
            return httpx.Response(status, text="<html>nope</html>")
        return httpx.Response(status, json=body)

    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        push_sr(sr_like(), ROOT, client=mock(handler))
    assert info.value.status == status  # type: ignore[attr-defined]
    assert SOP not in str(info.value)


@pytest.mark.parametrize(
    "exc",
    [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("x")],
)
def test_transport_errors_are_transient(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with pytest.raises(TransientPushError, match="STOW-RS request"):
        push_sr(sr_like(), ROOT, client=mock(handler))


def test_a_dicom_json_list_answer_is_read() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps([stow_answer([SOP])]).encode())

    assert push_sr(sr_like(), ROOT, client=mock(handler)).status == 200


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("ftp://pacs/dicom-web", {}, "http"),
        ("pacs:8042", {}, "http"),
        (ROOT, {"user": "u", "token": "t"}, "not both"),
    ],
)
def test_bad_arguments(url: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        push_sr(sr_like(), url, **kwargs)


def test_an_instance_without_sop_instance_uid_is_refused() -> None:
    ds = Dataset()
    ds.PatientName = "x"
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        push_sr(ds, ROOT, client=mock(lambda r: httpx.Response(200)))


# -- a real STOW-RS server on loopback -------------------------------------------------------


@dataclass
class FakeStow:
    """A tiny STOW-RS server: stores instances by SOPInstanceUID, fails the first requests
    with 503 when told, answers a re-sent instance like Orthanc (200, referenced) or with
    409 + failure reason 0x0111 (``duplicates="409"``)."""

    fail_first: int = 0
    duplicates: str = "orthanc"
    token: str | None = None
    stored: dict[str, bytes] = field(default_factory=dict)
    requests: int = 0
    statuses: list[int] = field(default_factory=list)
    url: str = ""

    async def studies(self, request: Request) -> Response:
        self.requests += 1
        response = await self._answer(request)
        self.statuses.append(response.status_code)
        return response

    async def _answer(self, request: Request) -> Response:
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            return Response(status_code=401)
        if self.requests <= self.fail_first:
            return Response("busy", status_code=503)
        ct = request.headers.get("content-type", "")
        if not ct.startswith("multipart/related") or 'type="application/dicom"' not in ct:
            return Response(status_code=415)
        referenced, failed = [], []
        for part in parse_stow(ct, await request.body()):
            ds = pydicom.dcmread(BytesIO(part))
            sop = str(ds.SOPInstanceUID)
            if sop in self.stored and self.duplicates == "409":
                failed.append((sop, 0x0111))
                continue
            self.stored.setdefault(sop, part)
            referenced.append(sop)
        body = stow_answer(referenced, failed, retrieve=f"{self.url}/studies/x")
        status = 200 if not failed else 202 if referenced else 409
        return JSONResponse(body, status_code=status, media_type="application/dicom+json")


@pytest.fixture
def fake_stow() -> Iterator[FakeStow]:
    yield from serve_fake_stow(FakeStow())


def serve_fake_stow(fake: FakeStow) -> Iterator[FakeStow]:
    """Run ``fake`` with uvicorn on a loopback port in a thread, for the test's length."""
    app = Starlette(routes=[Route("/dicom-web/studies", fake.studies, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the fake STOW-RS server did not start")
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{port}/dicom-web"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(10)


def test_push_to_a_real_server_retries_then_lands_once(fake_stow: FakeStow) -> None:
    fake_stow.fail_first = 1
    data = sr_like()
    with pytest.raises(TransientPushError, match="HTTP 503"):
        push_sr(data, fake_stow.url, timeout_s=5)
    first = push_sr(data, fake_stow.url, timeout_s=5)
    assert (first.status, first.already_stored) == (200, False)
    again = push_sr(data, fake_stow.url, timeout_s=5)  # a re-push after a crash
    assert again.status == 200
    assert list(fake_stow.stored) == [SOP]
    assert fake_stow.stored[SOP] == data


def test_a_409_duplicate_from_a_real_server_is_success(fake_stow: FakeStow) -> None:
    fake_stow.duplicates = "409"
    push_sr(sr_like(), fake_stow.url, timeout_s=5)
    again = push_sr(sr_like(), fake_stow.url, timeout_s=5)
    assert (again.status, again.already_stored) == (409, True)
    assert fake_stow.statuses == [200, 409]


def test_a_closed_port_is_transient() -> None:
    with pytest.raises(TransientPushError, match="ConnectError"):
        push_sr(sr_like(), f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2)


def test_a_bearer_token_reaches_the_server(fake_stow: FakeStow) -> None:
    fake_stow.token = "tok"
    with pytest.raises(PermanentPushError, match="HTTP 401"):
        push_sr(sr_like(), fake_stow.url, timeout_s=5)
    assert push_sr(sr_like(), fake_stow.url, token="tok", timeout_s=5).status == 200
