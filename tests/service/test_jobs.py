"""Durable study jobs: creation and idempotence, claiming, leases, retries, recovery, SRs.

Every test runs on SQLite and on a real PostgreSQL (when one can be started).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from service.db import ServiceDatabase
from service.instances import instances
from service.jobs import JobQueue, LeaseLostError, jobs, owner_id
from tests.postgres import PostgresServer

DX = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
STUDY = "1.2.826.0.1.3680043.10.1336.1"
OTHER = "1.2.826.0.1.3680043.10.1336.2"


class Clock:
    """A settable epoch clock."""

    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_home: Path) -> Iterator[ServiceDatabase]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_home / 'kgdx.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("pg_server")
        url = server.fresh_database("kgdx_jobs")
    with ServiceDatabase(url) as d:
        d.create_all()
        yield d


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(db: ServiceDatabase, clock: Clock) -> JobQueue:
    return JobQueue(
        db, max_attempts=3, backoff_s=2.0, backoff_max_s=5.0, push_max_attempts=3, clock=clock
    )


def add(
    db: ServiceDatabase,
    sop: str,
    *,
    at: float,
    study: str = STUDY,
    sop_class: str = DX,
    modality: str | None = "DX",
    view: str | None = "PA",
) -> None:
    """A received instance row (the file does not matter to the queue)."""
    with db.write() as conn:
        conn.execute(
            instances.insert().values(
                sop_instance_uid=sop,
                study_uid=study,
                series_uid=study + ".9",
                sop_class_uid=sop_class,
                modality=modality,
                view_position=view,
                path=f"{study}/{sop}.dcm",
                size=1,
                sha256="0" * 64,
                received_at=at,
                job_id=None,
                skip_reason=None,
            )
        )


def instance(db: ServiceDatabase, sop: str) -> tuple[str | None, str | None]:
    with db.read() as conn:
        row = conn.execute(
            select(instances.c.job_id, instances.c.skip_reason).where(
                instances.c.sop_instance_uid == sop
            )
        ).one()
    return row.job_id, row.skip_reason


# -- creation and idempotence ----------------------------------------------------------------


def test_a_study_becomes_a_job_only_once_quiet(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 1)
    assert queue.enqueue_study(STUDY, stable_seconds=5) is None  # still arriving
    clock.advance(5)
    job_id = queue.enqueue_study(STUDY, stable_seconds=5)
    assert job_id is not None
    job = queue.get(job_id)
    assert job is not None
    assert (job.state, job.attempts, job.study_uid) == ("queued", 0, STUDY)
    assert instance(db, "1.1") == (job_id, None)
    assert queue.enqueue_study(OTHER, stable_seconds=0) is None  # unknown study


def test_the_same_instances_make_no_second_job(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    add(db, "1.2", at=clock.now - 10, view="LL")
    first = queue.enqueue_study(STUDY, stable_seconds=5)
    assert first is not None
    assert instance(db, "1.2") == (first, "view position LL is not frontal (PA or AP)")
    assert queue.enqueue_study(STUDY, stable_seconds=5) is None
    assert [j.id for j in queue.by_study(STUDY)] == [first]


def test_our_sr_coming_back_makes_no_job(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    job_id = queue.enqueue_study(STUDY, stable_seconds=5)
    job = queue.claim("w", 60)
    assert job is not None and job.id == job_id
    queue.complete(job.id, "w")
    # the PACS re-forwards the study with our SR in it: the images are already attached
    add(db, "1.9", at=clock.now, sop_class=COMPREHENSIVE_3D_SR, modality="SR", view=None)
    clock.advance(10)
    assert queue.enqueue_study(STUDY, stable_seconds=5) is None
    job_of_sr, reason = instance(db, "1.9")
    assert job_of_sr is None
    assert reason is not None and reason.startswith("non-image SOP class Comprehensive 3D SR")
    assert len(queue.by_study(STUDY)) == 1


def test_new_images_of_a_done_study_make_a_new_job(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    first = queue.enqueue_study(STUDY, stable_seconds=5)
    add(db, "1.2", at=clock.now - 6, view="AP")
    second = queue.enqueue_study(STUDY, stable_seconds=5)
    assert first and second and first != second
    assert instance(db, "1.2") == (second, None)


def test_a_study_with_nothing_to_score_still_gets_one_job(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    # so that GET /v1/studies/{uid} can say why nothing came back (the worker fails it)
    add(db, "1.1", at=clock.now - 10, view="LL")
    job_id = queue.enqueue_study(STUDY, stable_seconds=5)
    assert job_id is not None
    assert instance(db, "1.1") == (job_id, "view position LL is not frontal (PA or AP)")


def test_concurrent_enqueues_make_one_job(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    for i in range(20):
        add(db, f"1.{i}", at=clock.now - 10)
    made: list[str | None] = []
    barrier = threading.Barrier(4)

    def go() -> None:
        barrier.wait()
        made.append(queue.enqueue_study(STUDY, stable_seconds=5))

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [m for m in made if m is not None]
    assert len(created) == 1
    assert {instance(db, f"1.{i}")[0] for i in range(20)} == {created[0]}


# -- claiming, leases ------------------------------------------------------------------------


def test_claim_takes_the_oldest_due_job(db: ServiceDatabase, queue: JobQueue, clock: Clock) -> None:
    add(db, "1.1", at=clock.now - 10)
    first = queue.enqueue_study(STUDY, stable_seconds=0)
    clock.advance(1)
    add(db, "2.1", at=clock.now - 10, study=OTHER)
    second = queue.enqueue_study(OTHER, stable_seconds=0)
    job = queue.claim("w1", lease_s=30)
    assert job is not None and job.id == first
    assert (job.state, job.owner, job.attempts) == ("running", "w1", 1)
    assert job.lease_until == pytest.approx(clock.now + 30)
    other = queue.claim("w2", lease_s=30)
    assert other is not None and other.id == second
    assert queue.claim("w3", lease_s=30) is None
    assert queue.counts() == {"running": 2}


def test_renew_needs_the_lease(db: ServiceDatabase, queue: JobQueue, clock: Clock) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("w1", lease_s=30)
    assert job is not None
    clock.advance(20)
    queue.renew(job.id, "w1", 30)
    renewed = queue.get(job.id)
    assert renewed is not None and renewed.lease_until == pytest.approx(clock.now + 30)
    with pytest.raises(LeaseLostError):
        queue.renew(job.id, "someone-else", 30)


# -- ending a try ----------------------------------------------------------------------------


def test_transient_errors_back_off_then_fail(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    job_id = queue.enqueue_study(STUDY)
    assert job_id is not None
    delays = []
    for attempt in (1, 2):
        job = queue.claim("w", 60)
        assert job is not None and job.attempts == attempt
        assert queue.retry(job.id, "w", "file error (OSError: boom)") == "queued"
        again = queue.get(job_id)
        assert again is not None
        assert (again.state, again.last_error, again.owner) == (
            "queued",
            "file error (OSError: boom)",
            None,
        )
        delays.append(again.next_attempt_at - clock.now)
        assert queue.claim("w", 60) is None  # not due yet
        clock.advance(delays[-1])
    assert delays == [2.0, 4.0]  # backoff_s * 2**(n - 1)
    job = queue.claim("w", 60)
    assert job is not None and job.attempts == 3
    assert queue.retry(job.id, "w", "file error (OSError: boom)") == "failed"
    failed = queue.get(job_id)
    assert failed is not None and failed.state == "failed"
    assert failed.last_error == "gave up after 3 attempts: file error (OSError: boom)"
    assert queue.claim("w", 60) is None


def test_backoff_is_capped(queue: JobQueue) -> None:
    assert [queue.backoff(n) for n in (1, 2, 3, 4, 10)] == [2.0, 4.0, 5.0, 5.0, 5.0]


def test_permanent_errors_fail_at_once(db: ServiceDatabase, queue: JobQueue, clock: Clock) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("w", 60)
    assert job is not None
    queue.fail(job.id, "w", "no selectable image: view position LL is not frontal")
    failed = queue.get(job.id)
    assert failed is not None
    assert (failed.state, failed.attempts) == ("failed", 1)
    assert failed.last_error == "no selectable image: view position LL is not frontal"


def test_the_happy_path_records_each_step(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("w", 60)
    assert job is not None
    queue.record_results(job.id, "w", ["a" * 32, "b" * 32])
    queue.add_sr(job.id, "w", "a" * 32, "2.25.1", b"DICM-1")
    queue.add_sr(job.id, "w", "a" * 32, "2.25.1", b"DICM-other")  # a retry keeps the first
    queue.add_sr(job.id, "w", "b" * 32, "2.25.2", b"DICM-2")
    queue.record_sr(job.id, "w", "2.25.1")
    queue.mark_sr_pushed("2.25.1")
    queue.mark_sr_pushed("2.25.2")
    queue.record_pushed(job.id, "w")
    queue.complete(job.id, "w")
    done = queue.get(job.id)
    assert done is not None
    assert done.state == "done" and done.owner is None and done.lease_until is None
    assert done.result_ids == ("a" * 32, "b" * 32) and done.result_id == "a" * 32
    assert done.sr_sop_instance_uid == "2.25.1"
    assert done.sr_pushed_at is not None and done.sr_push_attempts == 1
    assert [s.sop_instance_uid for s in queue.srs(job.id)] == ["2.25.1", "2.25.2"]
    assert all(s.pushed_at for s in queue.srs(job.id))
    assert queue.sr_data("2.25.1") == b"DICM-1"
    found = queue.sr_for_result("b" * 32)
    assert found is not None and found.sop_instance_uid == "2.25.2"
    by_result = queue.by_result("b" * 32)
    assert by_result is not None and by_result.id == job.id
    assert queue.by_result("c" * 32) is None
    with pytest.raises(LeaseLostError):
        queue.complete(job.id, "w")  # not running any more


def test_a_claim_after_results_does_not_count_an_attempt(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("w", 60)
    assert job is not None
    queue.record_results(job.id, "w", ["a" * 32])
    queue.retry_push(job.id, "w", "SR push failed: STOW-RS HTTP 503")
    clock.advance(10)
    again = queue.claim("w", 60)
    assert again is not None and again.attempts == 1 and again.sr_push_attempts == 1


def test_push_retries_have_their_own_budget(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    states = []
    for _ in range(3):
        job = queue.claim("w", 60)
        assert job is not None
        if not job.result_ids:
            queue.record_results(job.id, "w", ["a" * 32])
        states.append(queue.retry_push(job.id, "w", "SR push failed: STOW-RS HTTP 503"))
        clock.advance(60)
    assert states == ["queued", "queued", "failed"]
    job = queue.by_study(STUDY)[0]
    assert job.sr_push_attempts == 3 and job.attempts == 1
    assert job.last_error == "SR push gave up after 3 attempts: SR push failed: STOW-RS HTTP 503"


def test_release_hands_the_job_back_uncounted(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("w", 60)
    assert job is not None
    queue.release(job.id, "w")
    back = queue.get(job.id)
    assert back is not None and (back.state, back.attempts, back.owner) == ("queued", 0, None)


# -- recovery --------------------------------------------------------------------------------


def test_an_expired_lease_is_taken_back(db: ServiceDatabase, queue: JobQueue, clock: Clock) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    job = queue.claim("dead", lease_s=30)
    assert job is not None
    assert queue.recover_expired() == 0  # lease still valid
    clock.advance(31)
    assert queue.recover_expired() == 1
    back = queue.get(job.id)
    assert back is not None and back.state == "queued" and back.owner is None
    assert back.last_error == "worker stopped before finishing; resumed"
    mine = queue.claim("alive", lease_s=30)
    assert mine is not None and mine.id == job.id and mine.attempts == 2
    with pytest.raises(LeaseLostError):
        queue.record_results(job.id, "dead", ["a" * 32])  # the old owner may not write


def test_a_job_that_kills_every_worker_fails(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    add(db, "1.1", at=clock.now - 10)
    queue.enqueue_study(STUDY)
    for _ in range(3):
        assert queue.claim("dies", lease_s=1) is not None
        clock.advance(2)
        queue.recover_expired()
    job = queue.by_study(STUDY)[0]
    assert (job.state, job.attempts) == ("failed", 3)
    assert job.last_error == "worker stopped during processing on every attempt"


def _set_owner(db: ServiceDatabase, job_id: str, owner: str) -> None:
    with db.write() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(owner=owner))


def test_jobs_of_a_dead_process_on_this_host_are_taken_back_at_once(
    db: ServiceDatabase, queue: JobQueue, clock: Clock
) -> None:
    me = owner_id()
    host = me.rsplit(":", 2)[0]
    ids: list[str] = []
    for i, study in enumerate((STUDY, OTHER, STUDY + ".5", STUDY + ".6")):
        add(db, f"{i}.1", at=clock.now - 10, study=study)
        made = queue.enqueue_study(study)
        assert made is not None
        ids.append(made)
    for _ in ids:
        assert queue.claim("x", lease_s=600) is not None
    dead_pid = 2**22 + 12345  # above pid_max: never a live process
    _set_owner(db, ids[0], f"{host}:{dead_pid}:abcd")  # a dead process of this host
    _set_owner(db, ids[1], f"{host}:{os.getpid()}:0000")  # this pid, a previous life
    _set_owner(db, ids[2], f"{host}:{os.getppid()}:abcd")  # a live process
    _set_owner(db, ids[3], f"elsewhere:{dead_pid}:abcd")  # another host: only its lease counts
    assert queue.recover_dead_owners(me) == 2
    states = [j.state for i in ids if (j := queue.get(i)) is not None]
    assert states == ["queued", "queued", "running", "running"]


def test_arguments_are_checked(db: ServiceDatabase) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        JobQueue(db, max_attempts=0)
    with pytest.raises(ValueError, match="push_max_attempts"):
        JobQueue(db, push_max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        JobQueue(db, backoff_s=-1)
