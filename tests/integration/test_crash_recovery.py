"""Crash recovery: ``kgdx serve`` SIGKILLed at exact points, restarted, nothing lost or doubled.

A real ``kgdx serve`` (:mod:`tests.kgdx_server`, the checkpoint of
:func:`tests.kgdx_server.checkpoint_for_home`) pushes its SRs to a real Orthanc. Each start
arms one fail point (``KGDX_FAILPOINTS``, :mod:`service.failpoints`) and the process dies by
SIGKILL when it gets there; the next start, on the same home, arms the next point or none.
Starting the server dominates the time, so one study goes through a chain of kills instead
of one pair of starts per point; each start both recovers from the last kill and meets the
next one:

- ``test_a_study_survives_a_kill_at_every_step_of_its_job``: two radiographs, acknowledged
  by STOW-RS, then killed before the job exists (``worker.before_enqueue``), after the
  images are scored and before any result is written (``worker.inference``), after the
  results are written and before the job records them (``worker.results_stored``), and
  after Orthanc stored the first SR and before the push is recorded
  (``sr_push.after_send``); then a clean start.
- ``test_a_stow_body_killed_as_it_streams_in_or_half_way_or_before_its_answer_is_stored_once``:
  killed from outside (SIGKILL, no fail point) while a two-part body is still coming in on a
  raw connection, the first part spooled and the second begun; then, the body re-sent each
  time, with the first instance stored and the second spooled (``stow.mid_body``), and with
  every part stored and no answer sent (``stow.before_response``); then a clean start and a
  last re-send.

After every kill the doctor (:func:`service.doctor.examine`, the server dead) must find
exactly what the crash left. At the end:

- every instance the server acknowledged (``00081199`` of its STOW-RS answer) has exactly
  one result, made by a ``done`` job;
- Orthanc holds exactly one SR per result, with the UID derived from the job and the image
  (:func:`service.study_worker.sr_uid_for`), and received one push per SR plus one re-push
  when the crash fell between a push and its record: the re-push lands on the same SOP
  Instance UID, so the study still holds one SR per result;
- ``kgdx doctor --repair --grace 0`` (the real command, the server stopped) finds the
  database and the files in agreement, having removed only the spool files that bodies
  killed half way left behind; so does it right after the kill as a body streams in, where
  those files (the whole first part, the begun second) are all it finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.db import ServiceDatabase
from service.doctor import examine
from service.jobs import JobQueue
from service.results import ResultStore
from service.study_worker import result_id_for, sr_uid_for
from tests.integration.conftest import KgdxTemplate, real_radiograph
from tests.kgdx_server import KGDX_CLI, REPO_ROOT, KgdxServer, KgdxServerError, child_env
from tests.orthanc import OrthancServer, wait_for

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]

#: How long a study may take after the restart: stable wait, inference, SR, push.
DONE_TIMEOUT_S = 120.0


@pytest.fixture
def crash_home(kgdx_template: KgdxTemplate, tmp_path: Path) -> Path:
    home = tmp_path / "kgdx-home"
    shutil.copytree(kgdx_template.home, home)
    return home


@pytest.fixture
def server(
    crash_home: Path, kgdx_template: KgdxTemplate, module_orthanc: OrthancServer, tmp_path: Path
) -> Iterator[KgdxServer]:
    settings = {
        "KGDX_STABLE_SECONDS": "1",
        "KGDX_WORKER_POLL_S": "0.2",
        "KGDX_SR_DESTINATION_URL": f"{module_orthanc.dicomweb_url}/",
        "KGDX_LOG_LEVEL": "INFO",
    }
    if kgdx_template.checkpoint is not None:
        settings["KGDX_CHECKPOINT"] = str(kgdx_template.checkpoint)
    kgdx = KgdxServer(crash_home, settings, log_dir=tmp_path)
    try:
        yield kgdx
    finally:
        kgdx.kill()


def stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    """The instances as one STOW-RS body; the body and its Content-Type."""
    boundary = f"crash-{secrets.token_hex(8)}"
    body = b"".join(
        b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), part)
        for part in parts
    )
    body += b"--%s--\r\n" % boundary.encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(server: KgdxServer, key: str, parts: list[bytes]) -> httpx.Response | None:
    """POST the instances as one STOW-RS body; ``None`` when no answer came (a crash)."""
    body, content_type = stow_body(parts)
    try:
        return server.request(
            "POST",
            "/dicomweb/studies",
            key,
            content=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            timeout=60.0,
        )
    except httpx.TransportError:
        return None


@contextlib.contextmanager
def stow_cut_short(server: KgdxServer, key: str, parts: list[bytes]) -> Iterator[socket.socket]:
    """A STOW-RS request of ``parts`` sent on a raw connection up to half of its last part,
    the rest never sent: the server is left reading a body that streams in. Yields the
    connection, open until the block ends."""
    body, content_type = stow_body(parts)
    cut = body.rindex(parts[-1]) + len(parts[-1]) // 2
    head = (
        f"POST /dicomweb/studies HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Accept: application/dicom+json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60.0) as conn:
        conn.sendall(head + body[:cut])
        yield conn


def spooled_files(spool: Path, first_size: int) -> list[Path] | None:
    """The spool files once a two-part body's first part is spooled whole (its file closed
    at ``first_size`` bytes) and the second part's file is open; ``None`` until then."""
    files = sorted(spool.glob("stow-*.part"))
    sizes = sorted(p.stat().st_size for p in files)
    return files if len(files) == 2 and first_size in sizes else None


