"""Several kgdx processes sharing PostgreSQL never take the same job.

Two real processes claim jobs from one queue in a loop (each claim is ``FOR UPDATE SKIP
LOCKED``), started together behind a barrier; every job is taken exactly once. A second test
shows the lock is skipped, not waited for: while one transaction holds the oldest job, a claim
gets the next one at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db import ServiceDatabase
from service.instances import instances
from service.jobs import JobQueue, jobs
from tests.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

JOBS = 120

CLAIMER = r"""
import json, os, sys, time
from pathlib import Path
from service.db import ServiceDatabase
from service.jobs import JobQueue

url, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
queue = JobQueue(ServiceDatabase(url))
queue.db.engine.connect().close()  # connected before the start
Path(str(go) + "." + name).touch()  # ready
while not go.exists():
    time.sleep(0.005)
taken, empty = [], 0
while empty < 3:
    job = queue.claim(name, lease_s=60)
    if job is None:
        empty += 1
        time.sleep(0.01)
        continue
    empty = 0
    taken.append(job.id)
    time.sleep(0.002)  # a little work, so the two overlap
    queue.complete(job.id, name)
print(json.dumps(taken))
"""


@pytest.fixture
def pg_db(pg_server: PostgresServer) -> Iterator[ServiceDatabase]:
    with ServiceDatabase(pg_server.fresh_database("kgdx_claim")) as db:
        db.create_all()
        yield db


def fill(db: ServiceDatabase, n: int) -> list[str]:
    queue = JobQueue(db)
    rows = [
        {
            "sop_instance_uid": f"1.2.3.{i}.1",
            "study_uid": f"1.2.3.{i}",
            "series_uid": f"1.2.3.{i}.9",
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
            "modality": "DX",
            "view_position": "PA",
            "path": f"x/{i}.dcm",
            "size": 1,
            "sha256": "0" * 64,
            "received_at": 0.0,
        }
        for i in range(n)
    ]
    with db.write() as conn:
        conn.execute(instances.insert(), rows)
    made = [queue.enqueue_study(f"1.2.3.{i}") for i in range(n)]
    assert all(made)
    return [m for m in made if m]


def test_two_processes_never_take_the_same_job(pg_db: ServiceDatabase, tmp_path: Path) -> None:
    made = fill(pg_db, JOBS)
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLAIMER,
                pg_db.engine.url.render_as_string(False),
                name,
                str(go),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("proc-a", "proc-b")
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.{n}").exists() for n in ("proc-a", "proc-b")):
        assert time.monotonic() < deadline, "the claimers did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    taken = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        taken.append(json.loads(out.strip().splitlines()[-1]))
    print("jobs taken per process:", [len(t) for t in taken])
    a, b = (set(t) for t in taken)
    assert len(a) == len(taken[0]) and len(b) == len(taken[1])  # nobody took one twice
    assert not a & b  # nobody took the other's
    assert a | b == set(made)  # every job was taken
    assert a and b  # both really worked at once
    with pg_db.read() as conn:
        states = conn.execute(select(jobs.c.state, jobs.c.owner, jobs.c.attempts)).all()
    assert {(s, o, n) for s, o, n in states} == {("done", None, 1)}


def test_a_locked_job_is_skipped_not_waited_for(pg_db: ServiceDatabase) -> None:
    first, second = fill(pg_db, 2)
    queue = JobQueue(pg_db)
    with pg_db.engine.connect() as holder, holder.begin():
        locked = holder.execute(
            select(jobs.c.id)
            .where(jobs.c.state == "queued")
            .order_by(jobs.c.next_attempt_at, jobs.c.created_at)
            .limit(1)
            .with_for_update()
        ).scalar()
        assert locked == first
        t0 = time.monotonic()
        job = queue.claim("other", lease_s=60)
        assert time.monotonic() - t0 < 2.0
        assert job is not None and job.id == second
        assert queue.claim("other", lease_s=60) is None  # the locked one is not offered
    job = queue.claim("other", lease_s=60)
    assert job is not None and job.id == first  # free again once the holder ends
