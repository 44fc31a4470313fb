"""``kgdx doctor``: each invariant broken on purpose in a real home, found, and repaired (or
not, when no repair is safe), on SQLite and PostgreSQL; the command's table, JSON and exit
codes."""

from __future__ import annotations

import json
import os
import time
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import delete, update
from typer.testing import CliRunner

from service.cli import app
from service.db import ServiceDatabase, results
from service.doctor import CHECKS, DoctorReport, examine
from service.instances import InstanceRow, InstanceStore, instances
from service.jobs import JobQueue, job_srs, jobs
from service.logs import hash_uid
from service.results import ResultStore
from service.study_worker import result_id_for, sr_uid_for
from tests.service.images import dicom_dataset, write_dicom

OWNER = "doctor-test-host:1:live"


@pytest.fixture
def store(db: ServiceDatabase, tmp_home: Path) -> InstanceStore:
    return InstanceStore(db, tmp_home / "instances")


@pytest.fixture
def queue(db: ServiceDatabase) -> JobQueue:
    return JobQueue(db)


def radiograph(study: str | None = None, seed: int = 0) -> bytes:
    ds = dicom_dataset(rows=16, columns=16, seed=seed)
    if study is not None:
        ds.StudyInstanceUID = study
    return write_dicom(ds)


def put(store: InstanceStore, data: bytes, *, received_at: float | None = None) -> InstanceRow:
    """Store an instance as the STOW-RS route does (spooled file, then ``store``)."""
    temp = store.spool / f"stow-{uuid.uuid4().hex}.part"
    temp.write_bytes(data)
    header = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    return store.store(temp, header, now=received_at).row


def processed(
    db: ServiceDatabase, store: InstanceStore, queue: JobQueue, n: int = 1
) -> tuple[str, list[InstanceRow]]:
    """A study the worker went all the way through: job done, results, SRs, pushed."""
    study = generate_uid()
    rows = [put(store, radiograph(study, seed=i), received_at=time.time() - 60) for i in range(n)]
    job_id = queue.enqueue_study(study)
    assert job_id is not None
    claimed = queue.claim(OWNER, lease_s=60)
    assert claimed is not None and claimed.id == job_id
    ids = [result_id_for(job_id, r.sop_instance_uid) for r in rows]
    result_store = ResultStore(db)
    for rid in ids:
        result_store.put({"findings": []}, result_id=rid, study_uid=study)
    queue.record_results(job_id, OWNER, ids)
    for rid, row in zip(ids, rows, strict=True):
        uid = sr_uid_for(job_id, row.sop_instance_uid)
        queue.add_sr(job_id, OWNER, rid, uid, b"SR bytes")
        queue.mark_sr_pushed(uid)
    queue.record_sr(job_id, OWNER, sr_uid_for(job_id, rows[0].sop_instance_uid))
    queue.record_pushed(job_id, OWNER)
    queue.complete(job_id, OWNER)
    return job_id, [store.get(r.sop_instance_uid) for r in rows]  # type: ignore[misc]


def run(db: ServiceDatabase, home: Path, **kw: Any) -> DoctorReport:
    kw.setdefault("stable_seconds", 0.0)
    kw.setdefault("destination_configured", True)
    return examine(db, home, **kw)


def found(report: DoctorReport) -> list[tuple[str, bool]]:
    """(check, repaired) of every problem."""
    return [(f.check, f.repaired) for f in report.problems]


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


# -- healthy homes ---------------------------------------------------------------------------


def test_an_empty_home_is_healthy(db: ServiceDatabase, tmp_home: Path) -> None:
    report = run(db, tmp_home)
    assert report.healthy and report.findings == []
    assert report.checked == {
        "instances": 0,
        "instance_files": 0,
        "temp_files": 0,
        "jobs": 0,
        "srs": 0,
    }
    assert set(report.by_check()) == set(CHECKS)
    assert report.summary().startswith("healthy")


