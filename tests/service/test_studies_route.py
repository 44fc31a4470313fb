"""``GET /v1/studies/{uid}``: status, instances, skipped instances, jobs, results, SRs."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from kg.home import kgdx_home
from service.db import ServiceDatabase
from service.instances import InstanceRow, InstanceStore
from service.jobs import JobQueue
from tests.service.conftest import Served
from tests.service.images import dicom_bytes, dicom_dataset, no_pixel_dicom_bytes, write_dicom


def put(data: bytes, skip_reason: str | None = None) -> InstanceRow:
    with ServiceDatabase() as db:
        store = InstanceStore(db, kgdx_home() / "instances")
        temp = store.spool / f"stow-{uuid.uuid4().hex}.part"
        temp.write_bytes(data)
        header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        return store.store(temp, header, skip_reason=skip_reason).row


@pytest.fixture
def idle(make_service: Callable[..., Served], tmp_path: Path) -> Served:
    """A service whose model did not load: live, no study worker, so job states hold still."""
    return make_service(checkpoint=tmp_path / "no-such-checkpoint")


def get(served: Served, uid: str, **params: str) -> tuple[int, dict[str, Any]]:
    r = served.client.get(f"/v1/studies/{uid}", headers=served.auth(), params=params)
    return r.status_code, r.json()


def test_unknown_study_is_404(idle: Served) -> None:
    status, body = get(idle, "1.2.3.4.5")
    assert status == 404
    assert body == {
        "error": {"code": "not_found", "message": "no study with this StudyInstanceUID"}
    }


@pytest.mark.parametrize(
    "uid", ["abc", "1..2", "1.2.", ".1.2", "1.2.3a", "1" * 65, "1.2.-3", "1,2", " 1.2"]
)
def test_malformed_uids_are_422(idle: Served, uid: str) -> None:
    status, body = get(idle, uid)
    assert status == 422
    assert body["error"]["code"] == "invalid_request"
    assert "study_uid" in body["error"]["message"]
    if len(uid.strip()) > 3:
        assert uid.strip() not in body["error"]["message"]  # the value is not echoed


def test_a_64_character_uid_is_accepted(idle: Served) -> None:
    uid = "1." + "2" * 62
    assert get(idle, uid)[0] == 404


def test_the_predict_scope_is_needed(idle: Served) -> None:
    assert idle.client.get("/v1/studies/1.2.3").status_code == 401
    r = idle.client.get("/v1/studies/1.2.3", headers=idle.auth("ingest"))
    assert r.status_code == 403


def test_status_follows_the_jobs(idle: Served) -> None:
    study = generate_uid()
    pa = put(write_dicom(dicom_dataset(StudyInstanceUID=study)))
    status, body = get(idle, study)
    assert status == 200
    assert body["status"] == "received" and body["jobs"] == [] and body["results"] == []
    assert body["instances_received"] == 1
    (inst,) = body["instances"]
    assert inst["sop_instance_uid"] == pa.sop_instance_uid
    assert (inst["modality"], inst["view_position"], inst["job_id"]) == ("DX", "PA", None)
    assert inst["received_at"].endswith("+00:00")

    queue = JobQueue(ServiceDatabase(), backoff_s=30)
    job_id = queue.enqueue_study(study)
    body = get(idle, study)[1]
    assert body["status"] == "queued" and body["jobs"][0]["id"] == job_id
    assert body["instances"][0]["job_id"] == job_id

    job = queue.claim("w", 60)
    assert job is not None
    body = get(idle, study)[1]
    assert body["status"] == "running"
    assert body["jobs"][0]["next_attempt_at"] is None

    queue.retry(job.id, "w", "file error (OSError: Input/output error)")
    body = get(idle, study)[1]
    (j,) = body["jobs"]
    assert body["status"] == "queued"
    assert (j["state"], j["attempts"]) == ("queued", 1)
    assert j["last_error"] == "file error (OSError: Input/output error)"
    assert j["next_attempt_at"] is not None

    queue.clock = lambda: 10**12  # due now
    job = queue.claim("w", 60)
    assert job is not None
    queue.fail(job.id, "w", "no decodable image: decode error: bad pixels")
    body = get(idle, study)[1]
    assert body["status"] == "failed"
    assert body["reason"] == "no decodable image: decode error: bad pixels"
    assert body["sr"] == {"destination_configured": False, "built": 0, "pushed": 0}

    # a new image arrives: the study waits for it to go quiet again
    put(write_dicom(dicom_dataset(StudyInstanceUID=study, seed=4)))
    assert get(idle, study)[1]["status"] == "received"


def test_a_study_of_skipped_objects_only_says_so(idle: Served) -> None:
    ds = pydicom.dcmread(BytesIO(no_pixel_dicom_bytes()))
    row = put(write_dicom(ds), skip_reason="non-image SOP class Basic Text SR Storage")
    body = get(idle, row.study_uid)[1]
    assert body["status"] == "failed"
    assert body["reason"] == "no selectable image: every instance was skipped"
    assert body["skipped"] == [
        {
            "sop_instance_uid": row.sop_instance_uid,
            "reason": "non-image SOP class Basic Text SR Storage",
        }
    ]


def test_predict_results_are_found_by_study(make_service: Callable[..., Served]) -> None:
    served = make_service(stable_seconds=3600)
    study = generate_uid()
    data = dicom_bytes(StudyInstanceUID=study)
    r = served.client.post(
        "/v1/predict",
        headers=served.auth(),
        files={"file": ("x.dcm", data, "application/dicom")},
    )
    assert r.status_code == 200, r.text
    status, body = get(served, study)
    assert status == 200
    assert body["status"] == "done" and body["instances_received"] == 0
    (result,) = body["results"]
    assert result["id"] == r.json()["id"] and result["job_id"] is None
    assert result["sr_sop_instance_uid"] is None
    assert result["findings"][0]["name"] == r.json()["findings"][0]["name"]
    full = get(served, study, full="true")[1]
    assert full["results"][0]["payload"]["findings"] == r.json()["findings"]
