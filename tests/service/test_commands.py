"""``kgdx predict`` and ``kgdx serve``: output, errors, and a graceful drain on SIGTERM.

``predict`` runs in-process through Typer's runner on the tiny checkpoint (conftest). The
drain test starts ``kgdx serve`` as a real process on a free loopback port and sends SIGTERM
while requests are in flight (their uploads half sent, so they stay in flight as long as the
test wants): every accepted request finishes with 200; new connections are refused
(connection refused, not an HTTP status: uvicorn closes its listening socket first); and the
process exits 0 within the drain timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from typer.testing import CliRunner

import models.default_checkpoint
from service.cli import app
from service.schemas import PredictResponse

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "tests" / "data" / "samples"
SAMPLE = SAMPLES / "nih_00028490_000.png"

runner = CliRunner()


def _predict(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["predict", *args])
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# kgdx predict
# ---------------------------------------------------------------------------------------------


def test_samples_are_small_real_radiographs() -> None:
    from PIL import Image

    files = sorted(SAMPLES.glob("*.png"))
    assert 2 <= len(files) <= 3
    assert sum(f.stat().st_size for f in files) < 2 * 2**20
    attribution = (SAMPLES / "ATTRIBUTION.md").read_text()
    for f in files:
        assert f.name in attribution
        with Image.open(f) as im:
            assert im.mode == "L" and min(im.size) >= 128


@pytest.mark.parametrize("sample", sorted(p.name for p in SAMPLES.glob("*.png")))
def test_predict_json_is_the_api_response(tiny_checkpoint: Path, sample: str) -> None:
    code, out, err = _predict(str(SAMPLES / sample), "--checkpoint", str(tiny_checkpoint), "--json")
    assert code == 0, err
    payload = json.loads(out)
    PredictResponse.model_validate(payload)  # the schema the API answers with
    assert payload["image"]["kind"] == "png"
    assert payload["model"]["name"] and payload["ontology"]["name"] == "tiny"
    findings = {f["concept"]["id"]: f for f in payload["findings"]}
    assert set(findings) == {"X:consolidation", "X:effusion", "X:opacity"}
    for f in findings.values():
        assert 0.0 <= f["probability"] <= 1.0
        assert f["positive"] == (f["probability"] >= f["threshold"])
        heat = f["heatmap"]
        assert len(heat["values"]) == heat["rows"] and len(heat["values"][0]) == heat["cols"]
        assert f["evidence"] and all(
            e["concept"]["id"] != f["concept"]["id"] for e in f["evidence"]
        )
        assert 1 <= len(f["paths"]) <= 3
        for p in f["paths"]:
            assert p["nodes"][0]["id"] == f["concept"]["id"]
            assert len(p["edges"]) == len(p["nodes"]) - 1
    # the finding that suggests a diagnosis reaches it through the ontology
    ends = {p["nodes"][-1]["id"] for p in findings["X:consolidation"]["paths"]}
    assert "X:pneumonia" in ends
    assert set(payload["timings"]) >= {"decode_ms", "queue_ms", "inference_ms", "explain_ms"}


def test_predict_options_reach_the_response(tiny_checkpoint: Path) -> None:
    code, out, err = _predict(
        str(SAMPLE),
        "--checkpoint",
        str(tiny_checkpoint),
        "--json",
        "--threshold",
        "0",
        "--top-k-paths",
        "1",
    )
    assert code == 0, err
    findings = json.loads(out)["findings"]
    assert all(f["positive"] and f["threshold"] == 0.0 for f in findings)
    assert all(len(f["paths"]) == 1 for f in findings)


def test_predict_prints_a_readable_tree(tiny_checkpoint: Path) -> None:
    code, out, err = _predict(str(SAMPLE), "--checkpoint", str(tiny_checkpoint))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("png 256x256 - model ") and "ontology tiny@" in lines[0]
    for name, cid in [
        ("Consolidation", "X:consolidation"),
        ("Effusion", "X:effusion"),
        ("Opacity", "X:opacity"),
    ]:
        assert any(f"{name} ({cid}): 0." in line for line in lines), out
    assert "Consolidation -suggests-> Pneumonia" in out
    assert sum("path " in line for line in lines) >= 3
    assert "evidence: " in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_predict_missing_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.png"
    code, out, err = _predict(str(missing), "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and out == ""
    assert err.startswith("Error: ") and str(missing) in err


@pytest.mark.parametrize(
    "content", [b"Clinical indication: cough.\n", b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", b""]
)
def test_predict_non_image_file(tiny_checkpoint: Path, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    code, out, err = _predict(str(path), "--checkpoint", str(tiny_checkpoint))
    assert code == 1 and out == ""
    assert err.startswith("Error: "), err
    assert any(word in err for word in ("unsupported", "empty", "not an image")), err
    assert "internal error" not in err  # a bad file is the user's problem: say it plainly


def test_predict_missing_checkpoint_names_the_path(tiny_checkpoint: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-checkpoint"
    code, out, err = _predict(str(SAMPLE), "--checkpoint", str(missing))
    assert code == 1 and out == ""
    assert err.startswith("Error: ") and str(missing) in err


def test_predict_without_default_checkpoint_says_how_to_train(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "package" / "models" / "data" / "default"
    monkeypatch.setattr(models.default_checkpoint, "default_checkpoint_dir", lambda: absent)
    monkeypatch.delenv("KGDX_CHECKPOINT", raising=False)
    code, out, err = _predict(str(SAMPLE))
    assert code == 1 and out == ""
    assert err.startswith("Error: ") and str(absent) in err
    assert models.default_checkpoint.TRAIN_COMMAND in err


def test_predict_reads_the_checkpoint_from_the_environment(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KGDX_CHECKPOINT", str(tiny_checkpoint))
    code, out, err = _predict(str(SAMPLE), "--json")
    assert code == 0, err
    assert json.loads(out)["ontology"]["name"] == "tiny"


# ---------------------------------------------------------------------------------------------
# kgdx serve: settings refused before anything starts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--no-auth", "--host", "0.0.0.0"], {}, "0.0.0.0"),
        (["--no-auth", "--host", "10.1.2.3"], {}, "no_auth"),
        (["--port", "0"], {}, "port"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        ([], {"KGDX_MAX_WAIT_MS": "-1"}, "max_wait_ms"),
        ([], {"KGDX_CORS_ORIGINS": '["*"]'}, "cors_origins"),
        ([], {"KGDX_DEVICE": "tpu"}, "device"),
    ],
)
def test_serve_refuses_invalid_settings(
    tmp_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("Error: invalid settings: ") and named in result.stderr


def test_serve_refuses_a_missing_checkpoint(tmp_home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    result = runner.invoke(app, ["serve", "--checkpoint", str(missing)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and str(missing) in result.stderr


# ---------------------------------------------------------------------------------------------
# kgdx serve as a process: graceful drain on SIGTERM
# ---------------------------------------------------------------------------------------------

IN_FLIGHT = 4
DRAIN_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepted_connections(pid: int, port: int) -> int:
    """Connections on ``port`` that the server process has accept()ed (its own sockets)."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def server(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``kgdx serve`` on a free loopback port, ready; killed if a test leaves it running."""
    port = free_port()
    env = {
        **os.environ,
        "KGDX_HOME": str(tmp_path / "home"),
        "KGDX_CHECKPOINT": str(tiny_checkpoint),
        "KGDX_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "PYTHONPATH": str(ROOT),
    }
    cmd = [sys.executable, "-c", "from service.cli import main; main()", "serve"]
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--no-auth"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"kgdx serve exited {proc.returncode}: {_tail(tmp_path)}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 90, "/readyz")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "serve.log").read_text(errors="replace")[-3000:]


