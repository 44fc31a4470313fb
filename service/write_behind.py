"""Group commit on a writer thread: rows handed over now, committed together just after.

A request handler that must store a row (a result, an audit record) but need not wait for
the disk gives it to :meth:`WriteBehind.submit`, which queues it and returns at once. One
daemon thread takes whatever has queued up and passes it to ``write`` in one call (one
transaction: many rows per commit, or per fsync, under load), after lingering up to
``linger_s`` for more rows to join, which also keeps the commit out of the way of the
request that follows. The pattern of a database's group commit, and of the log shippers that
batch behind an application.

Failure and back-pressure:

- ``write`` raising :class:`sqlalchemy.exc.SQLAlchemyError` is retried ``tries`` times with
  a growing pause, then the rows are logged as lost; any other exception is logged at once.
  The thread never dies, so later rows are still written.
- :meth:`submit` refuses (returns ``False``) when ``max_pending`` rows wait or the writer is
  closed: the caller writes the row itself, so nothing is dropped for want of room.
- :meth:`flush` waits until everything queued is committed or given up; :meth:`close`
  flushes, then stops the thread.

Example::

    writer = WriteBehind(insert_rows, name="kgdx-audit")
    if not writer.submit(row):
        insert_rows([row])
    writer.close()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from sqlalchemy.exc import SQLAlchemyError

__all__ = ["LINGER_S", "WriteBehind", "with_retries"]

#: The service's commit interval for result and audit rows: at one request at a time the
#: commit falls into the next request's forward pass instead of beside its parsing.
LINGER_S = 0.02

log = logging.getLogger(__name__)

T = TypeVar("T")


class WriteBehind(Generic[T]):
    """Rows queued by :meth:`submit`, written in batches by one daemon thread.

    Args:
        write: commits a batch of rows in one transaction; runs on the writer thread.
        name: names the thread and the log lines.
        max_pending: most rows queued or being written; past it :meth:`submit` refuses.
        tries: attempts for a batch whose ``write`` raises a database error.
        linger_s: how long the writer waits after the first queued row for more to join
            its batch (a commit interval, default 0: write at once). Rows ready to write
            wait at most this long; :meth:`flush` and :meth:`close` cut it short.
        max_batch: a batch this large is written without lingering further.
        written: called on the writer thread with each batch once it is committed or given
            up (e.g. to forget rows served from memory until then), before :meth:`flush`
            returns.
    """

    def __init__(
        self,
        write: Callable[[list[T]], object],
        *,
        name: str,
        max_pending: int = 1024,
        tries: int = 5,
        linger_s: float = 0.0,
        max_batch: int = 256,
        written: Callable[[list[T]], None] | None = None,
    ):
        if max_pending < 1 or tries < 1 or max_batch < 1:
            raise ValueError("max_pending, tries and max_batch must be >= 1")
        if not 0 <= linger_s <= 10:
            raise ValueError(f"linger_s must be from 0 to 10 seconds, got {linger_s!r}")
        self.write = write
        self.name = name
        self.max_pending = max_pending
        self.tries = tries
        self.linger_s = linger_s
        self.max_batch = max_batch
        self.written = written
        self._queue: list[T] = []
        self._writing = 0  # rows taken off the queue and not yet committed or given up
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the writer waits here for rows
        self._done = threading.Condition(lock)  # flush() waits here for them to be written
        self._flushers = 0  # flush() calls waiting: the writer stops lingering
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Rows queued or being written."""
        return len(self._queue) + self._writing

    def submit(self, row: T) -> bool:
        """Queue ``row``; ``False`` (nothing queued) when the writer is full or closed."""
        with self._work:
            if self._closed or len(self._queue) + self._writing >= self.max_pending:
                return False
            self._queue.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._work.notify()
            return True

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued row is committed (or given up); ``False`` on timeout.
        The writer does not linger while someone waits here."""
        deadline = time.monotonic() + timeout_s
        with self._done:
            self._flushers += 1
            self._work.notify()
            try:
                while self._queue or self._writing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._done.wait(left)
            finally:
                self._flushers -= 1
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Write what is queued, then stop the thread; later :meth:`submit` calls refuse.
        ``False`` when rows were still unwritten after ``timeout_s`` (they are logged); the
        whole call takes at most about ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        done = self.flush(timeout_s)
        with self._work:
            self._closed = True
            self._work.notify_all()
            left = len(self._queue) + self._writing
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if not done:
            log.error("%s: closed with %d row(s) not yet written", self.name, left)
        return done

    def _loop(self) -> None:
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    self._work.wait()
                if not self._queue:
                    return
                self._linger()
                batch, self._queue = self._queue, []
                self._writing = len(batch)
            try:
                self._write(batch)
            except Exception:  # never let the thread die: later rows would wait forever
                log.exception("%s: %d row(s) not stored", self.name, len(batch))
            finally:
                if self.written is not None:
                    try:
                        self.written(batch)
                    except Exception:
                        log.exception("%s: after-write callback failed", self.name)
                with self._done:
                    self._writing = 0
                    self._done.notify_all()

    def _linger(self) -> None:
        """Wait (lock held, released while waiting) up to ``linger_s`` for more rows, unless
        a batch is full, someone flushes, or the writer closes."""
        deadline = time.monotonic() + self.linger_s
        while not (self._closed or self._flushers or len(self._queue) >= self.max_batch):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._work.wait(left)

    def _write(self, batch: list[T]) -> None:
        with_retries(lambda: self.write(batch), self.tries, f"{self.name}: {len(batch)} row(s)")


def with_retries(write: Callable[[], object], tries: int, what: str) -> bool:
    """Call ``write`` until it does not raise :class:`sqlalchemy.exc.SQLAlchemyError`, at
    most ``tries`` times with a growing pause; after the last failure log ``what`` as not
    stored and return ``False``."""
    for attempt in range(1, tries + 1):
        try:
            write()
            return True
        except SQLAlchemyError as exc:
            if attempt == tries:
                log.error("%s not stored after %d tries: %s", what, tries, type(exc).__name__)
                return False
            time.sleep(0.05 * 2**attempt)
    return False