def acknowledged(answer: httpx.Response) -> set[str]:
    """SOP Instance UIDs in ``00081199`` of a Store Instances Response."""
    items = answer.json().get("00081199", {}).get("Value", [])
    return {item["00081155"]["Value"][0] for item in items}


def wait_killed(server: KgdxServer, point: str) -> None:
    assert server.proc is not None
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kgdx did not die at {point}: {server.log_tail()}")
    assert code == -signal.SIGKILL, f"exit {code}: {server.log_tail()}"
    assert f"kgdx failpoint {point}: SIGKILL" in server.log_tail(20_000)


def study_status(server: KgdxServer, key: str, study_uid: str) -> dict[str, Any] | None:
    r = server.get(f"/v1/studies/{study_uid}", key)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def settled(server: KgdxServer, key: str, study_uid: str, n: int) -> dict[str, Any] | None:
    """The study's status once every job is done and ``n`` SRs were pushed."""
    body = study_status(server, key, study_uid)
    if body is None or body["status"] != "done" or body["sr"]["pushed"] < n:
        return None
    if any(j["state"] != "done" for j in body["jobs"]):
        return None
    return body


def doctor_cli(server: KgdxServer, *args: str) -> tuple[int, dict[str, Any]]:
    """``kgdx doctor --json ARGS`` on the server's home, with its settings."""
    res = subprocess.run(
        [*KGDX_CLI, "doctor", "--json", *args],
        env=child_env(server.home, server.settings),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Error:" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def run_until_killed(server: KgdxServer, point: str) -> None:
    """Start ``server`` armed with ``point`` and wait for the kill; the kill may come while
    it starts (a job resumed at once), before ``/readyz`` ever answers."""
    server.settings["KGDX_FAILPOINTS"] = point
    with contextlib.suppress(KgdxServerError):
        server.start()
    wait_killed(server, point)
    del server.settings["KGDX_FAILPOINTS"]


def doctor_finds(home: Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The checks with problems on a dead server's home (every leftover counts)."""
    monkeypatch.setenv("KGDX_HOME", str(home))  # the home's UID salt, as in the server
    with ServiceDatabase(f"sqlite:///{home / 'kgdx.db'}") as db:
        report = examine(db, home, grace_s=0, stable_seconds=0)
    return {f.check for f in report.problems}


def two_radiographs(accession: str) -> tuple[list[bytes], str]:
    """Two real radiographs of one new study; their bytes and the StudyInstanceUID."""
    first, ds = real_radiograph("first", accession=accession)
    second, _ = real_radiograph(
        "second",
        study_uid=ds.StudyInstanceUID,
        accession=accession,
        patient_id=ds.PatientID,
        patient_name=str(ds.PatientName),
    )
    return [first, second], str(ds.StudyInstanceUID)


def wait_settled(server: KgdxServer, key: str, study: str, n: int) -> dict[str, Any]:
    try:
        status: dict[str, Any] = wait_for(
            lambda: settled(server, key, study, n),
            DONE_TIMEOUT_S,
            interval=0.3,
            what=f"the study to be done with {n} SR(s) pushed",
        )
    except TimeoutError as exc:
        pytest.fail(f"{exc}: {study_status(server, key, study)}\n{server.log_text()[-6000:]}")
    return status


def assert_processed_once(
    status: dict[str, Any], acked: set[str], orthanc: OrthancServer, study: str, pushes: int
) -> None:
    """Every acknowledged instance has one result of a done job and one SR in Orthanc, and
    Orthanc received ``pushes`` STOW-RS requests (``orthanc.stow_received`` counts)."""
    job_of = {i["sop_instance_uid"]: i["job_id"] for i in status["instances"]}
    assert acked <= set(job_of) and all(job_of[sop] for sop in acked), status["instances"]
    assert status["skipped"] == []
    assert {j["state"] for j in status["jobs"]} == {"done"}, status["jobs"]
    expected_results = sorted(result_id_for(job_of[sop], sop) for sop in acked)
    result_ids = sorted(r["id"] for r in status["results"])
    assert result_ids == expected_results, status["results"]
    assert sorted(rid for j in status["jobs"] for rid in j["result_ids"]) == result_ids
    n = len(acked)
    assert status["sr"] == {"destination_configured": True, "built": n, "pushed": n}
    expected_srs = sorted(sr_uid_for(job_of[sop], sop) for sop in acked)
    srs = orthanc.search_sr(study)
    assert sorted(s["00080018"]["Value"][0] for s in srs) == expected_srs, srs
    assert len(orthanc.study_instances(study)) == n  # the SRs, nothing twice
    assert len(orthanc.stow_received()) == pushes


def assert_doctor_healthy(server: KgdxServer, repaired: set[str]) -> None:
    """The real command on the stopped server: healthy after repairing ``repaired``."""
    server.stop()
    code, body = doctor_cli(server, "--repair", "--grace", "0")
    assert code == 0 and body["healthy"], body
    assert {f["check"] for f in body["findings"] if f["repaired"]} == repaired, body
    assert not any(os.scandir(server.home / "spool"))


@pytest.mark.timeout(600)
def test_a_study_survives_a_kill_at_every_step_of_its_job(
    server: KgdxServer,
    crash_home: Path,
    kgdx_template: KgdxTemplate,
    module_orthanc: OrthancServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, orthanc = kgdx_template.read_key, module_orthanc
    parts, study = two_radiographs("ACC-CRASH-JOB")
    pushes = len(orthanc.stow_received())

    # Acknowledged, then killed before the quiet study becomes a job.
    server.settings["KGDX_FAILPOINTS"] = "worker.before_enqueue"
    server.start()
    answer = stow(server, key, parts)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    acked = acknowledged(answer)
    assert len(acked) == 2
    wait_killed(server, "worker.before_enqueue")
    del server.settings["KGDX_FAILPOINTS"]
    assert doctor_finds(crash_home, monkeypatch) == {"study-without-job"}

    # The restart makes the job and scores it: killed before a result is written.
    run_until_killed(server, "worker.inference")
    assert doctor_finds(crash_home, monkeypatch) == {"job-owner-gone"}
    with ServiceDatabase(f"sqlite:///{crash_home / 'kgdx.db'}") as db:
        [job] = JobQueue(db).by_study(study)
        assert (job.state, job.result_ids) == ("running", ())
        assert ResultStore(db).by_study(study) == []

    # Resumed: killed with the results written but not recorded on the job.
    run_until_killed(server, "worker.results_stored")
    assert doctor_finds(crash_home, monkeypatch) == {"job-owner-gone"}
    with ServiceDatabase(f"sqlite:///{crash_home / 'kgdx.db'}") as db:
        [job] = JobQueue(db).by_study(study)
        assert job.result_ids == () and len(ResultStore(db).by_study(study)) == 2

    # Resumed: the results are adopted, the SRs built; killed once Orthanc has the first.
    run_until_killed(server, "sr_push.after_send")
    assert doctor_finds(crash_home, monkeypatch) == {"job-owner-gone"}
    assert len(orthanc.search_sr(study)) == 1
    with ServiceDatabase(f"sqlite:///{crash_home / 'kgdx.db'}") as db:
        [job] = JobQueue(db).by_study(study)
        assert len(job.result_ids) == 2 and job.sr_pushed_at is None
        assert [sr.pushed_at for sr in JobQueue(db).srs(job.id)] == [None, None]

    # A clean start finishes the job: the first SR is pushed again and lands on itself.
    server.restart()
    status = wait_settled(server, key, study, 2)
    assert [j["attempts"] for j in status["jobs"]] == [3]  # three tries scored it
    assert_processed_once(status, acked, orthanc, study, pushes + 3)
    assert_doctor_healthy(server, repaired=set())


@pytest.mark.timeout(600)
def test_a_stow_body_killed_as_it_streams_in_or_half_way_or_before_its_answer_is_stored_once(
    server: KgdxServer,
    crash_home: Path,
    kgdx_template: KgdxTemplate,
    module_orthanc: OrthancServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, orthanc = kgdx_template.read_key, module_orthanc
    parts, study = two_radiographs("ACC-CRASH-STOW")
    pushes = len(orthanc.stow_received())

    # Killed while the body streams in: the first part spooled, the second begun, nothing
    # stored; no answer, and the spool files are all that is left.
    server.start()
    with stow_cut_short(server, key, parts) as conn:
        try:
            spooled = wait_for(
                lambda: spooled_files(crash_home / "spool", len(parts[0])),
                60.0,
                interval=0.1,
                what="the first part spooled whole and the second begun",
            )
        except TimeoutError as exc:
            pytest.fail(f"{exc}: {server.log_tail()}")
        server.kill()
        with contextlib.suppress(ConnectionResetError):
            assert conn.recv(4096) == b""  # closed by the kill, unanswered
    code, report = doctor_cli(server, "--repair", "--grace", "0")
    assert code == 0 and report["healthy"], report
    assert report["checked"]["instances"] == report["checked"]["instance_files"] == 0, report
    problems = [f for f in report["findings"] if f["problem"]]
    assert sorted((f["check"], f["subject"], f["repaired"]) for f in problems) == [
        ("temp-file", f"spool/{p.name}", True) for p in spooled
    ], report
    assert not any(os.scandir(crash_home / "spool"))

    # The client sends the body again: killed with the first part stored and the second
    # still a spool file; no answer.
    server.settings["KGDX_FAILPOINTS"] = "stow.mid_body"
    server.start()
    assert stow(server, key, parts) is None
    wait_killed(server, "stow.mid_body")
    del server.settings["KGDX_FAILPOINTS"]
    assert doctor_finds(crash_home, monkeypatch) == {"temp-file", "study-without-job"}

    # The stored instance was never acknowledged, but it is durable: the restart processes
    # it. The client sends the body again: killed with both stored, before the answer.
    server.settings["KGDX_FAILPOINTS"] = "stow.before_response"
    server.start()
    wait_settled(server, key, study, 1)
    assert stow(server, key, parts) is None
    wait_killed(server, "stow.before_response")
    del server.settings["KGDX_FAILPOINTS"]
    assert doctor_finds(crash_home, monkeypatch) == {"temp-file", "study-without-job"}

    # A clean start; the client's last re-send is all duplicates, acknowledged in full.
    server.restart()
    answer = stow(server, key, parts)
    assert answer is not None and answer.status_code == 200, answer and answer.text
    assert "00081198" not in answer.json()  # faithful duplicates are plain success
    acked = acknowledged(answer)
    assert len(acked) == 2
    status = wait_settled(server, key, study, 2)
    assert len(status["jobs"]) == 2  # the instance stored before the first kill, then the other
    assert_processed_once(status, acked, orthanc, study, pushes + 2)
    assert_doctor_healthy(server, repaired={"temp-file"})
