"""The audit trail: one row per request, append-only by database triggers, never failing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.audit import AuditLog, AuditRecord, outcome_for_status
from service.db import ServiceDatabase


def rec(**over: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "key_id": "0123456789ab",
        "route": "/v1/predict",
        "method": "post",
        "status": 200,
        "outcome": "ok",
        "study_uid_hash": "00112233aabbccdd",
        "instance_uid_hash": None,
        "model_version": "a1b2",
        "ontology_version": "chest@3f2a",
        "timings": {"decode_ms": 1.5, "inference_ms": 12.0},
        "request_id": "req-1",
    }
    fields.update(over)
    return AuditRecord(**fields)


def test_record_and_recent(db: ServiceDatabase) -> None:
    log = AuditLog(db)
    log.record(rec())
    log.record(rec(request_id="req-2", status=404, outcome="client_error", key_id=None))
    rows = log.recent()
    assert [r["request_id"] for r in rows] == ["req-2", "req-1"]  # newest first
    first = rows[1]
    assert first["method"] == "POST"
    assert first["timings"] == {"decode_ms": 1.5, "inference_ms": 12.0}
    assert first["study_uid_hash"] == "00112233aabbccdd"
    assert first["created_at"].endswith("+00:00")
    assert rows[0]["key_id"] is None and rows[0]["status"] == 404
    assert [r["request_id"] for r in log.recent(limit=1)] == ["req-2"]


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE svc_audit SET status = 200",
        "UPDATE svc_audit SET route = '/v1/other' WHERE request_id = 'req-1'",
        "DELETE FROM svc_audit",
        "DELETE FROM svc_audit WHERE request_id = 'req-1'",
    ],
)
def test_the_database_refuses_changes(db: ServiceDatabase, sql: str) -> None:
    log = AuditLog(db)
    log.record(rec())
    with pytest.raises(DBAPIError, match="append-only"), db.write() as conn:
        conn.execute(text(sql))
    [row] = log.recent()
    assert row["status"] == 200 and row["route"] == "/v1/predict"


@pytest.mark.postgres
def test_postgres_refuses_truncate(tmp_home: Path, pg_url: str) -> None:
    with ServiceDatabase(pg_url) as db:
        db.drop_all()
        db.create_all()
        try:
            AuditLog(db).record(rec())
            with pytest.raises(DBAPIError, match="append-only"), db.write() as conn:
                conn.execute(text("TRUNCATE svc_audit"))
            assert len(AuditLog(db).recent()) == 1
        finally:
            db.drop_all()


def test_triggers_come_back_when_missing(db: ServiceDatabase) -> None:
    trigger = "svc_audit_no_delete" if db.dialect == "sqlite" else "svc_audit_no_change"
    drop = f"DROP TRIGGER {trigger}" + ("" if db.dialect == "sqlite" else " ON svc_audit")
    with db.write() as conn:
        conn.execute(text(drop))
    db.create_all()
    AuditLog(db).record(rec())
    with pytest.raises(DBAPIError, match="append-only"), db.write() as conn:
        conn.execute(text("DELETE FROM svc_audit"))


def test_record_never_raises(tmp_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The tables were never created, so the insert fails.
    with ServiceDatabase() as db, caplog.at_level(logging.WARNING, logger="service.audit"):
        AuditLog(db).record(rec(request_id="req-planted-7f3a"))
    assert "audit record not written" in caplog.text
    assert "req-planted-7f3a" not in caplog.text  # bound values stay out of the message


def test_non_finite_timings_are_dropped(db: ServiceDatabase) -> None:
    log = AuditLog(db)
    log.record(rec(timings={"ok_ms": 2, "bad_ms": float("nan"), "inf_ms": float("inf")}))
    assert log.recent()[0]["timings"] == {"ok_ms": 2.0}


def test_unknown_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="outcome must be one of"):
        rec(outcome="fine")


@pytest.mark.parametrize("limit", [0, -1, 10_001, True, 2.5])
def test_recent_limit_is_checked(db: ServiceDatabase, limit: Any) -> None:
    with pytest.raises(ValueError, match="limit"):
        AuditLog(db).recent(limit)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "ok"),
        (202, "ok"),
        (304, "ok"),
        (400, "client_error"),
        (404, "client_error"),
        (413, "client_error"),
        (401, "rejected"),
        (403, "rejected"),
        (429, "rejected"),
        (503, "rejected"),
        (500, "server_error"),
        (504, "server_error"),
    ],
)
def test_outcome_for_status(status: int, outcome: str) -> None:
    assert outcome_for_status(status) == outcome


def test_record_later_is_committed_by_the_writer_and_read_back(db: ServiceDatabase) -> None:
    log = AuditLog(db)
    for i in range(25):
        assert log.record_later(rec(request_id=f"req-{i}"))
    rows = log.recent(limit=30)  # reads what this process queued, too
    assert [r["request_id"] for r in rows] == [f"req-{i}" for i in reversed(range(25))]
    log.record_later(rec(request_id="req-last"))
    log.close(10)  # writes what is queued
    assert AuditLog(db).recent(limit=1)[0]["request_id"] == "req-last"
    assert not log.record_later(rec())  # closed: the caller writes it with record()


def test_record_later_never_raises(tmp_home: Path, caplog: pytest.LogCaptureFixture) -> None:
    with ServiceDatabase() as db, caplog.at_level(logging.WARNING):
        log = AuditLog(db)
        log._writer.tries = 1
        assert log.record_later(rec(request_id="req-planted-9c1d"))
        assert log.flush(10)
    assert "kgdx-audit: 1 row(s) not stored after 1 tries" in caplog.text
    assert "req-planted-9c1d" not in caplog.text
