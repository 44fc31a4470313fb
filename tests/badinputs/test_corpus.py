"""Every case of the bad-input corpus (:mod:`tests.badinputs.generate`) against the real thing.

HTTP cases go to a real ``kgdx serve`` child process (:class:`tests.kgdx_server.KgdxServer`,
started once for the module with the corpus's small limits), so what is checked is what a
client sees: the status, the ``{"error": {"code", "message"}}`` body with the expected
fragment, no traceback, no patient data; after each case a real radiograph still gets a 200
from ``/v1/predict`` and ``/healthz`` is 200.

CLI cases run in-process through Typer's ``CliRunner`` on ``service.cli.app`` (a subprocess
per case would import torch each time) against a throwaway ``$KGDX_HOME``: the exit code
(1 for errors, 2 for usage errors), ``Error: ...`` with the fragment on stderr, no traceback
and no "internal error"; after each case ``kgdx ontology list`` still works and, after a
failure, shows exactly what it showed before (nothing half-written), and a training run's
output folder was not created.

The corpus is generated into a temporary folder for the module, so there is nothing
committed to drift from the generator.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.badinputs.generate import (
    CASES,
    CATEGORIES,
    GOOD_IMAGE,
    REPO_ROOT,
    SERVICE_SETTINGS,
    Cli,
    Http,
    generate,
)
from tests.kgdx_server import KgdxServer, checkpoint_for_home, create_api_key

HTTP_IDS = [c.id for c in CASES if isinstance(c.target, Http)]
CLI_IDS = [c.id for c in CASES if isinstance(c.target, Cli)]
#: Never in an answer, whatever the input.
ALWAYS_ABSENT = ("Traceback", 'File "/')

runner = CliRunner()


@dataclass
class Corpus:
    root: Path
    entries: dict[str, dict[str, Any]]

    def entry(self, case_id: str) -> dict[str, Any]:
        return self.entries[case_id]

    def file(self, entry: dict[str, Any]) -> Path | None:
        return self.root / entry["file"] if entry["file"] else None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    generate(root)
    manifest = json.loads((root / "manifest.json").read_text())
    return Corpus(root, {e["id"]: e for e in manifest["cases"]})


def test_corpus_is_broad_and_declares_every_case(corpus: Corpus) -> None:
    entries = list(corpus.entries.values())
    assert len(entries) >= 50
    assert len({e["kind"] for e in entries}) >= 40
    assert {e["category"] for e in entries} == set(CATEGORIES)
    assert any(e["valid"] for e in entries) and any(not e["valid"] for e in entries)
    for e in entries:
        assert e["kind"].startswith(e["category"] + "/")
        assert e["fragment"], e["id"]
        if e["target"]["type"] == "cli":
            assert e["expect"] in ((0,) if e["valid"] else (1, 2)), e["id"]
        else:
            assert (200 <= e["expect"] < 300) == e["valid"], e["id"]
        if e["file"] is not None:
            assert (corpus.root / e["file"]).is_file()
    size = sum(p.stat().st_size for p in (corpus.root / "files").iterdir())
    assert size < 8_000_000  # small enough to generate on every CI run


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@dataclass
class CliHome:
    home: Path
    env: dict[str, str | None]

    def run(self, argv: list[str]) -> Any:
        return runner.invoke(app, argv, env=self.env)

    def ontologies(self) -> list[dict[str, Any]]:
        result = self.run(["ontology", "list", "--json"])
        assert result.exit_code == 0, result.output
        listed: list[dict[str, Any]] = json.loads(result.stdout)
        return listed


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory) -> CliHome:
    home = tmp_path_factory.mktemp("cli") / "home"
    env: dict[str, str | None] = {
        "KGDX_HOME": str(home),
        "KGDX_DB_URL": None,
        "KGDX_ONTOLOGY": None,
        "KGDX_CHECKPOINT": None,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cli = CliHome(home, env)
    fixture = REPO_ROOT / "tests" / "kg" / "fixtures" / "chest.obo"
    result = cli.run(["ontology", "load", str(fixture), "--activate", "--quiet"])
    assert result.exit_code == 0, result.output
    return cli


def _fill(argv: list[str], corpus: Corpus, file: Path | None, out: Path) -> list[str]:
    values = {"{file}": str(file), "{corpus}": str(corpus.root), "{out}": str(out)}
    filled = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(key, value)
        filled.append(arg)
    return filled


@pytest.mark.parametrize("case_id", CLI_IDS)
def test_cli_case(case_id: str, corpus: Corpus, cli_home: CliHome) -> None:
    entry = corpus.entry(case_id)
    out = corpus.root / "out" / case_id
    argv = _fill(entry["target"]["argv"], corpus, corpus.file(entry), out)
    before = cli_home.ontologies()
    result = cli_home.run(argv)
    output = result.output
    where = f"{case_id}: kgdx {' '.join(argv)} -> {result.exit_code}\n{output[-1500:]}"
    assert result.exit_code == entry["expect"], where
    if result.exception is not None:
        assert isinstance(result.exception, SystemExit), where
    fragment = entry["fragment"].lower()
    if entry["expect"] == 1:
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
        assert errors, where
        assert fragment in " ".join(errors).lower(), where
        assert "internal error" not in output, where
    elif entry["expect"] == 2:
        assert fragment in result.stderr.lower(), where
    else:
        assert fragment in output.lower(), where
    for absent in (*ALWAYS_ABSENT, *entry["absent"]):
        assert absent not in output, where
    # Nothing half-written, and the store still answers.
    after = cli_home.ontologies()
    if entry["valid"]:
        assert len(after) >= len(before), where
    else:
        assert after == before, where
        assert not out.exists(), where


def test_a_good_cli_command_works_after_the_corpus(corpus: Corpus, cli_home: CliHome) -> None:
    obo = corpus.root / "good.obo"
    obo.write_text(
        "format-version: 1.4\nontology: after-corpus\n\n[Term]\nid: G:1\nname: one\n\n"
        "[Term]\nid: G:2\nname: two\nis_a: G:1\n"
    )
    result = cli_home.run(["ontology", "load", str(obo), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["created"] is True
    result = cli_home.run(["ontology", "paths", "-o", "after-corpus", "G:2", "G:1", "--json"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


@dataclass
class Live:
    server: KgdxServer
    keys: dict[str, str]
    client: httpx.Client

    def headers(self, auth: str) -> dict[str, str]:
        if auth == "none":
            return {}
        if auth == "invalid":
            return {"Authorization": "Bearer kgdx_00_" + "x" * 40}
        if auth == "basic":
            return {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="}
        return {"Authorization": f"Bearer {self.keys[auth]}"}

    def send(self, entry: dict[str, Any], file: Path | None) -> httpx.Response:
        t = entry["target"]
        headers = self.headers(t["auth"])
        fields = [(name, (None, value)) for name, value in t["fields"]]
        kw: dict[str, Any] = {}
        if t["send"] == "file":
            assert file is not None
            part = (t["filename"] or file.name, file.read_bytes(), t["content_type"])
            kw["files"] = [("file", part), *fields]
        elif t["send"] == "form":
            kw["files"] = fields
        elif t["send"] == "raw":
            assert file is not None
            kw["content"] = file.read_bytes()
            if t["content_type"]:
                headers["Content-Type"] = t["content_type"]
        return self.client.request(t["method"], t["path"], headers=headers, **kw)

    def good_predict(self) -> httpx.Response:
        files = {"file": (GOOD_IMAGE.name, GOOD_IMAGE.read_bytes(), "image/png")}
        return self.client.post("/v1/predict", headers=self.headers("predict"), files=files)


class Starting:
    """``kgdx serve`` starting in a thread (with its API keys), while the CLI cases run.

    The thread lives until :meth:`close`: the server's parent-death signal is tied to the
    thread that started it.
    """

    def __init__(self, root: Path):
        self.root = root
        self.server: KgdxServer | None = None
        self.keys: dict[str, str] = {}
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kgdx-serve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            home = self.root / "home"
            home.mkdir()
            settings = dict(SERVICE_SETTINGS)
            checkpoint = checkpoint_for_home(home, self.root)
            if checkpoint is not None:
                settings["KGDX_CHECKPOINT"] = str(checkpoint)
            for scope in ("predict", "ingest"):
                self.keys[scope] = create_api_key(home, f"corpus-{scope}", [scope])
            self.server = KgdxServer(home, settings)
            self.server.start()
        except BaseException as exc:  # re-raised in the test thread by wait()
            self.error = exc
        finally:
            self._ready.set()
        self._closed.wait()

    def wait(self) -> KgdxServer:
        self._ready.wait()
        if self.error is not None:
            raise self.error
        assert self.server is not None
        return self.server

    def close(self) -> None:
        self._ready.wait()
        if self.server is not None:
            self.server.kill()
        self._closed.set()
        self._thread.join()


@pytest.fixture(scope="module", autouse=True)
def starting(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Starting | None]:
    """Starts the server at the module's first test, so that its start-up overlaps the CLI
    cases; not at all when no selected test needs it."""
    if not any("live" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    starting = Starting(tmp_path_factory.mktemp("serve"))
    yield starting
    starting.close()


@pytest.fixture(scope="module")
def live(starting: Starting | None) -> Iterator[Live]:
    assert starting is not None
    server = starting.wait()
    with httpx.Client(base_url=server.url, timeout=60.0) as client:
        yield Live(server, starting.keys, client)


@pytest.mark.parametrize("case_id", HTTP_IDS)
def test_http_case(case_id: str, corpus: Corpus, live: Live) -> None:
    entry = corpus.entry(case_id)
    r = live.send(entry, corpus.file(entry))
    text = r.text
    where = f"{case_id}: {r.status_code} {text[:600]}"
    assert r.status_code == entry["expect"], where
    fragment = entry["fragment"].lower()
    if r.status_code >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, where
        assert fragment in body["error"]["message"].lower(), where
    else:
        assert fragment in text.lower(), where
    for absent in (*ALWAYS_ABSENT, *entry["absent"]):
        assert absent not in text, where
    # The service is still well after it.
    good = live.good_predict()
    assert good.status_code == 200, f"after {case_id}: {good.status_code} {good.text[:300]}"
    assert live.client.get("/healthz").status_code == 200
    assert live.server.running


def test_a_burst_of_image_cases_and_good_requests_batches_without_harm(
    corpus: Corpus, live: Live
) -> None:
    """Every image and DICOM case at once, between good requests: the batcher gathers them
    into mixed batches, and still each gets its own answer and every good request a 200."""
    entries = [
        corpus.entry(c.id)
        for c in CASES
        if c.category in ("image", "dicom") and isinstance(c.target, Http)
    ]
    work: list[dict[str, Any] | None] = [None] * 8 + entries  # None: a good request
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(
            pool.map(
                lambda e: live.good_predict() if e is None else live.send(e, corpus.file(e)),
                work,
            )
        )
    for entry, r in zip(work, answers, strict=True):
        expected = 200 if entry is None else entry["expect"]
        name = "good request" if entry is None else entry["id"]
        assert r.status_code == expected, f"{name}: {r.status_code} {r.text[:300]}"
    assert live.client.get("/healthz").status_code == 200
