"""A real ``kgdx serve`` process for the integration tests.

:class:`KgdxServer` runs the ``kgdx`` CLI (``python -c 'from service.cli import main; main()'
serve``, the console script's own entry point, so no PATH lookup) as a child process on
127.0.0.1 and a free port, with a given ``$KGDX_HOME`` and settings passed as ``KGDX_*``
environment variables. :meth:`KgdxServer.start` waits for ``/readyz``; :meth:`KgdxServer.kill`
sends SIGKILL (a crash: no drain, no cleanup), :meth:`KgdxServer.stop` SIGTERM (graceful), and
:meth:`KgdxServer.restart` starts a new process on the same home, port and settings. The
child's output goes to ``serve-<n>.log`` files next to the home, one per start, for the
failure messages.

A model to serve: :func:`checkpoint_for_home` gives the bundled default checkpoint
(``models/data/default/``) when there is one, else builds the tiny test checkpoint
(:mod:`tests.models.tiny_checkpoint`) whose ontology is stored in that home's store and whose
concept features are seeded in its feature cache, so serving needs no download.
:func:`create_api_key` runs ``kgdx apikey create`` against the home and returns the key.

Run as a script (``python -m tests.kgdx_server build-tiny DEST``) it builds the tiny
checkpoint into ``DEST`` for the ``$KGDX_HOME`` of its environment; the tests call it that way
so the test process's own environment and stores stay untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The kgdx CLI, exactly as the ``kgdx`` console script runs it.
KGDX_CLI = [sys.executable, "-c", "from service.cli import main; main()"]
START_TIMEOUT_S = 180.0

#: Settings of the parent environment that must not leak into a test server.
_SCRUBBED = ("KGDX_DB_URL", "KGDX_ONTOLOGY", "KGDX_CHECKPOINT", "KGDX_NO_AUTH", "KGDX_PORT")


def die_with_parent() -> None:
    """``preexec_fn`` for test servers: SIGKILL the child if the test process dies (Linux),
    so no Orthanc or kgdx outlives a crashed or killed pytest."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class KgdxServerError(RuntimeError):
    """The server did not start or answer; the message carries the tail of its log."""