def _multipart(image: bytes) -> tuple[bytes, dict[str, str]]:
    """A predict request's multipart body and headers, as httpx would send them."""
    request = httpx.Request(
        "POST", "http://x/v1/predict", files={"file": ("cxr.png", image, "image/png")}
    )
    body = request.read()
    return body, {"Content-Type": request.headers["Content-Type"]}


async def _drain_scenario(
    proc: subprocess.Popen[bytes], port: int
) -> tuple[list[httpx.Response | BaseException], BaseException | None]:
    """Requests in flight (their uploads half sent), SIGTERM, a new connection tried, then
    the uploads finished. Returns the responses and the new connection's error."""
    base = f"http://127.0.0.1:{port}"
    body, headers = _multipart(SAMPLE.read_bytes())
    release = asyncio.Event()

    async def slow_upload() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        await release.wait()
        yield body[len(body) // 2 :]

    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        tasks = [
            asyncio.create_task(client.post("/v1/predict", content=slow_upload(), headers=headers))
            for _ in range(IN_FLIGHT)
        ]
        deadline = time.monotonic() + 15
        while accepted_connections(proc.pid, port) < IN_FLIGHT:
            assert time.monotonic() < deadline, "the requests never reached the server"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # headers and half of each body are read by now
        proc.send_signal(signal.SIGTERM)
        refused: BaseException | None = None
        deadline = time.monotonic() + 5
        while refused is None and time.monotonic() < deadline:
            try:
                async with httpx.AsyncClient(base_url=base, timeout=5) as fresh:
                    await fresh.get("/healthz")
            except httpx.ConnectError as e:
                refused = e
            except httpx.TransportError:
                # accepted into the backlog in the instant before the listener closed, then
                # dropped unanswered: not a refusal yet, try again
                pass
            await asyncio.sleep(0.05)
        assert not any(t.done() for t in tasks), "a request ended before its upload did"
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return results, refused


def test_serve_drains_in_flight_requests_on_sigterm(
    server: tuple[subprocess.Popen[bytes], int], tmp_path: Path
) -> None:
    proc, port = server
    started = time.monotonic()
    results, refused = asyncio.run(_drain_scenario(proc, port))
    for r in results:
        assert isinstance(r, httpx.Response), f"{r!r}\n{_tail(tmp_path)}"
        assert r.status_code == 200, r.text
        assert len(r.json()["findings"]) == 3
    assert isinstance(refused, httpx.ConnectError), f"new connection not refused: {refused!r}"
    proc.wait(DRAIN_TIMEOUT_S)
    assert time.monotonic() - started < DRAIN_TIMEOUT_S
    log = _tail(tmp_path)
    assert "Application shutdown complete" in log, log
    assert proc.returncode == 0, f"exit {proc.returncode}\n{log}"
