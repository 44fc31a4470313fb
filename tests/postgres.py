"""A throwaway PostgreSQL server for the test run.

:func:`postgres_server` yields a :class:`PostgresServer`: the one named by
``$KGDX_TEST_PG_URL`` when set, else a fresh cluster made with the Debian server binaries
(``initdb`` into a temporary folder, listening on 127.0.0.1 on a free port, the socket in that
folder, ``fsync=off``) and stopped at the end. PostgreSQL refuses to run as root, so as root the
cluster belongs to the ``postgres`` user. When no server can be had the caller gets
:class:`PostgresUnavailable` with the reason, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import psycopg

from tests.ports import free_port

#: Environment variable naming an existing server to test against instead.
ENV_URL = "KGDX_TEST_PG_URL"
START_TIMEOUT_S = 60.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started; the message says why."""


@dataclass
class PostgresServer:
    """A reachable server and a database on it for tests.

    Args:
        url: SQLAlchemy URL (``postgresql+psycopg://...``) of the test database.
        external: whether the server came from ``$KGDX_TEST_PG_URL`` (never stopped here).
    """

    url: str
    external: bool = False
    _names: Iterator[int] = field(default_factory=lambda: count(1), repr=False)

    @property
    def dsn(self) -> str:
        """The URL in libpq form, for psycopg."""
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def fresh_database(self, prefix: str = "kgdx_t") -> str:
        """Create an empty database on the server; returns its SQLAlchemy URL."""
        name = f"{prefix}_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"


def find_bindir() -> Path | None:
    """Folder holding ``initdb`` and ``postgres``: newest Debian version, else ``$PATH``."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for d in reversed(candidates):
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Yield a server for the tests; raise :class:`PostgresUnavailable` when there is none."""
    external = os.environ.get(ENV_URL, "").strip()
    if external:
        url = external
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        server = PostgresServer(url=url, external=True)
        try:
            with psycopg.connect(server.dsn, connect_timeout=10):
                pass
        except psycopg.Error as exc:
            raise PostgresUnavailable(f"{ENV_URL} server unreachable: {exc}") from exc
        yield server
        return
    with _local_cluster() as server:
        yield server


@contextlib.contextmanager
def _local_cluster() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries not found (apt-get install postgresql, or set {ENV_URL})"
        )
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root and there is no 'postgres' user to own the cluster"
            ) from None
        user = "postgres"
    root = Path(tempfile.mkdtemp(prefix="kgdx-pg-"))
    data = root / "data"
    log = root / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        if user is not None:
            shutil.chown(root, user, user)
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            user,
        )
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={root}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=50",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=user,
                group=user,
                start_new_session=True,
            )
        base = f"postgresql://postgres@127.0.0.1:{port}"
        _wait_ready(f"{base}/postgres", proc, log)
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE kgdx_test")
        yield PostgresServer(url=f"postgresql+psycopg://postgres@127.0.0.1:{port}/kgdx_test")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str], user: str | None) -> None:
    res = subprocess.run(
        cmd, user=user, group=user, capture_output=True, text=True, timeout=120, check=False
    )
    if res.returncode != 0:
        raise PostgresUnavailable(
            f"{Path(cmd[0]).name} failed ({res.returncode}): {res.stderr.strip()[-500:]}"
        )


def _wait_ready(dsn: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PostgresUnavailable(f"postgres exited with {proc.returncode}: {_tail(log)}")
        try:
            with psycopg.connect(dsn, connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)
    raise PostgresUnavailable(f"postgres did not accept connections: {last}; {_tail(log)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # "fast" shutdown: roll back sessions, then exit
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace").strip()[-800:]
    except OSError:
        return "(no log)"
