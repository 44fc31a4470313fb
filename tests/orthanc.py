"""A throwaway Orthanc (a real open-source PACS) for the integration tests.

:func:`orthanc_server` starts the Debian ``Orthanc`` binary with the DICOMweb plugin on a
configuration written into a temporary folder: HTTP on 127.0.0.1 and a free port (remote
access off, so no authentication is needed on loopback), the DICOM (DIMSE) server off,
storage and index in the folder, ``StableAge`` short, and
``DicomWeb.Servers[<name>]`` pointing at a kgdx DICOMweb root with an ``Authorization``
header. The Lua script ``tests/integration/orthanc/forward.lua`` is installed: its
``OnStableStudy`` hook forwards each stable study to that server with
``POST /dicom-web/servers/<name>/stow {"Resources": [<study id>], "Synchronous": true}`` and
logs the outcome, and its ``IncomingHttpRequestFilter`` logs every HTTP request Orthanc
receives (method, URI, auth scheme). :meth:`OrthancServer.forwards` and
:meth:`OrthancServer.http_requests` read those lines back. It yields an
:class:`OrthancServer`; when Orthanc or the plugin cannot be had the caller gets
:class:`OrthancUnavailable` with the reason, for ``pytest.skip``.

The base configuration is ``tests/integration/orthanc/orthanc.json`` (what an integrator
would start from); this module only fills in ports, folders, the plugin path and the server.

What Orthanc 1.10.1 with DICOMweb plugin 1.7 (Debian bookworm) sends when the hook forwards
a study, as captured by the harness tests of ``tests/integration/test_orthanc_e2e.py`` (see also
``tests/integration/orthanc/NOTES.md``):

* ``POST <Url>studies`` (the server's ``Url`` + ``studies``; the trailing slash of ``Url``
  matters), HTTP/1.1, ``Transfer-Encoding: chunked`` (no ``Content-Length``),
  ``Content-Type: multipart/related; type="application/dicom"; boundary=<uuid>-<uuid>``
  (boundary unquoted), ``Accept: application/dicom+json``, no ``Expect``, plus every header
  of the server's ``HttpHeaders`` (here ``Authorization: Bearer <key>``).
* Body: no preamble; one part per instance, ``--<boundary>\\r\\nContent-Type:
  application/dicom\\r\\nContent-Length: <n>\\r\\n\\r\\n<DICOM Part 10 file, byte for
  byte as stored>\\r\\n``, then ``--<boundary>--`` with no CRLF after it. HTTP chunks do
  not follow the parts: libcurl sends chunks of up to 65524 bytes (a 66 KB instance came as
  65524 + 1296), so a part boundary may fall anywhere in a chunk. With
  ``"ChunkedTransfers": false`` on the server entry the same body comes with a
  ``Content-Length``.
* The answer must be a JSON object with ``00081199`` holding exactly as many items as
  instances sent, and no item in ``00081198`` or ``0008119A``; anything else (or a non-2xx
  status) makes the forward fail, which Orthanc only logs (the Lua ``RestApiPost`` answers
  ``nil``, the job ends in ``Failure``): it never retries. A success answers the job's
  content, ``{"InstancesCount": "1", "NetworkSizeMB": "0"}``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.kgdx_server import die_with_parent, free_port

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "integration" / "orthanc"
START_TIMEOUT_S = 60.0

#: Where Debian (and the upstream packages) put the binary and the DICOMweb plugin.
BINARY_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


class OrthancUnavailable(RuntimeError):
    """No Orthanc with the DICOMweb plugin could be found or started; the message says why."""


def find_orthanc() -> Path | None:
    """The ``Orthanc`` executable, or ``None``."""
    for candidate in BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return Path(found)
    return None


def find_dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's shared library, or ``None``."""
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    for pattern in ("/usr/lib/orthanc/libOrthancDicomWeb.so*", "/usr/share/orthanc/plugins/*"):
        for p in sorted(Path("/").glob(pattern.lstrip("/"))):
            if "DicomWeb" in p.name and p.is_file():
                return p
    return None


def missing_reason() -> str | None:
    """Why the Orthanc tests cannot run here, or ``None`` when they can."""
    if find_orthanc() is None:
        return "the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb)"
    if find_dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass(frozen=True)
