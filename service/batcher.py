"""Dynamic batching: one worker thread per device turns concurrent requests into batches.

Coroutines :meth:`DynamicBatcher.submit` items; the worker thread blocks for the first
queued item, then keeps taking items until it has ``max_batch_size`` of them or
``max_wait_ms`` have passed since it took the first, calls ``fn(items)`` once (off the event
loop), and hands each result back to its coroutine's loop with
``loop.call_soon_threadsafe``. The pattern of TorchServe's and Triton's dynamic batchers,
kept to one thread because a device runs one forward pass at a time.

Backpressure and failure:

- the queue is bounded: a submit that finds ``max_queue`` items waiting gets
  :class:`~service.errors.OverloadedError` (503 with ``Retry-After`` estimated from the
  recent batch time);
- a request that waits longer than ``timeout_s`` (queue + compute) gets
  :class:`~service.errors.InferenceTimeoutError`; if its item has not been taken into a
  batch yet it is removed, so no compute is spent on it;
- an exception raised by ``fn`` fails only that batch's requests; the worker carries on;
- :meth:`~DynamicBatcher.stop` refuses new items (:class:`~service.errors.NotReadyError`),
  finishes the queued ones (``drain=True``) or fails them, and joins the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from service.errors import InferenceTimeoutError, NotReadyError, OverloadedError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatchObserver(Protocol):
    """Told about every batch the worker runs (e.g. :class:`service.metrics.Metrics`).

    Called on the worker thread; keep it cheap and thread-safe.
    """

    def on_batch(self, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        """``size`` items ran together; ``queue_seconds`` is each one's wait from submit to
        the start of the batch; ``compute_seconds`` is the time ``fn`` took."""


@dataclass(frozen=True)
class Timing:
    """How one request went through the batcher.

    Attributes:
        queue_ms: from submit to the start of its batch's computation.
        compute_ms: the batch's ``fn`` call (shared by every item of the batch).
        batch_size: how many items ran in that batch.
    """

    queue_ms: float
    compute_ms: float
    batch_size: int


_PENDING, _TAKEN, _DROPPED = 0, 1, 2


class _Request(Generic[T, R]):
    """One submitted item, its future, and where it stands (guarded by the batcher lock)."""

    __slots__ = ("deadline", "enqueued", "future", "item", "loop", "state")

    def __init__(
        self,
        item: T,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[tuple[R, Timing]],
        enqueued: float,
        deadline: float,
    ):
        self.item = item
        self.loop = loop
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.state = _PENDING


class DynamicBatcher(Generic[T, R]):
    """Gathers concurrently submitted items into batches for ``fn`` on one worker thread.

    Args:
        fn: ``items -> results``, one result per item in the same order; runs on the worker
            thread, never on the event loop. An exception fails that batch's requests.
        max_batch_size: most items per call of ``fn`` (default 16).
        max_wait_ms: how long the worker may wait for more items after taking the first
            (default 5 ms); 0 takes only what is already queued. It waits only while callers
            have announced items on their way (:meth:`expecting`), so a lone request at low
            load is never held back.
        max_queue: most items waiting to be taken (default 256); more -> 503.
        timeout_s: most seconds a request waits for its result, queue and compute
            (default 30) -> 504.
        name: names the worker thread and the log lines (e.g. the device, ``"cuda:0"``).
        observer: told about each batch (sizes, queue times, compute time).

    Example::

        batcher = DynamicBatcher(predict_batch, max_batch_size=8, name="cpu", observer=metrics)
        await batcher.start()
        result = await batcher.submit(image)           # or submit_timed(image)
        await batcher.stop(drain=True)
    """

    def __init__(
        self,
        fn: Callable[[list[T]], list[R]],
        *,
        max_batch_size: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        timeout_s: float = 30.0,
        name: str = "cpu",
        observer: BatchObserver | None = None,
    ):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not max_wait_ms >= 0 or math.isinf(max_wait_ms):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = float(timeout_s)
        self.name = name
        self.observer = observer
        self._queue: deque[_Request[T, R]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._accepting = False
        self._stopping = False
        self._batch_seconds = 0.0  # moving average of fn's time, for Retry-After
        self._expected = 0  # items announced by callers (e.g. still decoding), not yet queued

    # -----------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Items submitted and not yet taken into a batch."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        """True while the worker runs and new items are accepted."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return (
            f"DynamicBatcher(name={self.name!r}, max_batch_size={self.max_batch_size}, "
            f"max_wait_ms={self.max_wait_s * 1000:g}, max_queue={self.max_queue}, "
            f"running={self.running}, queue_depth={self.queue_depth})"
        )

    # -----------------------------------------------------------------------------------------
    # Lifecycle
    # -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the worker thread (once; a stopped batcher cannot be restarted)."""
        with self._cond:
            if self._thread is not None:
                if self._stopping:
                    raise RuntimeError(f"batcher {self.name!r} was stopped; create a new one")
                return
            self._thread = threading.Thread(
                target=self._work, name=f"kgdx-batcher-{self.name}", daemon=True
            )
            self._accepting = True
        self._thread.start()

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting items, then finish (``drain``) or fail the queued ones, and join
        the worker. Queued requests still unfinished after ``timeout_s`` are failed with
        :class:`~service.errors.NotReadyError`."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            dropped = [] if drain else self._take_all()
            self._cond.notify_all()
        for request in dropped:
            _deliver_error(request, NotReadyError("the inference worker is shutting down"))
        thread = self._thread
        if thread is None:
            return
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            with self._cond:
                left = self._take_all()
            log.warning(
                "batcher %s: worker still busy after %.1f s; failing %d queued request(s)",
                self.name,
                timeout_s,
                len(left),
            )
            for request in left:
                _deliver_error(request, NotReadyError("the inference worker is shutting down"))

    # -----------------------------------------------------------------------------------------
    # Submitting
    # -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self) -> Iterator[list[bool]]:
        """Announce an item that is on its way (being decoded, say).

        While announced items exist, a gathering batch waits up to ``max_wait_ms`` for them;
        otherwise it runs at once. Pass the yielded token to :meth:`submit_timed`, which
        withdraws the announcement when the item is queued (or the block ends without it).
        """
        with self._cond:
            self._expected += 1
        token = [True]
        try:
            yield token
        finally:
            if token[0]:
                with self._cond:
                    token[0] = False
                    self._expected -= 1
                    self._cond.notify()

    async def submit(self, item: T) -> R:
        """Queue ``item``, wait for its batch, return its result.

        Raises:
            OverloadedError: the queue is full (503, ``Retry-After``).
            NotReadyError: the worker is not started or is shutting down (503).
            InferenceTimeoutError: no result within ``timeout_s`` (504).
            Exception: whatever ``fn`` raised for this item's batch.
        """
        result, _ = await self.submit_timed(item)
        return result

    async def submit_timed(self, item: T, announced: list[bool] | None = None) -> tuple[R, Timing]:
        """As :meth:`submit`, with this request's :class:`Timing`.

        ``announced`` is the token of :meth:`expecting` for this item, if it was announced.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[R, Timing]] = loop.create_future()
        now = time.perf_counter()
        request = _Request(item, loop, future, now, now + self.timeout_s)
        with self._cond:
            if announced is not None and announced[0]:
                announced[0] = False
                self._expected -= 1
            if not self._accepting:
                if self._stopping:
                    raise NotReadyError("the inference worker is shutting down")
                raise NotReadyError("the inference worker is not running")
            if len(self._queue) >= self.max_queue:
                retry = self._retry_after_s()
                raise OverloadedError(
                    f"inference queue is full ({self.max_queue} requests waiting); retry in "
                    f"{retry} s",
                    retry_after_s=retry,
                )
            self._queue.append(request)
            self._cond.notify()
        try:
            done, _ = await asyncio.wait((future,), timeout=self.timeout_s)
        except asyncio.CancelledError:  # the client went away
            self._withdraw(request)
            future.cancel()
            raise
        if not done:
            state = self._withdraw(request)
            future.cancel()
            where = "in its batch" if state == _TAKEN else "in the queue"
            raise InferenceTimeoutError(
                f"no inference result within {self.timeout_s:g} s (waited {where})"
            )
        return future.result()

    def _withdraw(self, request: _Request[T, R]) -> int:
        """Drop a request that is still queued; returns its state before."""
        with self._cond:
            state = request.state
            if state == _PENDING:
                request.state = _DROPPED
                with contextlib.suppress(ValueError):
                    self._queue.remove(request)
            return state

    def _retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely drained (at least 1)."""
        batches = math.ceil(len(self._queue) / self.max_batch_size)
        return max(1, math.ceil(batches * self._batch_seconds))

    def _take_all(self) -> list[_Request[T, R]]:
        """Empty the queue (caller holds the lock)."""
        taken = list(self._queue)
        self._queue.clear()
        for request in taken:
            request.state = _DROPPED
        return taken

    # -----------------------------------------------------------------------------------------
    # Worker thread
    # -----------------------------------------------------------------------------------------

    def _work(self) -> None:
        log.debug("batcher %s: worker started", self.name)
        while True:
            batch = self._gather()
            if batch is None:
                break
            if batch:
                self._run(batch)
        log.debug("batcher %s: worker stopped", self.name)

    def _gather(self) -> list[_Request[T, R]] | None:
        """Block for the first item, then take more until the batch is full or
        ``max_wait`` has passed since the first was taken. None: stopped and drained."""
        batch: list[_Request[T, R]] = []
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first_taken = time.perf_counter()
            deadline = first_taken + self.max_wait_s
            while len(batch) < self.max_batch_size:
                if self._queue:
                    request = self._queue.popleft()
                    if time.perf_counter() > request.deadline:
                        request.state = _DROPPED  # its coroutine is timing out: skip it
                        _deliver_error(
                            request,
                            InferenceTimeoutError(
                                f"no inference result within {self.timeout_s:g} s "
                                "(waited in the queue)"
                            ),
                        )
                        continue
                    request.state = _TAKEN
                    batch.append(request)
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping or self._expected <= 0:
                    break
                self._cond.wait(remaining)
        return batch

    def _run(self, batch: list[_Request[T, R]]) -> None:
        items = [request.item for request in batch]
        start = time.perf_counter()
        try:
            results = self.fn(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"batch function returned {len(results)} result(s) for {len(items)} item(s)"
                )
        except Exception as e:
            compute = time.perf_counter() - start
            log.warning(
                "batcher %s: batch of %d failed after %.1f ms: %s",
                self.name,
                len(batch),
                compute * 1000,
                type(e).__name__,
            )
            for request in batch:
                _deliver_error(request, e)
            self._observe(batch, start, compute)
            return
        compute = time.perf_counter() - start
        previous = self._batch_seconds
        self._batch_seconds = 0.8 * previous + 0.2 * compute if previous else compute
        compute_ms = compute * 1000.0
        for request, result in zip(batch, results, strict=True):
            timing = Timing(
                queue_ms=(start - request.enqueued) * 1000.0,
                compute_ms=compute_ms,
                batch_size=len(batch),
            )
            _deliver(request, (result, timing))
        self._observe(batch, start, compute)

    def _observe(self, batch: list[_Request[T, R]], start: float, compute: float) -> None:
        if self.observer is None:
            return
        try:
            self.observer.on_batch(len(batch), [start - r.enqueued for r in batch], compute)
        except Exception:  # metrics must never take the worker down
            log.exception("batcher %s: observer failed", self.name)


# ---------------------------------------------------------------------------------------------
# Handing results back to the event loop
# ---------------------------------------------------------------------------------------------


def _deliver(request: _Request[T, R], value: tuple[R, Timing]) -> None:
    _call_in_loop(request, _set_result, request.future, value)


def _deliver_error(request: _Request[T, R], error: BaseException) -> None:
    _call_in_loop(request, _set_exception, request.future, error)


def _call_in_loop(request: _Request[T, R], fn: Callable[..., None], *args: object) -> None:
    # a closed loop raises RuntimeError: nobody is waiting any more
    with contextlib.suppress(RuntimeError):
        request.loop.call_soon_threadsafe(fn, *args)


def _set_result(future: asyncio.Future[tuple[R, Timing]], value: tuple[R, Timing]) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[tuple[R, Timing]], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