def test_a_processed_study_is_healthy(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    processed(db, store, queue, n=2)
    report = run(db, tmp_home)
    assert report.healthy and report.findings == [], report.findings
    assert report.checked["instances"] == 2 and report.checked["srs"] == 2


# -- instance files --------------------------------------------------------------------------


def test_a_lost_file_of_an_unprocessed_instance_drops_its_row(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    row = put(store, radiograph())
    store.path_of(row).unlink()
    report = run(db, tmp_home, stable_seconds=3600)
    [finding] = report.problems
    assert finding.check == "instance-file-missing" and not finding.repaired
    assert finding.subject == f"instance {hash_uid(row.sop_instance_uid)}"
    assert row.sop_instance_uid not in finding.subject  # hashed, as in the logs
    assert finding.action is not None and not report.healthy
    assert store.get(row.sop_instance_uid) is not None  # looking changes nothing
    report = run(db, tmp_home, repair=True, stable_seconds=3600)
    assert found(report) == [("instance-file-missing", True)] and report.healthy
    assert store.get(row.sop_instance_uid) is None
    assert run(db, tmp_home).findings == []


def test_a_lost_file_of_a_processed_instance_is_left_to_a_re_send(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    _, [row] = processed(db, store, queue)
    data = store.path_of(row).read_bytes()
    store.path_of(row).unlink()
    report = run(db, tmp_home, repair=True)
    [finding] = report.problems
    assert finding.check == "instance-file-missing" and not finding.repaired
    assert finding.action is None and "re-send" in finding.detail
    assert store.get(row.sop_instance_uid) is not None  # the row stays: no second job
    assert not report.healthy
    # The faithful re-send puts the file back and makes no job.
    temp = store.spool / "stow-resend.part"
    temp.write_bytes(data)
    outcome = store.store(temp, pydicom.dcmread(BytesIO(data), stop_before_pixels=True))
    assert outcome.status == "duplicate" and outcome.restored and outcome.same_content
    assert store.path_of(row).read_bytes() == data
    assert run(db, tmp_home).healthy


@pytest.mark.parametrize("how", ["truncated", "same-size"])
def test_a_damaged_file_is_found_and_dropped_with_its_row(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, how: str
) -> None:
    row = put(store, radiograph())
    path = store.path_of(row)
    data = path.read_bytes()
    path.write_bytes(data[:100] if how == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    if how == "same-size":  # only the hash tells
        assert run(db, tmp_home, verify_hashes=False, stable_seconds=3600).healthy
    report = run(db, tmp_home, repair=True, stable_seconds=3600)
    [finding] = report.problems
    assert finding.check == "instance-file-damaged" and finding.repaired
    assert ("bytes" in finding.detail) == (how == "truncated")
    assert not path.exists() and store.get(row.sop_instance_uid) is None
    assert not path.parent.exists()  # empty folders go too
    assert run(db, tmp_home).findings == []


def test_a_row_whose_path_is_not_its_uids_is_reported(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore
) -> None:
    row = put(store, radiograph())
    with db.write() as conn:
        conn.execute(
            update(instances)
            .where(instances.c.sop_instance_uid == row.sop_instance_uid)
            .values(path="../../etc/passwd")
        )
    report = run(db, tmp_home, repair=True, stable_seconds=3600)
    assert ("instance-path-invalid", False) in found(report)
    assert not report.healthy


# -- files without rows ----------------------------------------------------------------------


def test_orphan_instance_files_are_removed_once_old_enough(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore
) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    old = store.root / study / series / f"{sop}.dcm"
    old.parent.mkdir(parents=True)
    old.write_bytes(radiograph())
    age(old, 7200)
    recent = store.root / study / series / "recent.dcm"
    recent.write_bytes(b"in flight")
    report = run(db, tmp_home)
    assert found(report) == [("orphan-file", False)]
    [problem] = report.problems
    assert sop not in problem.subject and str(hash_uid(sop)) in problem.subject
    [note] = report.notes
    assert note.check == "orphan-file" and note.subject.endswith("recent.dcm")
    assert report.summary().startswith("unhealthy") and "--repair" in report.summary()
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("orphan-file", True)] and report.healthy
    assert not old.exists() and recent.exists()
    assert run(db, tmp_home, repair=True, grace_s=0).healthy
    assert not (store.root / study).exists()


def test_spool_leftovers_are_temp_files(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore
) -> None:
    old, recent = store.spool / "stow-old.part", store.spool / "stow-new.part"
    old.write_bytes(b"half a body")
    recent.write_bytes(b"being written")
    age(old, 4000)  # past the service's own cut-off (SPOOL_MAX_AGE_S)
    report = run(db, tmp_home)
    assert found(report) == [("temp-file", False)]
    assert [n.subject for n in report.notes] == ["spool/stow-new.part"]
    assert report.healthy is False
    assert run(db, tmp_home, repair=True).healthy
    assert not old.exists() and recent.exists()
    report = run(db, tmp_home, repair=True, grace_s=0)  # the service is stopped: all of them
    assert found(report) == [("temp-file", True)] and not recent.exists()


# -- jobs ------------------------------------------------------------------------------------


def _running(queue: JobQueue, store: InstanceStore, owner: str, lease_s: float) -> str:
    put(store, radiograph(), received_at=time.time() - 60)
    [study] = store.quiet_studies(0)
    job_id = queue.enqueue_study(study)
    assert job_id is not None
    job = queue.claim(owner, lease_s=lease_s)
    assert job is not None and job.id == job_id
    return job_id


def test_a_running_job_whose_process_is_gone_goes_back_to_the_queue(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    from service.jobs import owner_id

    host = owner_id().rsplit(":", 2)[0]
    job_id = _running(queue, store, f"{host}:{2**22 + 17}:dead", lease_s=3600)
    report = run(db, tmp_home)
    assert found(report) == [("job-owner-gone", False)]
    assert report.problems[0].subject == f"job {job_id}"
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("job-owner-gone", True)] and report.healthy
    job = queue.get(job_id)
    assert job is not None and (job.state, job.owner) == ("queued", None)


def test_a_running_job_whose_lease_passed_goes_back_to_the_queue(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    job_id = _running(queue, store, "another-host:4242:x", lease_s=0.0)
    live = _running(queue, store, "another-host:4243:x", lease_s=3600)
    report = run(db, tmp_home, now=time.time() + 1)
    assert found(report) == [("job-lease-expired", False)]
    assert report.problems[0].subject == f"job {job_id}"
    report = run(db, tmp_home, repair=True, now=time.time() + 1)
    assert found(report) == [("job-lease-expired", True)]
    assert queue.get(job_id).state == "queued"  # type: ignore[union-attr]
    assert queue.get(live).state == "running"  # type: ignore[union-attr]


def test_a_job_in_an_unknown_state_is_reported(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    job_id, _ = processed(db, store, queue)
    with db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(state="limbo"))
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("job-state-unknown", False)] and not report.healthy


def test_instances_of_a_vanished_job_are_detached_and_queued_again(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    row = put(store, radiograph(), received_at=time.time() - 60)
    store.set_job([row.sop_instance_uid], "f" * 32)
    report = run(db, tmp_home)
    assert found(report) == [("instance-job-missing", False)]
    report = run(db, tmp_home, repair=True)
    # Detached, then the study (quiet, with an instance and no job) gets its job at once.
    assert found(report) == [("instance-job-missing", True), ("study-without-job", True)]
    assert report.healthy
    [job] = queue.by_study(row.study_uid)
    assert job.state == "queued"
    assert store.get(row.sop_instance_uid).job_id == job.id  # type: ignore[union-attr]


def test_a_quiet_study_without_a_job_gets_one_as_the_worker_would(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    quiet = put(store, radiograph(), received_at=time.time() - 60)
    arriving = put(store, radiograph())
    report = run(db, tmp_home, stable_seconds=30)
    assert found(report) == [("study-without-job", False)]
    assert report.problems[0].subject == f"study {hash_uid(quiet.study_uid)}"
    [note] = report.notes
    assert note.subject == f"study {hash_uid(arriving.study_uid)}"
    report = run(db, tmp_home, repair=True, stable_seconds=30)
    assert found(report) == [("study-without-job", True)]
    [job] = queue.by_study(quiet.study_uid)
    assert queue.by_study(arriving.study_uid) == []
    assert "queued" in (report.problems[0].action or "") and job.id in (
        report.problems[0].action or ""
    )


# -- done jobs: results, SRs, pushes ---------------------------------------------------------


def test_a_done_job_missing_a_result_is_queued_to_redo_it(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    job_id, rows = processed(db, store, queue, n=2)
    lost = result_id_for(job_id, rows[1].sop_instance_uid)
    with db.write() as conn:
        conn.execute(delete(results).where(results.c.id == lost))
    report = run(db, tmp_home)
    [finding] = report.problems
    assert (finding.check, finding.subject) == ("job-results-missing", f"job {job_id}")
    assert "1 of its 2" in finding.detail
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("job-results-missing", True)]
    job = queue.get(job_id)
    assert job is not None and job.state == "queued" and job.result_ids == ()
    assert job.sr_sop_instance_uid is None and job.sr_pushed_at is None
    # The SRs that were pushed stay recorded: the worker will not push them twice.
    assert all(sr.pushed_at for sr in queue.srs(job_id))
    assert run(db, tmp_home).healthy  # a queued job is not a problem


def test_a_done_job_missing_an_sr_is_queued_to_redo_it(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    job_id, rows = processed(db, store, queue, n=2)
    with db.write() as conn:
        conn.execute(
            delete(job_srs).where(
                job_srs.c.sop_instance_uid == sr_uid_for(job_id, rows[1].sop_instance_uid)
            )
        )
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("job-sr-missing", True)]
    job = queue.get(job_id)
    assert job is not None and job.state == "queued" and len(job.result_ids) == 2
    assert job.sr_sop_instance_uid is None


@pytest.mark.parametrize("how", ["sr-not-pushed", "job-not-pushed"])
def test_a_done_job_whose_push_is_not_recorded_is_queued_to_push(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue, how: str
) -> None:
    job_id, _ = processed(db, store, queue)
    with db.write() as conn:
        if how == "sr-not-pushed":
            conn.execute(update(job_srs).values(pushed_at=None))
        else:
            conn.execute(update(jobs).values(sr_pushed_at=None))
    if how == "job-not-pushed":  # without a destination, a done job need not have pushed
        assert run(db, tmp_home, destination_configured=False).healthy
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("job-push-incomplete", True)]
    job = queue.get(job_id)
    assert job is not None and job.state == "queued" and job.sr_pushed_at is None
    assert job.sr_sop_instance_uid is not None and job.result_ids


def test_an_sr_without_its_job_is_reported(
    db: ServiceDatabase, tmp_home: Path, store: InstanceStore, queue: JobQueue
) -> None:
    job_id, _ = processed(db, store, queue)
    with db.write() as conn:
        conn.execute(update(instances).values(job_id=None, skip_reason="gone"))
        conn.execute(delete(jobs).where(jobs.c.id == job_id))
    report = run(db, tmp_home, repair=True)
    assert found(report) == [("sr-without-job", False)] and not report.healthy


def test_bad_arguments_are_refused(db: ServiceDatabase, tmp_home: Path) -> None:
    with pytest.raises(ValueError, match="grace_s"):
        examine(db, tmp_home, grace_s=-1)
    with pytest.raises(ValueError, match="stable_seconds"):
        examine(db, tmp_home, stable_seconds=-1)


# -- the command -----------------------------------------------------------------------------


def test_the_command_reports_repairs_and_exits_by_health(
    tmp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KGDX_SR_DESTINATION_URL", raising=False)
    with ServiceDatabase() as db:
        db.create_all()
        store = InstanceStore(db, tmp_home / "instances")
        row = put(store, radiograph(), received_at=time.time() - 60)
        store.path_of(row).unlink()
    (tmp_home / "spool" / "stow-x.part").write_bytes(b"x")
    runner = CliRunner()
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 1, result.output
    assert "Error:" not in result.output
    assert "instance-file-missing" in result.output and "unhealthy" in result.output
    assert "spool/stow-x.part" in result.output  # a recent one: a note
    result = runner.invoke(app, ["doctor", "--json", "--grace", "0"])
    assert result.exit_code == 1
    body = json.loads(result.output)
    assert body["healthy"] is False and body["repair"] is False
    assert body["checks"]["instance-file-missing"]["left"] == 1
    assert body["checks"]["temp-file"]["left"] == 1
    result = runner.invoke(app, ["doctor", "--repair", "--grace", "0", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["healthy"] is True and body["summary"]["repaired"] == 2
    result = runner.invoke(app, ["doctor", "--no-hash"])
    assert result.exit_code == 0 and "healthy" in result.output
    assert runner.invoke(app, ["doctor", "--grace", "-1"]).exit_code == 2