class Forward:
    """One run of the ``OnStableStudy`` hook: which Orthanc study, and how it went."""

    study_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request received by Orthanc, as its request filter logged it."""

    method: str
    uri: str
    auth: str  # "none", or the scheme of the Authorization header ("Bearer", "Basic")


_FORWARD = re.compile(r"Lua says: kgdx-forward (ok|failed) study=(\S+)(?: error=(.*))?$")
_HTTP = re.compile(r"Lua says: kgdx-http (\S+) (\S+) auth=(\S+)$")


@dataclass
class OrthancServer:
    """A running Orthanc on 127.0.0.1:``port``; ``root`` holds its config, data and log."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    server_name: str = "kgdx"

    @property
    def url(self) -> str:
        """REST API base URL, no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root, for dicomweb-client and as kgdx's SR destination (no slash)."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    # -- REST helpers ----------------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> Any:
        """``GET path`` on the REST API; the decoded JSON."""
        r = httpx.get(f"{self.url}{path}", timeout=kw.pop("timeout", 30.0), **kw)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        """``POST path`` with a JSON (or raw bytes) body; the decoded JSON."""
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{self.url}{path}", content=content, timeout=kw.pop("timeout", 60.0), **kw)
        r.raise_for_status()
        return r.json() if r.content else None

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """Store one DICOM file (``POST /instances``); Orthanc's answer (``ID``,
        ``ParentStudy``, ``Status``: ``Success`` or ``AlreadyStored``)."""
        answer = self.post("/instances", dicom)
        assert isinstance(answer, dict), answer
        return answer

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's identifier of the study with this StudyInstanceUID, if stored."""
        for hit in self.post("/tools/lookup", study_uid.encode()) or []:
            if hit.get("Type") == "Study":
                return str(hit["ID"])
        return None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Orthanc's records of the instances of a study (``MainDicomTags`` ...)."""
        sid = self.study_id(study_uid)
        return [] if sid is None else list(self.get(f"/studies/{sid}/instances"))

    def stow_jobs(self) -> list[dict[str, Any]]:
        """Orthanc's STOW-RS client jobs (``Type`` ``DicomWebStowClient``), oldest first, each
        with ``State`` (``Success`` / ``Failure`` / ``Running`` ...) and ``Content``."""
        jobs = [j for j in self.get("/jobs?expand") if j.get("Type") == "DicomWebStowClient"]
        return sorted(jobs, key=lambda j: str(j.get("CreationTime", "")))

    def changes(self) -> list[dict[str, Any]]:
        """Orthanc's change log (``NewInstance``, ``StableStudy`` ...), oldest first."""
        out: list[dict[str, Any]] = []
        since = 0
        while True:
            page = self.get(f"/changes?since={since}&limit=1000")
            out.extend(page["Changes"])
            if page["Done"]:
                return out
            since = page["Last"]

    # -- DICOMweb (dicomweb-client) --------------------------------------------------------

    def dicomweb_client(self) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` on Orthanc's DICOMweb root."""
        from dicomweb_client.api import DICOMwebClient

        return DICOMwebClient(url=self.dicomweb_url)

    def search_sr(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the SR instances of a study (``Modality=SR``), as DICOM JSON."""
        client = self.dicomweb_client()
        return list(
            client.search_for_instances(
                study_instance_uid=study_uid, search_filters={"Modality": "SR"}
            )
        )

    def search_sr_series(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the SR series of a study."""
        client = self.dicomweb_client()
        return list(
            client.search_for_series(
                study_instance_uid=study_uid, search_filters={"Modality": "SR"}
            )
        )

    # -- what the Lua hooks logged ---------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_text()[-chars:]

    def forwards(self, study_id: str | None = None) -> list[Forward]:
        """Finished ``OnStableStudy`` forwards, oldest first (of one study when given)."""
        out = []
        for line in self.log_text().splitlines():
            m = _FORWARD.search(line)
            if m and (study_id is None or m.group(2) == study_id):
                out.append(Forward(m.group(2), m.group(1) == "ok", (m.group(3) or "").strip()))
        return out

    def http_requests(self) -> list[HttpRequest]:
        """Every HTTP request Orthanc received, oldest first."""
        out = []
        for line in self.log_text().splitlines():
            m = _HTTP.search(line)
            if m:
                out.append(HttpRequest(m.group(1), m.group(2), m.group(3)))
        return out

    def stow_received(self) -> list[HttpRequest]:
        """STOW-RS requests Orthanc received on its DICOMweb root (kgdx pushing an SR)."""
        return [
            r
            for r in self.http_requests()
            if r.method == "POST" and r.uri.rstrip("/").startswith("/dicom-web/studies")
        ]

    # -- lifetime --------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def wait_for(
    predicate: Any, timeout: float, interval: float = 0.25, what: str = "condition"
) -> Any:
    """Poll ``predicate()`` until it returns something truthy; that value. ``TimeoutError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_config(
    root: Path,
    *,
    port: int,
    plugin: Path,
    server_url: str,
    server_headers: dict[str, str],
    server_name: str = "kgdx",
    stable_age: int = 2,
    extra_server: dict[str, Any] | None = None,
) -> Path:
    """Write ``orthanc.json`` and the Lua script into ``root``; the config's path."""
    config = json.loads((TEMPLATES / "orthanc.json").read_text())
    storage = root / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    lua = root / "forward.lua"
    lua.write_text((TEMPLATES / "forward.lua").read_text().replace("${SERVER}", server_name))
    config.update(
        HttpPort=port,
        DicomServerEnabled=False,
        DicomPort=free_port(),  # unused (server off), but never a fixed port
        RemoteAccessAllowed=False,
        AuthenticationEnabled=False,
        StorageDirectory=str(storage),
        IndexDirectory=str(storage),
        StableAge=stable_age,
        Plugins=[str(plugin)],
        LuaScripts=[str(lua)],
    )
    server = {"Url": server_url, "HttpHeaders": dict(server_headers), **(extra_server or {})}
    config["DicomWeb"]["Servers"] = {server_name: server}
    path = root / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@contextlib.contextmanager
def orthanc_server(
    *,
    server_url: str,
    server_headers: dict[str, str] | None = None,
    server_name: str = "kgdx",
    stable_age: int = 2,
    extra_server: dict[str, Any] | None = None,
    keep_dir: Path | None = None,
) -> Iterator[OrthancServer]:
    """Start a throwaway Orthanc whose ``OnStableStudy`` forwards to ``server_url`` (a
    DICOMweb root ending in ``/``); yield it, stop it and remove its folder at the end.

    Args:
        server_url: the DICOMweb server Orthanc forwards to (``DicomWeb.Servers[name].Url``).
        server_headers: its ``HttpHeaders`` (``{"Authorization": "Bearer <key>"}``).
        stable_age: Orthanc's ``StableAge`` in seconds.
        extra_server: more fields of the server entry (``"ChunkedTransfers": false`` ...).
        keep_dir: make the folder under this one and keep it (logs for a failed test).

    Raises:
        OrthancUnavailable: no binary, no plugin, or it did not start.
    """
    reason = missing_reason()
    if reason:
        raise OrthancUnavailable(reason)
    binary, plugin = find_orthanc(), find_dicomweb_plugin()
    assert binary is not None and plugin is not None
    root = Path(tempfile.mkdtemp(prefix="kgdx-orthanc-", dir=keep_dir))
    port = free_port()
    config = write_config(
        root,
        port=port,
        plugin=plugin,
        server_url=server_url,
        server_headers=server_headers or {},
        server_name=server_name,
        stable_age=stable_age,
        extra_server=extra_server,
    )
    server = OrthancServer(port=port, root=root, server_name=server_name)
    try:
        with open(server.log_path, "wb") as out:
            server.proc = subprocess.Popen(
                [str(binary), "--verbose", str(config)],
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        _wait_ready(server)
        yield server
    finally:
        server.stop()
        if keep_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _wait_ready(server: OrthancServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise OrthancUnavailable(
                f"Orthanc exited with {server.proc.returncode}: {server.log_tail(1500)}"
            )
        try:
            r = httpx.get(f"{server.url}/system", timeout=2.0)
            if r.status_code == 200:
                plugins = httpx.get(f"{server.url}/plugins", timeout=2.0).json()
                if "dicom-web" not in plugins:
                    raise OrthancUnavailable(
                        f"the DICOMweb plugin did not load: {server.log_tail(1500)}"
                    )
                return
            last = f"/system {r.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    server.stop()
    raise OrthancUnavailable(f"Orthanc did not answer in {START_TIMEOUT_S:.0f}s ({last})")