def child_env(home: Path, settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a kgdx child process: ours, scrubbed, with ``home`` and
    ``settings``; the text encoder stays offline."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        KGDX_HOME=str(home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    pythonpath = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pythonpath if pythonpath else "")
    env.update(settings or {})
    return env


def run_cli(args: list[str], home: Path, timeout: float = 180.0) -> str:
    """Run ``kgdx ARGS`` against ``home``; returns stdout, raises with stderr on failure."""
    res = subprocess.run(
        [*KGDX_CLI, *args],
        env=child_env(home),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise KgdxServerError(
            f"kgdx {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()[-1500:]}"
        )
    return res.stdout


def create_api_key(home: Path, name: str, scopes: list[str]) -> str:
    """``kgdx apikey create --name NAME --scope S...`` in ``home``; the key (last line)."""
    args = ["apikey", "create", "--name", name]
    for scope in scopes:
        args += ["--scope", scope]
    out = run_cli(args, home)
    return out.strip().splitlines()[-1].strip()


def checkpoint_for_home(home: Path, workdir: Path) -> Path | None:
    """The checkpoint a test server in ``home`` should serve.

    ``None`` (the bundled default; ``KGDX_CHECKPOINT`` left unset) when
    ``models/data/default/`` holds one; else the tiny checkpoint, built into
    ``workdir/tiny-checkpoint`` with its ontology stored in ``home``.
    """
    from models.default_checkpoint import default_checkpoint_dir

    if (default_checkpoint_dir() / "checkpoint.json").is_file():
        return None
    dest = workdir / "tiny-checkpoint"
    run_cli_module(["build-tiny", str(dest)], home)
    return dest


def run_cli_module(args: list[str], home: Path, timeout: float = 300.0) -> None:
    """``python -m tests.kgdx_server ARGS`` with ``$KGDX_HOME=home``."""
    res = subprocess.run(
        [sys.executable, "-m", "tests.kgdx_server", *args],
        env=child_env(home),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise KgdxServerError(
            f"tests.kgdx_server {' '.join(args)} failed ({res.returncode}): "
            f"{res.stderr.strip()[-1500:]}"
        )


def build_tiny_checkpoint(dest: Path) -> Path:
    """The service tests' tiny checkpoint, for the ``$KGDX_HOME`` of this process."""
    from dataclasses import replace

    import torch

    from kg.home import kgdx_home
    from kg.tensors import to_arrays
    from tests.models.conftest import IN_DIM, tiny_config, tiny_ontology
    from tests.models.tiny_checkpoint import save_tiny, store_ontology, tiny_model

    ontology = tiny_ontology()
    arrays = to_arrays(ontology)
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(
        torch.randn(arrays.num_nodes, IN_DIM, generator=g), dim=-1
    )
    version = store_ontology(ontology, features, kgdx_home())
    torch.manual_seed(0)
    # Clinical text, if any, goes through the real MiniLM, so the model takes its width.
    model = tiny_model(arrays, features, config=replace(tiny_config(), text_dim=384))
    return save_tiny(dest, model, version, name=ontology.name)


@dataclass
class KgdxServer:
    """A ``kgdx serve`` child process on 127.0.0.1:``port`` with ``home`` as ``$KGDX_HOME``.

    Args:
        home: the ``$KGDX_HOME`` folder (database, stores, files).
        settings: extra ``KGDX_*`` variables (``KGDX_CHECKPOINT``, ``KGDX_STABLE_SECONDS``,
            ``KGDX_SR_DESTINATION_URL`` ...), kept across restarts.
        port: the port (a free one when 0), kept across restarts.
    """

    home: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    log_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
        if self.log_dir is None:
            self.log_dir = self.home.parent

    @property
    def url(self) -> str:
        """Base URL, no trailing slash."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS ``POST <root>/studies``), with its trailing slash."""
        return f"{self.url}/dicomweb/"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> KgdxServer:
        """Start the process and wait until ``/readyz`` answers 200."""
        if self.running:
            raise KgdxServerError("already running")
        self.starts += 1
        assert self.log_dir is not None
        log = self.log_dir / f"kgdx-serve-{self.port}-{self.starts}.log"
        self.logs.append(log)
        env = child_env(
            self.home,
            {
                "KGDX_HOST": "127.0.0.1",
                "KGDX_PORT": str(self.port),
                "KGDX_DEVICE": os.environ.get("KGDX_TEST_DEVICE", "cpu"),
                **self.settings,
            },
        )
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*KGDX_CLI, "serve"],
                env=env,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    code = self.proc.returncode if self.proc else None
                    raise KgdxServerError(f"kgdx serve exited with {code}: {self.log_tail()}")
                try:
                    r = client.get(f"{self.url}/readyz")
                    if r.status_code == 200:
                        return
                    last = f"/readyz {r.status_code}: {r.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.2)
        self.kill()
        raise KgdxServerError(f"kgdx serve not ready in {timeout:.0f}s ({last}): {self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server (and anything in its process group): a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful drain), then SIGKILL after ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            self.kill()  # reap any leftover child in the group

    def restart(self, timeout: float = START_TIMEOUT_S) -> KgdxServer:
        """A new process on the same home, port and settings (after a kill or a stop)."""
        if self.running:
            self.stop()
        return self.start(timeout)

    def request(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        kw.setdefault("timeout", 10.0)
        return httpx.request(method, f"{self.url}{path}", headers=headers, **kw)

    def get(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        return self.request("GET", path, key, **kw)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the current (last) process's log."""
        if not self.logs:
            return "(not started)"
        try:
            return self.logs[-1].read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        """Every start's log, concatenated."""
        parts = []
        for p in self.logs:
            with contextlib.suppress(OSError):
                parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build-tiny":
        build_tiny_checkpoint(Path(argv[1]))
        return 0
    print("usage: python -m tests.kgdx_server build-tiny DEST", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
