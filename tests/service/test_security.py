"""Security and PHI hygiene of the service, one test per claim.

Claims (issue 6): every endpoint but ``/healthz``, ``/readyz`` and ``/metrics`` needs a valid
key; scopes grant exactly what :data:`SCOPE_MATRIX` says; keys are hashed at rest and never
logged; upload, body, part, pixel-count and decompression limits hold; XML is never parsed
with entities; model files load only as safetensors; path parameters cannot escape; CORS is
closed by default; the per-key rate limit answers 429; library messages that quote a
patient's value never reach the log. The live end-to-end PHI test (a real ``kgdx serve`` and
Orthanc) is ``tests/integration/test_phi_hygiene.py``.

Two services are shared by the module to keep it quick: ``default`` (default settings) and
``strict`` (small limits, one CORS origin); both keep the study worker idle.

Tests marked ``xfail(strict=True)`` pin a gap whose fix lies in a file this change could not
touch; each reason names the file and the fix. Once fixed they fail as XPASS, and the marker
goes with the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import anyio
import fastapi.routing
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit
from sqlalchemy import MetaData, create_engine, select
from starlette.types import Message
from typer.testing import CliRunner

from service.apikeys import ApiKeyStore
from service.app import create_app
from service.cli import app as kgdx_cli
from service.db import ServiceDatabase
from service.logs import configure_logging
from service.settings import Settings
from tests.kgdx_server import build_tiny_checkpoint
from tests.service import images
from tests.service.conftest import Served

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kg", "models", "service", "bench")
runner = CliRunner()

#: The only routes open without a key.
OPEN = {"/healthz", "/readyz", "/metrics"}
#: FastAPI's own documentation routes (see test_api_docs_need_a_key).
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
#: A value for each path parameter that passes its validation.
SAMPLE_PARAMS = {"result_id": "0" * 32, "concept_id": "X:finding", "study_uid": "1.2.3"}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
SCOPES = ("predict", "ingest", "admin")

#: What each scope may do, written out here rather than read from the code under test:
#: (method, route, predict, ingest, admin) -> the status a valid key of that scope gets.
#: The PACS (ingest) stores and lists studies; a viewer (predict) reads results; admin does
#: both. 200 means "let in and served": the ``world`` fixture makes every resource exist.
SCOPE_MATRIX: list[tuple[str, str, int, int, int]] = [
    ("POST", "/v1/predict", 200, 403, 200),
    ("GET", "/v1/results/{result_id}", 200, 403, 200),
    ("GET", "/v1/results/{result_id}/overlay.png", 200, 403, 200),
    ("GET", "/v1/results/{result_id}/sr", 200, 403, 200),
    ("GET", "/v1/results/{result_id}/fhir", 200, 403, 200),
    ("GET", "/v1/ontologies", 200, 403, 200),
    ("GET", "/v1/concepts/{concept_id}", 200, 403, 200),
    ("GET", "/v1/paths", 200, 403, 200),
    ("GET", "/v1/studies/{study_uid}", 200, 403, 200),
    ("POST", "/dicomweb/studies", 403, 200, 200),
    ("POST", "/dicomweb/studies/{study_uid}", 403, 200, 200),
    ("GET", "/dicomweb/studies", 403, 200, 200),
]

#: Limits of the ``strict`` service.
LIMIT = 64 * 1024
MAX_PIXELS = 1_000_000
MAX_PARTS = 2
VIEWER = "https://viewer.example"
CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Services shared by the module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """``$KGDX_HOME`` for the module's services (tests may point it elsewhere for a while)
    and the tiny checkpoint, whose ontology is stored there."""
    root = tmp_path_factory.mktemp("security")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KGDX_HOME", str(root / "home"))
        for name in ("KGDX_DB_URL", "KGDX_ONTOLOGY", "KGDX_UID_SALT"):
            mp.delenv(name, raising=False)
        yield root / "home", build_tiny_checkpoint(root / "ckpt")


def _start(home: Path, checkpoint: Path, name: str, **overrides: Any) -> Served:
    with ServiceDatabase() as db:
        db.create_all()
        store = ApiKeyStore(db)
        keys = {s: store.create(f"{name}-{s}", [s])[1] for s in SCOPES}
    settings = Settings(checkpoint=checkpoint, max_wait_ms=2.0, stable_seconds=86400.0, **overrides)
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.__enter__()
    return Served(client, keys, home)


@pytest.fixture(scope="module")
def default(module_home: tuple[Path, Path]) -> Iterator[Served]:
    served = _start(*module_home, "default")
    yield served
    served.client.__exit__(None, None, None)


@pytest.fixture(scope="module")
def strict(module_home: tuple[Path, Path]) -> Iterator[Served]:
    served = _start(
        *module_home,
        "strict",
        max_upload_bytes=LIMIT,
        max_stow_bytes=LIMIT,
        max_stow_parts=MAX_PARTS,
        max_pixels=MAX_PIXELS,
        max_inflated_bytes=LIMIT,
        cors_origins=[VIEWER],
    )
    yield served
    served.client.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def route_table(app: Any) -> dict[str, set[str]]:
    """Every route path the app serves -> its methods, routers included, schema or not.

    FastAPI 0.16x keeps an included router as one ``_IncludedRouter`` entry of
    ``app.routes`` (no path of its own); ``fastapi.routing.iter_route_contexts`` flattens
    them. (A walk of ``app.routes`` alone finds only the documentation routes.)
    """
    walk = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(walk(app.routes)) if walk is not None else list(app.routes)
    table: dict[str, set[str]] = {}
    for route in routes:
        path = getattr(route, "path", None)
        if path:
            table.setdefault(path, set()).update(getattr(route, "methods", None) or set())
    return table


def schema_operations(app: Any) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if method.upper() in METHODS
    }


def protected_operations(app: Any) -> set[tuple[str, str]]:
    """(method, path) of every operation in the OpenAPI document or the router, but the
    open probes and the documentation routes."""
    ops = schema_operations(app)
    for path, methods in route_table(app).items():
        ops |= {(m, path) for m in methods if m not in ("HEAD", "OPTIONS")}
    return {(m, p) for m, p in ops if p not in OPEN | DOCS}


def concrete(path: str, params: dict[str, str] | None = None) -> str:
    values = {**SAMPLE_PARAMS, **(params or {})}
    return re.sub(r"\{(\w+)\}", lambda m: quote(values[m.group(1)], safe=""), path)


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """``response`` is the service's JSON error body with ``status`` (and ``code``)."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body


