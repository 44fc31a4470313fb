"""The study worker end to end, in a served app with the tiny model: stored instances ->
job -> results -> SR -> push, with retries, permanent failures, crash recovery and shutdown.

Instances are put in the store directly (as the STOW-RS route does); settings are short
(stable 0.2 s, poll 0.05 s) so each study finishes in well under a second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update

from kg.home import kgdx_home
from service.db import ServiceDatabase, utcnow
from service.errors import OverloadedError
from service.instances import InstanceRow, InstanceStore
from service.jobs import JobQueue, job_srs, jobs
from service.study_worker import StudyWorker, result_id_for, sr_uid_for
from tests.service.conftest import Served
from tests.service.images import (
    PATIENT_ID,
    PATIENT_NAME,
    dicom_dataset,
    inconsistent_dicom_bytes,
    no_pixel_dicom_bytes,
    write_dicom,
)
from tests.service.test_sr_push import FakeStow, serve_fake_stow

FAST = {
    "stable_seconds": 0.2,
    "worker_poll_s": 0.05,
    "job_backoff_s": 0.05,
    "job_backoff_max_s": 0.2,
    "job_lease_s": 5.0,
    "drain_timeout_s": 2.0,
}


@pytest.fixture
def serve(make_service: Callable[..., Served]) -> Callable[..., Served]:
    def make(**overrides: Any) -> Served:
        return make_service(**{**FAST, **overrides})

    return make


@pytest.fixture
def fake_stow() -> Iterator[FakeStow]:
    yield from serve_fake_stow(FakeStow())


def put(data: bytes) -> InstanceRow:
    """Store one instance as the STOW-RS route does (file in the spool, then ``store``)."""
    with ServiceDatabase() as db:
        store = InstanceStore(db, kgdx_home() / "instances")
        temp = store.spool / f"stow-{uuid.uuid4().hex}.part"
        temp.write_bytes(data)
        header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        return store.store(temp, header).row


def radiograph(study: str, view: str | None = "PA", seed: int = 0, **attrs: Any) -> bytes:
    ds = dicom_dataset(rows=64, columns=64, seed=seed, StudyInstanceUID=study, **attrs)
    if view is None:
        del ds.ViewPosition
    else:
        ds.ViewPosition = view
    return write_dicom(ds)


def study_of_sr(study: str) -> bytes:
    """A non-image instance (Basic Text SR) in ``study``."""
    ds = pydicom.dcmread(BytesIO(no_pixel_dicom_bytes()))
    ds.StudyInstanceUID = study
    return write_dicom(ds)


def wait_for(
    served: Served, study: str, states: tuple[str, ...] = ("done", "failed"), timeout: float = 20.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = served.client.get(f"/v1/studies/{study}", headers=served.auth())
        if r.status_code == 200:
            body = r.json()
            if body["status"] in states and all(
                j["state"] in ("done", "failed") for j in body["jobs"]
            ):
                return body
        time.sleep(0.05)
    raise AssertionError(f"study did not reach {states} in {timeout} s: {body}")


def queue() -> JobQueue:
    db = ServiceDatabase()
    return JobQueue(db)


def worker_of(served: Served) -> StudyWorker:
    worker = served.client.app.state.kgdx.worker  # type: ignore[attr-defined]
    assert isinstance(worker, StudyWorker)
    return worker


# -- the whole path --------------------------------------------------------------------------


def test_a_study_is_scored_reported_and_findable(
    serve: Callable[..., Served], capfd: pytest.CaptureFixture[str]
) -> None:
    served = serve(log_level="DEBUG")
    study = generate_uid()
    pa = put(radiograph(study, "PA"))
    lateral = put(radiograph(study, "LL", seed=1))
    other = put(study_of_sr(study))
    body = wait_for(served, study)

    assert body["status"] == "done" and body["reason"] is None
    assert body["instances_received"] == 3
    reasons = {s["sop_instance_uid"]: s["reason"] for s in body["skipped"]}
    assert reasons == {
        lateral.sop_instance_uid: "view position LL is not frontal (PA or AP)",
        other.sop_instance_uid: "non-image SOP class Basic Text SR Storage "
        "(1.2.840.10008.5.1.4.1.1.88.11)",
    }
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"], job["last_error"]) == ("done", 1, None)
    rid = result_id_for(job["id"], pa.sop_instance_uid)
    assert job["result_ids"] == [rid]
    (result,) = body["results"]
    assert result["id"] == rid and result["job_id"] == job["id"]
    assert result["findings"] and result["payload"] is None
    sr_uid = sr_uid_for(job["id"], pa.sop_instance_uid)
    assert job["sr_sop_instance_uid"] == sr_uid == result["sr_sop_instance_uid"]
    assert [s["sop_instance_uid"] for s in job["srs"]] == [sr_uid]
    assert body["sr"] == {"destination_configured": False, "built": 1, "pushed": 0}

    # the result is a normal stored result, with the selection's notes
    stored = served.client.get(f"/v1/results/{rid}", headers=served.auth())
    assert stored.status_code == 200 and stored.json()["findings"]
    full = served.client.get(f"/v1/studies/{study}?full=true", headers=served.auth()).json()
    assert full["results"][0]["payload"]["id"] == rid

    # the SR: same study, the image referenced, our deterministic UID
    data = queue().sr_data(sr_uid)
    assert data is not None
    sr = pydicom.dcmread(BytesIO(data))
    assert sr.SOPInstanceUID == sr_uid and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study
    assert str(sr.PatientName) == PATIENT_NAME  # it belongs in the SR...
    # GET /v1/results/{id}/sr serves the same SR instance, in the source's study
    served_sr = served.client.get(f"/v1/results/{rid}/sr", headers=served.auth())
    assert served_sr.status_code == 200
    assert served_sr.headers["x-kgdx-sr-study"] == "source"
    again = pydicom.dcmread(BytesIO(served_sr.content))
    assert (again.SOPInstanceUID, again.StudyInstanceUID) == (sr_uid, study)
    assert again.SeriesInstanceUID == sr.SeriesInstanceUID
    logged = capfd.readouterr().err  # what the log handler wrote, after redaction
    assert "kgdx.worker" in logged and "job queued" in logged
    assert PATIENT_NAME not in logged and PATIENT_ID not in logged  # ...never in the logs
    assert study not in logged and pa.sop_instance_uid not in logged


def test_re_sent_instances_and_our_sr_coming_back_make_no_new_job(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    study = generate_uid()
    image = radiograph(study, "PA")
    pa = put(image)
    body = wait_for(served, study)
    (job,) = body["jobs"]
    sr_uid = job["sr_sop_instance_uid"]
    sr_data = queue().sr_data(sr_uid)
    assert sr_data is not None
    # the PACS stores our SR, the study changes, and it forwards the whole study again
    put(image)
    put(sr_data)
    time.sleep(FAST["stable_seconds"] + 0.5)
    body = wait_for(served, study)
    assert [j["id"] for j in body["jobs"]] == [job["id"]]
    assert body["instances_received"] == 2
    skipped = {s["sop_instance_uid"]: s["reason"] for s in body["skipped"]}
    assert skipped[sr_uid].startswith("non-image SOP class Comprehensive 3D SR Storage")
    assert pa.sop_instance_uid not in skipped
    assert body["status"] == "done" and len(body["results"]) == 1


def stow(served: Served, *parts: bytes) -> dict[str, Any]:
    """``POST /dicomweb/studies`` with ``parts``, as a PACS forwards a study."""
    boundary = f"b-{uuid.uuid4().hex}"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    r = served.client.post(
        "/dicomweb/studies",
        content=body + f"--{boundary}--\r\n".encode(),
        headers={
            **served.auth("ingest"),
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        },
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_a_study_sent_by_stow_rs_gets_one_sr_even_when_forwarded_again(
    serve: Callable[..., Served], fake_stow: FakeStow
) -> None:
    served = serve(sr_destination_url=fake_stow.url)
    study = generate_uid()
    pa, lateral = radiograph(study, "PA"), radiograph(study, "LL", seed=1)
    stow(served, pa, lateral)
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert job["state"] == "done" and body["sr"]["pushed"] == 1
    (sr_uid,) = fake_stow.stored
    # the PACS now holds our SR in the study and forwards the whole study again
    stow(served, pa, lateral, fake_stow.stored[sr_uid])
    time.sleep(FAST["stable_seconds"] + 0.5)
    body = wait_for(served, study)
    assert [j["id"] for j in body["jobs"]] == [job["id"]]
    assert list(fake_stow.stored) == [sr_uid] and len(fake_stow.statuses) == 1
    assert {s["sop_instance_uid"] for s in body["skipped"]} >= {sr_uid}


def test_every_frontal_image_gets_a_result_and_an_sr(serve: Callable[..., Served]) -> None:
    served = serve()
    study = generate_uid()
    first = put(radiograph(study, "PA"))
    second = put(radiograph(study, "AP", seed=2))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert job["result_ids"] == [
        result_id_for(job["id"], first.sop_instance_uid),
        result_id_for(job["id"], second.sop_instance_uid),
    ]
    assert {s["sop_instance_uid"] for s in job["srs"]} == {
        sr_uid_for(job["id"], first.sop_instance_uid),
        sr_uid_for(job["id"], second.sop_instance_uid),
    }
    assert body["sr"]["built"] == 2 and len(body["results"]) == 2


def test_an_unrecorded_view_is_scored_with_a_note(serve: Callable[..., Served]) -> None:
    served = serve()
    study = generate_uid()
    put(radiograph(study, None))
    body = wait_for(served, study)
    assert body["status"] == "done"
    payload = served.client.get(
        f"/v1/results/{body['results'][0]['id']}", headers=served.auth()
    ).json()
    assert "ViewPosition is empty: assumed frontal" in payload["notes"]


# -- failures --------------------------------------------------------------------------------


def test_nothing_selectable_fails_at_once_with_the_reasons(serve: Callable[..., Served]) -> None:
    served = serve()
    study = generate_uid()
    put(radiograph(study, "LL"))
    put(radiograph(study, "LL", seed=3))
    body = wait_for(served, study)
    assert body["status"] == "failed"
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert (
        job["last_error"] == "no selectable image: view position LL is not frontal (PA or AP) (x2)"
    )
    assert body["reason"] == job["last_error"] and body["results"] == []


def test_an_undecodable_image_fails_at_once(serve: Callable[..., Served]) -> None:
    served = serve()
    data = inconsistent_dicom_bytes("rows")
    row = put(data)
    body = wait_for(served, row.study_uid)
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"]) == ("failed", 1)
    assert job["last_error"].startswith("no decodable image: decode error: ")
    (skipped,) = body["skipped"]
    assert skipped["reason"].startswith("decode error: ")


def test_transient_errors_are_retried_with_backoff(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve()
    store = worker_of(served).instances
    real = store.path_of
    calls = {"n": 0}

    def flaky(row: InstanceRow) -> Path:
        calls["n"] += 1
        if calls["n"] <= 2:
            raise OSError(5, "Input/output error")
        return real(row)

    monkeypatch.setattr(store, "path_of", flaky)
    study = generate_uid()
    put(radiograph(study))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"], job["last_error"]) == ("done", 3, None)


def test_persistent_transient_errors_fail_after_max_attempts(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(job_max_attempts=2)
    store = worker_of(served).instances

    def broken(row: InstanceRow) -> Path:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "path_of", broken)
    study = generate_uid()
    put(radiograph(study))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"]) == ("failed", 2)
    assert job["last_error"] == (
        "gave up after 2 attempts: file error (OSError: Input/output error)"
    )


# -- push ------------------------------------------------------------------------------------


def test_the_sr_is_pushed_retried_after_a_503_and_lands_once(
    serve: Callable[..., Served], fake_stow: FakeStow
) -> None:
    fake_stow.fail_first = 1
    served = serve(sr_destination_url=fake_stow.url)
    study = generate_uid()
    pa = put(radiograph(study))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert job["state"] == "done", job
    assert job["sr_pushed_at"] is not None and job["sr_push_attempts"] == 2
    assert body["sr"] == {"destination_configured": True, "built": 1, "pushed": 1}
    sr_uid = sr_uid_for(job["id"], pa.sop_instance_uid)
    assert list(fake_stow.stored) == [sr_uid]
    assert fake_stow.statuses == [503, 200]
    assert fake_stow.stored[sr_uid] == queue().sr_data(sr_uid)

    # a crash between the push and its record: the job resumes and re-pushes the same SR
    served.client.__exit__(None, None, None)
    db = ServiceDatabase()
    with db.write() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job["id"])
            .values(
                state="running",
                owner="gone-host:1:dead",
                lease_until=time.time() - 1,
                sr_pushed_at=None,
                updated_at=utcnow(),
            )
        )
        conn.execute(update(job_srs).values(pushed_at=None))
    served = serve(sr_destination_url=fake_stow.url)
    body = wait_for(served, study)
    (again,) = body["jobs"]
    assert again["state"] == "done" and again["sr_pushed_at"] is not None
    assert again["attempts"] == 1  # the results were recorded: not a processing try
    assert list(fake_stow.stored) == [sr_uid]  # still one SR in the PACS
    assert fake_stow.statuses == [503, 200, 200]


def test_a_refused_push_fails_the_job(serve: Callable[..., Served], fake_stow: FakeStow) -> None:
    fake_stow.token = "expected"
    served = serve(sr_destination_url=fake_stow.url, sr_destination_token="wrong")
    study = generate_uid()
    put(radiograph(study))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert job["state"] == "failed"
    assert job["last_error"] == "SR push refused: STOW-RS HTTP 401"
    assert len(body["results"]) == 1 and body["sr"]["built"] == 1  # the work is kept


# -- crash recovery and shutdown -------------------------------------------------------------


def _orphan(study: str, owner: str, lease_until: float) -> tuple[str, InstanceRow]:
    """A job left ``running`` by a process that died, with its instance attached."""
    with ServiceDatabase() as db:
        db.create_all()
    row = put(radiograph(study))
    job_id = uuid.uuid4().hex
    with ServiceDatabase() as db, db.write() as conn:
        stamp = utcnow()
        conn.execute(
            jobs.insert().values(
                id=job_id,
                study_uid=study,
                state="running",
                attempts=1,
                next_attempt_at=time.time() - 60,
                sr_push_attempts=0,
                created_at=stamp,
                updated_at=stamp,
                owner=owner,
                lease_until=lease_until,
            )
        )
        InstanceStore(db, kgdx_home() / "instances").set_job(
            [row.sop_instance_uid], job_id, conn=conn
        )
    return job_id, row


def test_a_job_whose_lease_expired_is_resumed(serve: Callable[..., Served]) -> None:
    study = generate_uid()
    job_id, row = _orphan(study, "another-host:4242:dead", lease_until=time.time() - 1)
    served = serve()
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert job["id"] == job_id and job["state"] == "done" and job["attempts"] == 2
    assert job["result_ids"] == [result_id_for(job_id, row.sop_instance_uid)]


def test_a_killed_process_of_this_host_is_resumed_without_waiting_for_its_lease(
    serve: Callable[..., Served],
) -> None:
    from service.jobs import owner_id

    host = owner_id().rsplit(":", 2)[0]
    study = generate_uid()
    _orphan(study, f"{host}:{2**22 + 999}:dead", lease_until=time.time() + 3600)
    served = serve()
    body = wait_for(served, study, timeout=10)
    assert body["jobs"][0]["state"] == "done"


def test_shutdown_hands_the_running_job_back(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve(drain_timeout_s=0.3)
    worker = worker_of(served)

    async def slow(job: Any) -> Any:
        await asyncio.sleep(60)

    monkeypatch.setattr(worker, "_score", slow)
    study = generate_uid()
    put(radiograph(study))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = queue().by_study(study)
        if found and found[0].state == "running":
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    served.client.__exit__(None, None, None)
    assert time.monotonic() - t0 < 10
    (job,) = queue().by_study(study)
    assert (job.state, job.attempts, job.owner) == ("queued", 0, None)


def test_the_worker_needs_a_database() -> None:
    from service.metrics import Metrics
    from service.settings import Settings
    from service.state import AppState

    with pytest.raises(ValueError, match="database"):
        StudyWorker(AppState(settings=Settings(), metrics=Metrics()))


def test_a_full_inference_queue_is_waited_out_without_costing_a_try(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure from interactive requests delays a study; it does not fail it."""
    served = serve(job_max_attempts=1)
    batcher = served.client.app.state.kgdx.batcher
    real = batcher.submit_timed
    refused = {"n": 0}

    async def full(*args: Any, **kwargs: Any) -> Any:
        if refused["n"] < 5:
            refused["n"] += 1
            raise OverloadedError()
        return await real(*args, **kwargs)

    monkeypatch.setattr(batcher, "submit_timed", full)
    study = generate_uid()
    put(radiograph(study))
    body = wait_for(served, study)
    (job,) = body["jobs"]
    assert (job["state"], job["attempts"], job["last_error"]) == ("done", 1, None)
    assert refused["n"] == 5
