"""The group-commit writer thread: batches, back-pressure, retries, survival, close."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy.exc import OperationalError

from service.write_behind import WriteBehind


def test_rows_queued_while_a_batch_is_written_go_together_into_the_next() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def write(batch: list[int]) -> None:
        if not batches:
            gate.wait(10)  # hold the first batch until the rest has queued up
        batches.append(list(batch))

    writer: WriteBehind[int] = WriteBehind(write, name="t")
    assert writer.submit(0)
    for i in range(1, 30):
        assert writer.submit(i)
    gate.set()
    assert writer.flush(10)
    assert sorted(x for b in batches for x in b) == list(range(30))
    assert len(batches) < 30 and max(len(b) for b in batches) > 1  # grouped
    assert writer.pending == 0
    writer.close()


def test_submit_refuses_when_full_or_closed() -> None:
    gate = threading.Event()
    writer: WriteBehind[int] = WriteBehind(lambda b: gate.wait(10), name="t", max_pending=2)
    assert writer.submit(1) and writer.submit(2)
    assert not writer.submit(3)  # queued + being written = 2: the caller writes it itself
    gate.set()
    assert writer.close(10)
    assert not writer.submit(4)


def test_database_errors_are_retried_then_the_rows_logged_as_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("service.write_behind.time.sleep", lambda s: None)
    calls: list[int] = []
    done: list[list[int]] = []

    def write(batch: list[int]) -> None:
        calls.append(len(batch))
        if len(calls) < 3:
            raise OperationalError("INSERT", {}, Exception("database is locked"))

    writer: WriteBehind[int] = WriteBehind(write, name="t", tries=3, written=done.append)
    writer.submit(7)
    assert writer.flush(10)
    assert calls == [1, 1, 1] and done == [[7]]  # the third try went through
    calls.clear()
    failing: WriteBehind[int] = WriteBehind(
        lambda b: (_ for _ in ()).throw(OperationalError("INSERT", {}, Exception("full"))),
        name="lost",
        tries=2,
        written=done.append,
    )
    failing.submit(8)
    assert failing.flush(10)
    assert done[-1] == [8]  # given up, and told so
    assert "lost: 1 row(s) not stored after 2 tries: OperationalError" in caplog.text


def test_the_thread_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    written: list[int] = []

    def write(batch: list[int]) -> None:
        if batch == [1]:
            raise RuntimeError("boom")
        written.extend(batch)

    def after(batch: list[int]) -> None:
        if batch == [2]:
            raise RuntimeError("callback boom")

    writer: WriteBehind[int] = WriteBehind(write, name="t", written=after)
    writer.submit(1)
    assert writer.flush(10)
    writer.submit(2)
    assert writer.flush(10)
    writer.submit(3)
    assert writer.close(10)
    assert written == [2, 3]
    assert "t: 1 row(s) not stored" in caplog.text
    assert "after-write callback failed" in caplog.text


def test_close_writes_what_is_queued_and_reports_a_timeout() -> None:
    written: list[int] = []
    writer: WriteBehind[int] = WriteBehind(written.extend, name="t")
    for i in range(20):
        writer.submit(i)
    assert writer.close(10)
    assert written == list(range(20))
    gate = threading.Event()
    slow: WriteBehind[int] = WriteBehind(lambda b: gate.wait(10), name="slow")
    slow.submit(1)
    assert not slow.close(0.05)  # still writing
    gate.set()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_pending": 0}, ">= 1"),
        ({"tries": 0}, ">= 1"),
        ({"max_batch": 0}, ">= 1"),
        ({"linger_s": -1}, "linger_s"),
        ({"linger_s": float("nan")}, "linger_s"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        WriteBehind(lambda b: None, name="t", **kwargs)  # type: ignore[arg-type]


def test_the_writer_lingers_for_a_batch_unless_flushed_or_full() -> None:
    batches: list[list[int]] = []
    writer: WriteBehind[int] = WriteBehind(batches.append, name="t", linger_s=5, max_batch=3)
    writer.submit(1)
    writer.submit(2)
    time.sleep(0.1)
    assert batches == []  # lingering for more rows
    writer.submit(3)  # a full batch goes at once
    deadline = time.monotonic() + 5
    while not batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batches == [[1, 2, 3]]
    writer.submit(4)
    started = time.monotonic()
    assert writer.flush(10)  # flush cuts the linger short
    assert batches[-1] == [4] and time.monotonic() - started < 4
    writer.close()