def stow_body(*parts: bytes, boundary: str = "kgdxSecBoundary") -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body of ``parts``."""
    out = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    out += b"--" + boundary.encode() + b"--\r\n"
    return out, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(served: Served, body: bytes, ctype: str, scope: str = "ingest", **headers: str) -> Any:
    return served.client.post(
        "/dicomweb/studies",
        content=body,
        headers={**served.auth(scope), "Content-Type": ctype, **headers},
    )


def form_body(data: bytes, name: str = "x.png", boundary: str = "kgdxFormBoundary") -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode()


def predict(served: Served, data: bytes, name: str, scope: str = "predict") -> Any:
    return served.client.post(
        "/v1/predict", files={"file": (name, data)}, headers=served.auth(scope)
    )


def study_of(dicom: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(dicom), stop_before_pixels=True).StudyInstanceUID)


def is_stored(served: Served, study_uid: str) -> bool:
    r = served.client.get(
        "/dicomweb/studies", params={"StudyInstanceUID": study_uid}, headers=served.auth("admin")
    )
    assert r.status_code in (200, 204), r.text
    return r.status_code == 200


@dataclass
class Driven:
    """What :func:`drive` saw: the status, the body, and how many request-body bytes the
    app had pulled when it started to answer."""

    status: int
    body: bytes
    read: int

    def json(self) -> Any:
        return json.loads(self.body)


def drive(
    served: Served,
    method: str,
    raw_path: bytes,
    headers: dict[str, str] | None = None,
    chunks: Iterable[bytes] = (),
) -> Driven:
    """One request straight into the running app, as a server hands it over: ``raw_path``
    as the client sent it (an HTTP client library would normalise ``../`` away; ``path`` is
    percent-decoded as uvicorn does), the body one ``http.request`` message per chunk (a
    test client sends it in one). Runs on the app's own event loop."""
    body_chunks = list(chunks)
    seen: dict[str, Any] = {"status": 0, "body": [], "read": 0, "started": False}

    async def call() -> None:
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path.decode("latin-1")),
            "raw_path": raw_path,
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"testserver"),
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        pending = iter([*body_chunks, b""])
        finished = anyio.Event()

        async def receive() -> Message:
            chunk = next(pending, None)
            if chunk is None:  # the whole body was read: like uvicorn, wait for the answer
                await finished.wait()
                return {"type": "http.disconnect"}
            if not seen["started"]:
                seen["read"] += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": bool(chunk)}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"], seen["started"] = message["status"], True
            elif message["type"] == "http.response.body":
                seen["body"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    finished.set()

        await served.client.app(scope, receive, send)

    assert served.client.portal is not None
    served.client.portal.call(call)
    return Driven(seen["status"], b"".join(seen["body"]), seen["read"])


def zeros(head: bytes, size: int, tail: bytes) -> Iterator[bytes]:
    """``head``, ``size`` zero bytes in 64 KiB chunks, ``tail``."""
    yield head
    for _ in range(size // CHUNK):
        yield b"\0" * CHUNK
    yield tail


def upload_frame(route: str) -> tuple[str, str, bytes, bytes]:
    """(scope, content type, head, tail) of a one-file upload to ``route``."""
    if route == "/v1/predict":
        head = form_body(b"").split(b"\r\n--kgdxFormBoundary--")[0]
        tail = b"\r\n--kgdxFormBoundary--\r\n"
        return "predict", "multipart/form-data; boundary=kgdxFormBoundary", head, tail
    head = b"--kgdxSecBoundary\r\nContent-Type: application/dicom\r\n\r\n"
    return "ingest", stow_body()[1], head, b"\r\n--kgdxSecBoundary--\r\n"


def source_files(*packages: str) -> Iterator[tuple[str, str]]:
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text(encoding="utf-8")


def secret_file(tmp_path: Path) -> tuple[Path, str]:
    secret = "KGDX-SECRET-" + os.urandom(6).hex()
    path = tmp_path / "secret.txt"
    path.write_text(secret + "\n")
    return path, secret


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def service_log() -> Iterator[Callable[[], io.StringIO]]:
    """``start()`` sends the service's log (JSON lines through its PHI filter, as
    ``configure_logging`` sets it up) to a buffer and returns it; the root logger is put
    back after the test. Call it in the test itself: pytest resets ``warnings.showwarning``
    between a fixture's setup and the test, which would undo the capture of warnings."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def start() -> io.StringIO:
        buffer = io.StringIO()
        logging.captureWarnings(False)  # forget a capture an earlier test's service made
        with contextlib.redirect_stderr(buffer):
            configure_logging("DEBUG")
        return buffer

    yield start
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


# ---------------------------------------------------------------------------------------------
# Authentication: every operation but the probes needs a valid key
# ---------------------------------------------------------------------------------------------


def _revoked_key() -> str:
    with ServiceDatabase() as db:
        store = ApiKeyStore(db)
        _, key = store.create(f"revoked-{os.urandom(3).hex()}", ["admin"])
        store.revoke(key)
    return key


def test_every_operation_but_the_probes_needs_a_valid_key(default: Served) -> None:
    app: Any = default.client.app
    ops = protected_operations(app)
    # Not vacuous: the walk finds every operation of the schema, and the table has them all.
    assert {(m, p) for m, p in schema_operations(app) if p not in OPEN} <= ops
    assert {(m, p) for m, p, *_ in SCOPE_MATRIX} == ops, "a new route needs a SCOPE_MATRIX row"
    admin = default.keys["admin"]
    credentials = {
        "none": {},
        "empty-bearer": {"Authorization": "Bearer "},
        "other-scheme": {"Authorization": f"Basic {admin}"},
        "malformed": {"Authorization": "Bearer kgdx_00_bad"},
        "unknown-id": {"Authorization": "Bearer kgdx_0123456789ab_" + "A" * 43},
        "tampered-secret": {"Authorization": "Bearer " + admin[:-3] + "AAA"},
        "revoked": {"Authorization": f"Bearer {_revoked_key()}"},
        "revoked-x-api-key": {"X-API-Key": _revoked_key()},
    }
    for name, headers in credentials.items():
        for method, path in sorted(ops):
            r = default.client.request(method, concrete(path), headers=headers)
            assert r.status_code == 401, (name, method, path, r.status_code)
            assert_error(r, 401, "unauthorized")
            assert r.headers.get("www-authenticate") == "Bearer", (name, method, path)
        for path in OPEN:
            assert default.client.get(path, headers=headers).status_code == 200, (name, path)


def test_no_undeclared_method_answers(default: Served) -> None:
    """A method a route does not declare is a 405 (or the 401 of a key check), never a 2xx."""
    for path, declared in route_table(default.client.app).items():
        if path in OPEN | DOCS:
            continue
        for method in set(METHODS) - declared:
            r = default.client.request(method, concrete(path))
            assert r.status_code in (401, 405), (method, path, r.status_code)


def test_api_docs_need_a_key(default: Served) -> None:
    """Served behind a key, or not at all."""
    for path in sorted(DOCS):
        assert default.client.get(path).status_code in (401, 404), path


# ---------------------------------------------------------------------------------------------
# Scopes: the matrix above, route by route
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(default: Served) -> dict[str, Any]:
    """A predicted DICOM (its result, study and concepts) and the same DICOM stored by
    STOW-RS, so that every route of the matrix has something to serve."""
    dcm = images.dicom_bytes(bits=8)
    r = predict(default, dcm, "a.dcm", "admin")
    assert r.status_code == 200, r.text
    result = r.json()
    assert stow(default, *stow_body(dcm), scope="admin").status_code == 200
    concepts = [f["concept"]["id"] for f in result["findings"]]
    return {
        "dicom": dcm,
        "params": {"result_id": result["id"], "study_uid": study_of(dcm)},
        "query": {"/v1/paths": {"from": concepts[0], "to": concepts[-1]}},
        "concept": concepts[0],
    }


def _request(served: Served, world: dict[str, Any], method: str, route: str, scope: str) -> Any:
    url = concrete(route, {**world["params"], "concept_id": world["concept"]})
    if route == "/v1/predict":
        return predict(served, world["dicom"], "a.dcm", scope)
    if route.startswith("/dicomweb/studies") and method == "POST":
        body, ctype = stow_body(world["dicom"])  # the same instance again: a faithful re-send
        headers = {**served.auth(scope), "Content-Type": ctype}
        return served.client.post(url, content=body, headers=headers)
    params = world["query"].get(route)
    return served.client.request(method, url, params=params, headers=served.auth(scope))


def test_scope_matrix(default: Served, world: dict[str, Any]) -> None:
    for method, route, *expected in SCOPE_MATRIX:
        for scope, want in zip(SCOPES, expected, strict=True):
            r = _request(default, world, method, route, scope)
            if want == 403:
                body = assert_error(r, 403, "forbidden")
                assert "scope" in body["error"]["message"], (method, route, scope)
            else:
                assert r.status_code == want, (method, route, scope, r.status_code, r.text[:300])


def test_a_forbidden_request_changes_nothing(default: Served, world: dict[str, Any]) -> None:
    other = images.dicom_bytes(bits=8, seed=5)
    study = study_of(other)
    assert_error(stow(default, *stow_body(other), scope="predict"), 403)
    assert_error(predict(default, other, "b.dcm", "ingest"), 403)
    assert not is_stored(default, study)
    r = default.client.get(f"/v1/studies/{study}", headers=default.auth("admin"))
    assert_error(r, 404)  # no result either


# ---------------------------------------------------------------------------------------------
# API keys: hashed at rest, never logged
# ---------------------------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    result = runner.invoke(kgdx_cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def _dump_database(url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            return "\n".join(
                repr(row) for table in meta.sorted_tables for row in conn.execute(select(table))
            )
    finally:
        engine.dispose()


def test_api_keys_are_hashed_at_rest_and_never_logged(
    default: Served,
    service_log: Callable[[], io.StringIO],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    log = service_log()
    created = _cli("apikey", "create", "--name", "sec-test", "--scope", "predict")
    key = created.stdout.strip().splitlines()[-1]
    key_id, secret = key.split("_", 2)[1:]
    assert created.output.count(key) == 1  # shown once, on its own line
    c = default.client
    bearer = {"Authorization": f"Bearer {key}"}
    answers = [
        c.get("/v1/ontologies", headers=bearer),  # ok
        c.get("/v1/ontologies", headers={"X-API-Key": key}),  # ok, the other header
        c.post("/v1/predict", files={"file": ("x.png", b"not an image")}, headers=bearer),
        c.get("/dicomweb/studies", headers=bearer),  # wrong scope
        c.get("/v1/ontologies", headers={"Authorization": f"Bearer {key}x"}),  # mangled
        c.get(f"/v1/results/{key}", headers=bearer),  # pasted into a URL
    ]
    assert [r.status_code for r in answers] == [200, 200, 415, 403, 401, 422]
    _cli("apikey", "revoke", key)  # the whole key pasted: revoked by its id
    answers.append(c.get("/v1/ontologies", headers=bearer))
    assert answers[-1].status_code == 401
    listed = _cli("apikey", "list", "--json")

    assert '"status": 403' in log.getvalue()  # the log did see these requests
    assert secret not in log.getvalue()  # what the service writes
    # What anything in the service tried to log, before redaction (the test's own HTTP
    # client logs the URLs it requests: not the service).
    tried = [r.getMessage() for r in caplog.records if not r.name.startswith("httpx")]
    assert tried and not [m for m in tried if secret in m]
    assert all(secret not in r.text for r in answers)
    assert secret not in listed.output
    home = default.home
    files = [p for p in home.iterdir() if p.name.startswith("kgdx.db")]
    assert files and all(secret.encode() not in p.read_bytes() for p in files)
    dump = _dump_database(f"sqlite:///{home / 'kgdx.db'}")
    assert key_id in dump  # the public id is there (key table, audit)
    assert secret not in dump


# ---------------------------------------------------------------------------------------------
# Limits: body size, parts, pixels, decompression
# ---------------------------------------------------------------------------------------------


def test_oversize_bodies_are_refused_before_they_are_read(strict: Served) -> None:
    """A declared Content-Length over the limit is refused unread, with or without a key; a
    chunked STOW-RS body is cut off at the limit."""
    for route in ("/v1/predict", "/dicomweb/studies"):
        scope, ctype, head, tail = upload_frame(route)
        for keyed in (False, True):
            headers = {"Content-Type": ctype, **(strict.auth(scope) if keyed else {})}
            declared = {**headers, "Content-Length": str(8 * 2**20)}
            got = drive(strict, "POST", route.encode(), declared, zeros(head, 8 * 2**20, tail))
            want = 413 if keyed or route == "/v1/predict" else 401
            assert (got.status, got.read) == (want, 0), (route, keyed, got.status, got.read)
            assert set(got.json()) == {"error"}
            if route == "/dicomweb/studies":
                got = drive(strict, "POST", route.encode(), headers, zeros(head, 8 * 2**20, tail))
                assert got.status == (413 if keyed else 401), (route, keyed, got.status)
                assert got.read <= LIMIT + 2 * CHUNK, (route, keyed, got.read)


def test_a_chunked_oversize_upload_is_cut_off(strict: Served) -> None:
    scope, ctype, head, tail = upload_frame("/v1/predict")
    for keyed in (False, True):
        headers = {"Content-Type": ctype, **(strict.auth(scope) if keyed else {})}
        got = drive(strict, "POST", b"/v1/predict", headers, zeros(head, 8 * 2**20, tail))
        assert got.status in (401, 413), got.status
        assert got.read <= LIMIT + 64 * 1024 + 2 * CHUNK, (keyed, got.read)


def test_stow_part_count_limit(strict: Served) -> None:
    parts = [images.dicom_bytes(bits=8, seed=i) for i in range(MAX_PARTS + 1)]
    r = stow(strict, *stow_body(*parts))
    assert f"{MAX_PARTS} parts" in assert_error(r, 413)["error"]["message"]
    assert not any(is_stored(strict, study_of(p)) for p in parts)  # none of the body kept


@pytest.fixture
def decode_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every pixel decode (Pillow's load, the DICOM pixel decoder)."""
    import service.decode

    calls: list[str] = []
    pil_load = ImageFile.ImageFile.load
    dicom_to_array = service.decode.dicom_to_array

    def load(self: Any, *a: Any, **k: Any) -> Any:
        calls.append(f"pillow {self.size}")
        return pil_load(self, *a, **k)

    def to_array(ds: Any, *a: Any, **k: Any) -> Any:
        calls.append(f"dicom {ds.Rows}x{ds.Columns}")
        return dicom_to_array(ds, *a, **k)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(service.decode, "dicom_to_array", to_array)
    return calls


def test_pixel_bombs_are_refused_from_the_header(strict: Served, decode_spy: list[str]) -> None:
    bombs = {
        "bomb.png": images.bomb_png(),
        "bomb.jpg": images.bomb_jpeg(),
        "bomb.dcm": images.bomb_dicom(),
        "just-over.png": images.bomb_png(1001, 1000),
        "just-over.dcm": images.bomb_dicom(rows=1001, columns=1000),
    }
    for name, data in bombs.items():
        assert len(data) < 4096, name  # tiny on the wire
        r = predict(strict, data, name)
        assert "pixels" in assert_error(r, 413)["error"]["message"], name
    assert decode_spy == []  # nothing was decoded
    at_limit = io.BytesIO()
    Image.new("L", (1000, 1000), 90).save(at_limit, "PNG")  # exactly MAX_PIXELS: fine
    assert predict(strict, at_limit.getvalue(), "ok.png").status_code == 200


def _jpeg_frame_dicom(side: int) -> bytes:
    """A 64x64 DICOM whose JPEG frame is ``side`` x ``side``: the header passes the pixel
    limit, the codestream does not."""
    jpg = io.BytesIO()
    Image.new("L", (side, side), 128).save(jpg, "JPEG", quality=50)
    ds = images.dicom_dataset(rows=64, columns=64, bits=8)
    ds.PixelData = encapsulate([jpg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return images.write_dicom(ds)


def test_a_compressed_frame_bigger_than_its_header_is_refused_before_decoding(
    strict: Served, decode_spy: list[str]
) -> None:
    r = predict(strict, _jpeg_frame_dicom(1200), "frame.dcm")  # 1.44 M pixels, limit 1 M
    assert decode_spy == [] and r.status_code in (413, 422), (decode_spy, r.status_code)


def _deflate_bomb(inflated: int) -> bytes:
    """A Deflated Explicit VR Little Endian DX that inflates to more than ``inflated`` bytes
    (zeros in a private element; deflate packs them about 1000:1)."""
    ds = images.dicom_dataset(rows=32, columns=32, bits=8)
    ds.add_new(0x00091010, "OB", b"\0" * inflated)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return images.write_dicom(ds)


def test_a_deflated_dicom_bomb_is_refused(strict: Served) -> None:
    bomb = _deflate_bomb(4 * 2**20)  # 4 MiB inflated, limit 64 KiB
    assert len(bomb) < LIMIT // 4
    r = stow(strict, *stow_body(bomb))
    assert r.status_code in (409, 413), r.status_code
    assert_error(predict(strict, bomb, "bomb.dcm"), 413)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_content_encoding_is_never_inflated(strict: Served, encoding: str) -> None:
    """A compressed body is not decoded: the very body that succeeds in clear fails when
    sent compressed, so no compression bomb reaches a parser."""
    pack: Callable[[bytes], bytes] = gzip.compress if encoding == "gzip" else zlib.compress
    dcm = images.dicom_bytes(bits=8)
    cases = [
        (
            "/v1/predict",
            form_body(images.png_bytes(width=64, height=48)),
            "multipart/form-data; boundary=kgdxFormBoundary",
            "predict",
        ),
        ("/dicomweb/studies", *stow_body(dcm), "ingest"),
    ]
    for route, body, ctype, scope in cases:
        headers = {**strict.auth(scope), "Content-Type": ctype}
        bomb = pack(body + b"\0" * (16 * 2**20))  # 16 MiB of zeros after a valid body
        assert len(bomb) < LIMIT
        r = strict.client.post(
            route, content=bomb, headers={**headers, "Content-Encoding": encoding}
        )
        assert r.status_code in (400, 415, 422), (route, r.status_code)
        assert_error(r, r.status_code)
    assert not is_stored(strict, study_of(dcm))  # the compressed STOW stored nothing
    for route, body, ctype, scope in cases:  # the same bodies in clear are fine
        headers = {**strict.auth(scope), "Content-Type": ctype}
        assert strict.client.post(route, content=body, headers=headers).status_code == 200


# ---------------------------------------------------------------------------------------------
# XML: never parsed with entities, anywhere
# ---------------------------------------------------------------------------------------------

RDF_OPEN = (
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
    'xmlns:rdfs="http://www.w3.org/2000/01/rdf-schema#" '
    'xmlns:owl="http://www.w3.org/2002/07/owl#">'
)
LAUGHS = ' <!ENTITY lol0 "lol">\n' + "".join(
    f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">\n' for i in range(1, 10)
)


def _evil_xml(kind: str, secret: Path) -> str:
    label = {"laughs": "&lol9;", "external": "&xxe;", "parameter": "&all;"}[kind]
    dtd = {
        "laughs": LAUGHS,
        "external": f' <!ENTITY xxe SYSTEM "file://{secret}">\n',
        "parameter": f' <!ENTITY % remote SYSTEM "file://{secret.with_suffix(".dtd")}"> %remote;\n',
    }[kind]
    return (
        f'<?xml version="1.0"?>\n<!DOCTYPE rdf:RDF [\n{dtd}]>\n{RDF_OPEN}\n'
        f'<owl:Class rdf:about="http://purl.obolibrary.org/obo/X_1">'
        f"<rdfs:label>{label}</rdfs:label></owl:Class>\n</rdf:RDF>\n"
    )


@pytest.mark.parametrize("kind", ["laughs", "external", "parameter"])
def test_ontology_load_refuses_entities(tmp_home: Path, tmp_path: Path, kind: str) -> None:
    secret_path, secret = secret_file(tmp_path)
    secret_path.with_suffix(".dtd").write_text(f'<!ENTITY all SYSTEM "file://{secret_path}">')
    for suffix in (".owl", ".xml", ".rdf"):
        evil = tmp_path / f"evil{suffix}"
        evil.write_text(_evil_xml(kind, secret_path))
        result = runner.invoke(kgdx_cli, ["ontology", "load", str(evil), "--name", "evil"])
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ") and "DTD or entities" in result.stderr
        assert secret not in result.output and "lollol" not in result.output
        assert "Traceback" not in result.output
    listed = runner.invoke(kgdx_cli, ["ontology", "list", "--json"])
    assert json.loads(listed.stdout)["ontologies"] == []  # nothing stored


def test_xml_is_parsed_in_one_place_only_and_through_defusedxml() -> None:
    """Every XML parser import of the product; a new one must be reviewed and listed here."""
    importer = re.compile(
        r"^\s*(?:from|import)\s+(xml|lxml|defusedxml|xmltodict|rdflib|pronto|untangle)\b",
        re.MULTILINE,
    )
    found = {path: set(importer.findall(text)) for path, text in source_files(*PACKAGES)}
    assert {p: m for p, m in found.items() if m} == {"kg/loaders/owl.py": {"xml", "defusedxml"}}
    owl = (REPO / "kg/loaders/owl.py").read_text()
    # The standard library only lends types; parsing goes through defusedxml, DTDs forbidden.
    assert re.findall(r"from xml\.\S+ import (.+)", owl) == ["Element, ParseError, TreeBuilder"]
    assert "from defusedxml.ElementTree import DefusedXMLParser, iterparse" in owl
    assert "forbid_dtd=True" in owl
    for path, text in source_files(*PACKAGES):
        assert not re.search(r"\b(?:fromstring|XMLParser|minidom|getxmp)\s*\(", text), path


def _png_with_xmp(xmp: str) -> bytes:
    """A PNG carrying ``xmp`` in an iTXt ``XML:com.adobe.xmp`` chunk, where XMP lives."""
    png = images.png_bytes(width=64, height=48)
    # keyword NUL, compression flag and method, empty language and translated keyword
    payload = b"iTXt" + b"XML:com.adobe.xmp\0" + b"\0\0\0\0" + xmp.encode()
    chunk = len(payload[4:]).to_bytes(4, "big") + payload + zlib.crc32(payload).to_bytes(4, "big")
    end = png.rindex(b"IEND") - 4
    return png[:end] + chunk + png[end:]


def test_xml_inside_uploads_is_never_parsed(
    default: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret_path, secret = secret_file(tmp_path)
    evil = _evil_xml("external", secret_path) + _evil_xml("laughs", secret_path)
    parsed: list[str] = []

    def getxmp(self: Image.Image, **kwargs: Any) -> dict[str, Any]:
        parsed.append("xmp")
        return {}

    monkeypatch.setattr(Image.Image, "getxmp", getxmp)
    r = predict(default, _png_with_xmp(evil), "x.png")
    assert r.status_code == 200 and parsed == []  # XMP metadata is never read
    r2 = predict(default, evil.encode(), "x.xml")
    assert_error(r2, 415)
    body, _ = stow_body(evil.encode())
    xml_type = 'multipart/related; type="application/dicom+xml"; boundary=kgdxSecBoundary'
    r3 = default.client.post(
        "/dicomweb/studies",
        content=body,
        headers={**default.auth("ingest"), "Content-Type": xml_type},
    )
    assert_error(r3, 415)
    for answer in (r, r2, r3):
        assert secret not in answer.text and "lollol" not in answer.text


# ---------------------------------------------------------------------------------------------
# Model files: safetensors only, never a pickle
# ---------------------------------------------------------------------------------------------


class _Plant:
    """Unpickling this creates the folder ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def _plant_pickles(folder: Path, marker: Path) -> None:
    import torch

    payload = pickle.dumps({"state_dict": _Plant(marker)})
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"):
        (folder / name).write_bytes(payload)
    torch.save({"weights": _Plant(marker)}, folder / "checkpoint.pt")


def test_a_checkpoint_loads_only_from_safetensors(
    module_home: tuple[Path, Path], tmp_path: Path
) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Plant(control)))
    assert control.is_dir()  # the payload works: loading it would leave the marker
    marker = tmp_path / "PICKLE-WAS-LOADED"
    for how in ("no-safetensors", "pickle-named-safetensors"):
        bad = tmp_path / how
        shutil.copytree(module_home[1], bad)
        _plant_pickles(bad, marker)
        weights = bad / "model.safetensors"
        if how == "no-safetensors":
            weights.unlink()
        else:
            weights.write_bytes((bad / "checkpoint.pt").read_bytes())  # torch.save's zip
        served = _start(module_home[0], bad, how)
        try:
            r = served.client.get("/readyz")
            assert "safetensors" in assert_error(r, 503)["error"]["message"], how
        finally:
            served.client.__exit__(None, None, None)
    assert not marker.exists()


def test_encoders_load_only_safetensors(tmp_path: Path) -> None:
    from torch import nn

    from models.errors import EncoderError
    from models.image_encoder import load_backbone_weights
    from models.text_encoder import TextEncoder, TextEncoderConfig

    marker = tmp_path / "PICKLE-WAS-LOADED"
    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    _plant_pickles(folder, marker)
    with pytest.raises(EncoderError, match="only safetensors"):
        TextEncoder(TextEncoderConfig(name_or_path=str(folder)))
    with pytest.raises(EncoderError, match=r"only \.safetensors"):
        load_backbone_weights(nn.Linear(2, 2), folder / "model.pt")
    assert not marker.exists()


def _call_arguments(text: str, start: int) -> str:
    """The text between the ``(`` ending at ``start`` and its matching ``)``."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def test_no_pickle_loader_in_the_product() -> None:
    """No torch.load, pickle, joblib or allow_pickle anywhere; every from_pretrained of
    weights insists on safetensors; no remote code."""
    banned = re.compile(
        r"torch\.load\s*\(|\bpickle\.loads?\s*\(|\bdill\b|\bjoblib\b|cloudpickle|"
        r"allow_pickle\s*=\s*True|weights_only\s*=\s*False|trust_remote_code\s*=\s*True|"
        r"torch\.hub\.load|marshal\.loads?\s*\("
    )
    for path, text in source_files(*PACKAGES):
        found = banned.search(text)
        assert found is None, (path, found)
        for m in re.finditer(r"(\w+)\.from_pretrained\s*\(", text):
            if "Tokenizer" in m.group(1) or m.group(1).endswith(("Config", "Processor")):
                continue
            assert "use_safetensors=True" in _call_arguments(text, m.end()), (path, m.group(0))


# ---------------------------------------------------------------------------------------------
# Path parameters and store names cannot escape
# ---------------------------------------------------------------------------------------------

ESCAPES = [
    "../../../../etc/passwd",
    "..%2f..%2f..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "..%5c..%5c..%5cwindows%5cwin.ini",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "1.2.3%00.png",
    "1.2.3%2f..%2f..%2f..",
    "X" * 5000,
]


def test_path_parameters_cannot_escape(default: Served, tmp_path: Path) -> None:
    secret_path, secret = secret_file(tmp_path)
    relative = os.path.relpath(secret_path, default.home / "instances")
    attacks = [*ESCAPES, relative, quote(relative, safe=""), quote(str(secret_path), safe="")]
    before = files_under(tmp_path)
    auth = {"Authorization": f"Bearer {default.keys['admin']}"}
    routes = sorted(p for p in route_table(default.client.app) if "{" in p)
    assert len(routes) == 7, routes
    for route in routes:
        for attack in attacks:
            raw = re.sub(r"\{\w+\}", attack, route).encode()
            got = drive(default, "GET", raw, auth)
            assert got.status in (400, 404, 405, 422), (raw[:120], got.status)
            assert secret.encode() not in got.body and b"root:" not in got.body
    assert files_under(tmp_path) == before


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # pydicom, on the planted UIDs
@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("SOPInstanceUID", "../../../../escaped"),
        ("SOPInstanceUID", "/tmp/escaped"),
        ("SOPInstanceUID", "1.2.3\0escaped"),
        ("StudyInstanceUID", "../../escaped"),
        ("SeriesInstanceUID", "1.2.3/../../../escaped"),
    ],
)
def test_instance_uids_cannot_name_files_outside_the_store(
    default: Served, attribute: str, value: str
) -> None:
    ds = images.dicom_dataset(bits=8)
    with pydicom.config.disable_value_validation():
        setattr(ds, attribute, value)
        if attribute == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(value)
        data = images.write_dicom(ds)
    root = default.home.parent
    before = files_under(root)
    r = stow(default, *stow_body(data))
    assert r.status_code == 409, r.text
    [failed] = r.json()["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]  # the UIDs are refused, nothing stored
    new = files_under(root) - before
    assert all(p.is_relative_to(default.home) and "escaped" not in str(p) for p in new), new
    assert not list(Path("/tmp").glob("escaped*"))


def test_ontology_store_names_are_not_paths(tmp_home: Path, tmp_path: Path) -> None:
    obo = tmp_path / "mini.obo"
    obo.write_text("format-version: 1.4\nontology: mini\n\n[Term]\nid: X:1\nname: One\n")
    before = files_under(tmp_path)
    for name in ("../../../escaped", "/tmp/escaped-abs"):
        result = runner.invoke(kgdx_cli, ["ontology", "load", str(obo), "--name", name])
        assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
    shown = runner.invoke(kgdx_cli, ["ontology", "show", "X:1", "-o", "../../../../etc/passwd"])
    assert shown.exit_code == 1 and "root:" not in shown.output
    new = files_under(tmp_path) - before
    assert all(p.is_relative_to(tmp_home) for p in new), new
    assert not list(Path("/tmp").glob("escaped*"))


# ---------------------------------------------------------------------------------------------
# CORS: closed by default, only the configured origins when opened
# ---------------------------------------------------------------------------------------------

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


def test_cors_is_closed_by_default(default: Served) -> None:
    for path in ("/v1/predict", "/healthz", "/dicomweb/studies"):
        r = default.client.options(path, headers={"Origin": VIEWER, **PREFLIGHT})
        assert "access-control-allow-origin" not in r.headers, (path, dict(r.headers))
        assert r.status_code in (401, 405), (path, r.status_code)
    r = default.client.get("/v1/ontologies", headers={"Origin": VIEWER, **default.auth()})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_echoes_only_the_configured_origins(strict: Served) -> None:
    c = strict.client
    ok = c.options("/v1/predict", headers={"Origin": VIEWER, **PREFLIGHT})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == VIEWER
    assert "access-control-allow-credentials" not in ok.headers
    bad = c.options("/v1/predict", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in bad.headers
    got = c.get("/v1/ontologies", headers={"Origin": VIEWER, **strict.auth()})
    assert got.headers["access-control-allow-origin"] == VIEWER
    other = c.get("/v1/ontologies", headers={"Origin": "https://evil.example", **strict.auth()})
    assert "access-control-allow-origin" not in other.headers
    with pytest.raises(ValueError, match="cors_origins"):
        Settings(cors_origins=["*"])


# ---------------------------------------------------------------------------------------------
# Rate limit: per key, 429 with Retry-After
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def rate_limited(
    module_home: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    monkeypatch.setenv("KGDX_RATE_LIMIT_PER_MINUTE", "3")  # as an operator sets it
    served = _start(*module_home, "rate")
    yield served
    served.client.__exit__(None, None, None)


def test_rate_limit_is_per_key(rate_limited: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    served = rate_limited
    app: Any = served.client.app
    assert app.state.kgdx.settings.rate_limit_per_minute == 3
    c = served.client
    statuses = [c.get("/v1/ontologies", headers=served.auth()).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    limited = c.get("/v1/ontologies", headers=served.auth())
    assert_error(limited, 429, "rate_limited")
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert c.get("/v1/ontologies", headers=served.auth("admin")).status_code == 200  # its own
    assert c.get("/healthz").status_code == 200  # probes are never limited
    monkeypatch.setenv("KGDX_RATE_LIMIT_PER_MINUTE", "0")
    with pytest.raises(ValueError, match="rate_limit_per_minute"):
        Settings()


# ---------------------------------------------------------------------------------------------
# PHI: library messages that quote a value never reach the log
# ---------------------------------------------------------------------------------------------


def test_library_messages_quoting_a_patient_value_are_redacted(
    service_log: Callable[[], io.StringIO],
) -> None:
    """pydicom warns (and logs) ``Invalid value for VR DA: '<value>'`` when a malformed birth
    date is copied into a new dataset (the SR), and highdicom then fails with ``invalid
    literal for int() ...: '<part of it>'``; neither value may reach the log, nor may the
    raw warning reach stderr."""
    from pydicom.valuerep import DA

    planted = "QZ" + os.urandom(3).hex()
    buffer = service_log()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        pydicom.Dataset().PatientBirthDate = planted
        try:
            DA(planted)
        except ValueError:
            logging.getLogger("kgdx.test").exception("job failed")
    log = buffer.getvalue()
    assert "Invalid value for VR DA" in log and "py.warnings" in log
    assert "invalid literal for int()" in log
    assert planted not in log and planted[:4] not in log
