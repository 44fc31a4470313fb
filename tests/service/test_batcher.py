"""Dynamic batching: shared batches, limits, backpressure, timeouts, failures, drain."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from service.batcher import DynamicBatcher, Timing
from service.errors import InferenceTimeoutError, NotReadyError, OverloadedError

X = TypeVar("X")


def run(coro: Coroutine[Any, Any, X]) -> X:
    return asyncio.run(coro)


class Recorder:
    """A batch function that records its batches, optionally sleeping or blocking."""

    def __init__(self, sleep_s: float = 0.0, gate: threading.Event | None = None):
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.sleep_s = sleep_s
        self.gate = gate
        self.started = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10.0), "test gate never opened"
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if any(i < 0 for i in items):
            raise ValueError("negative item")
        return [i * 10 for i in items]

    @property
    def sizes(self) -> list[int]:
        return [len(b) for b in self.batches]


class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[float], float]] = []

    def on_batch(self, size: int, queue_seconds: list[float], compute_seconds: float) -> None:
        self.calls.append((size, queue_seconds, compute_seconds))


async def _started(batcher: DynamicBatcher[int, int]) -> DynamicBatcher[int, int]:
    await batcher.start()
    return batcher


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition never became true"
        await asyncio.sleep(0.002)


def test_concurrent_submits_share_a_batch_and_keep_their_results() -> None:
    fn = Recorder()

    async def main() -> list[int]:
        b = await _started(DynamicBatcher(fn, max_batch_size=16, max_wait_ms=50))
        out = await asyncio.gather(*(b.submit(i) for i in range(8)))
        await b.stop()
        return out

    assert run(main()) == [i * 10 for i in range(8)]
    assert max(fn.sizes) > 1
    assert sum(fn.sizes) == 8


def test_fn_runs_on_the_single_worker_thread() -> None:
    fn = Recorder()

    async def main() -> None:
        b = await _started(DynamicBatcher(fn, max_batch_size=2, max_wait_ms=1, name="cuda:0"))
        await asyncio.gather(*(b.submit(i) for i in range(6)))
        await b.stop()

    run(main())
    assert fn.threads == {"kgdx-batcher-cuda:0"}


@pytest.mark.parametrize("max_batch_size", [1, 3, 4])
def test_max_batch_size_is_respected(max_batch_size: int) -> None:
    fn = Recorder(sleep_s=0.005)

    async def main() -> list[int]:
        b = await _started(
            DynamicBatcher(fn, max_batch_size=max_batch_size, max_wait_ms=20, max_queue=64)
        )
        out = await asyncio.gather(*(b.submit(i) for i in range(20)))
        await b.stop()
        return out

    assert run(main()) == [i * 10 for i in range(20)]
    assert max(fn.sizes) <= max_batch_size
    assert sum(fn.sizes) == 20
    if max_batch_size > 1:
        assert max(fn.sizes) == max_batch_size  # 20 queued at once fill whole batches


@pytest.mark.parametrize("max_wait_ms", [0.0, 150.0])
def test_max_wait_is_honoured(max_wait_ms: float) -> None:
    fn = Recorder()

    async def main() -> tuple[float, float, list[int]]:
        b = await _started(DynamicBatcher(fn, max_batch_size=8, max_wait_ms=max_wait_ms))
        start = time.perf_counter()
        await b.submit(1)  # alone and nothing announced: runs at once, whatever max_wait
        alone = time.perf_counter() - start
        # Announced company: the worker waits for it (up to max_wait), so both share a batch.
        with b.expecting() as token:
            start = time.perf_counter()
            first = asyncio.create_task(b.submit(2))
            await asyncio.sleep(0.03)
            await asyncio.gather(first, b.submit_timed(3, token))
            together = time.perf_counter() - start
        await b.stop()
        return alone, together, fn.sizes

    alone, together, sizes = run(main())
    assert alone < 0.1
    if max_wait_ms == 0:
        assert sizes == [1, 1, 1]
    else:
        assert together < 1.0
        assert sizes == [1, 2]


def test_an_announcement_that_never_arrives_does_not_stall() -> None:
    fn = Recorder()

    async def main() -> tuple[float, float, list[int]]:
        b = await _started(DynamicBatcher(fn, max_batch_size=8, max_wait_ms=100))
        with b.expecting():
            start = time.perf_counter()
            await b.submit(1)  # waits at most max_wait for the announced item
            waited = time.perf_counter() - start
        start = time.perf_counter()
        await b.submit(2)  # the announcement ended with the block: no wait
        after = time.perf_counter() - start
        await b.stop()
        return waited, after, fn.sizes

    waited, after, sizes = run(main())
    assert 0.08 <= waited < 1.0
    assert after < 0.08
    assert sizes == [1, 1]


def test_submit_timed_reports_queue_and_compute_time() -> None:
    fn = Recorder(sleep_s=0.05)
    observer = Observer()

    async def main() -> list[tuple[int, Timing]]:
        b = await _started(DynamicBatcher(fn, max_batch_size=4, max_wait_ms=20, observer=observer))
        out = await asyncio.gather(*(b.submit_timed(i) for i in range(4)))
        await b.stop()
        return out

    results = run(main())
    assert [r for r, _ in results] == [0, 10, 20, 30]
    for _, timing in results:
        assert timing.batch_size == fn.sizes[0] == 4
        assert 45.0 <= timing.compute_ms < 1000.0
        assert 0.0 <= timing.queue_ms < 1000.0
    assert len(observer.calls) == 1
    size, queue_seconds, compute_seconds = observer.calls[0]
    assert size == 4 and len(queue_seconds) == 4
    assert compute_seconds == pytest.approx(results[0][1].compute_ms / 1000.0)


def test_full_queue_is_503_with_retry_after() -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main() -> OverloadedError:
        b = await _started(DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, max_queue=2))
        busy = asyncio.create_task(b.submit(0))
        await _until(fn.started.is_set)  # the worker holds item 0 inside fn
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2)]
        await _until(lambda: b.queue_depth == 2)
        with pytest.raises(OverloadedError) as info:
            await b.submit(3)
        gate.set()
        assert await asyncio.gather(busy, *queued) == [0, 10, 20]
        await b.stop()
        return info.value

    error = run(main())
    assert error.status == 503
    assert int(error.headers["Retry-After"]) >= 1
    assert "queue is full" in error.message


def test_a_request_that_waits_too_long_times_out_and_is_dropped() -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main() -> None:
        b = await _started(DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0, timeout_s=0.2))
        busy = asyncio.create_task(b.submit(0))
        await _until(fn.started.is_set)
        with pytest.raises(InferenceTimeoutError, match="in the queue"):
            await b.submit(7)  # stuck behind the blocked batch
        assert b.queue_depth == 0  # dropped from the queue
        gate.set()
        with pytest.raises(InferenceTimeoutError, match="in its batch"):
            await busy  # item 0 also waited more than 0.2 s, inside fn
        assert await b.submit(8) == 80
        await b.stop()

    run(main())
    assert [7] not in fn.batches  # never computed


def test_an_exception_in_fn_fails_only_its_batch() -> None:
    fn = Recorder()

    async def main() -> None:
        b = await _started(DynamicBatcher(fn, max_batch_size=4, max_wait_ms=20))
        results = await asyncio.gather(b.submit(-1), b.submit(2), return_exceptions=True)
        assert all(isinstance(r, ValueError) for r in results)  # one batch: both failed
        assert await asyncio.gather(b.submit(3), b.submit(4)) == [30, 40]
        assert b.running
        await b.stop()

    run(main())
    assert fn.sizes == [2, 2]


def test_wrong_number_of_results_fails_the_batch() -> None:
    async def main() -> None:
        b: DynamicBatcher[int, int] = await _started(
            DynamicBatcher(lambda items: [1], max_batch_size=4, max_wait_ms=20)
        )
        with pytest.raises(RuntimeError, match="1 result"):
            await asyncio.gather(b.submit(1), b.submit(2))
        await b.stop()

    run(main())


@pytest.mark.parametrize("drain", [True, False])
def test_stop_drains_or_fails_pending_work(drain: bool) -> None:
    fn = Recorder(sleep_s=0.02)

    async def main() -> list[object]:
        b = await _started(DynamicBatcher(fn, max_batch_size=2, max_wait_ms=0))
        tasks = [asyncio.create_task(b.submit(i)) for i in range(10)]
        await _until(fn.started.is_set)  # all submitted, the worker has started
        await b.stop(drain=drain)
        assert not b.running
        with pytest.raises(NotReadyError, match="shutting down"):
            await b.submit(99)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main())
    if drain:
        assert results == [i * 10 for i in range(10)]
    else:
        done = [r for r in results if isinstance(r, int)]
        failed = [r for r in results if isinstance(r, NotReadyError)]
        assert len(done) + len(failed) == 10
        assert failed  # queued work refused
        assert len(done) < 10


def test_submit_before_start_is_not_ready() -> None:
    async def main() -> None:
        b = DynamicBatcher(Recorder())
        assert not b.running
        with pytest.raises(NotReadyError, match="not running"):
            await b.submit(1)

    run(main())


def test_fn_does_not_block_the_event_loop() -> None:
    fn = Recorder(sleep_s=0.3)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> None:
        b = await _started(DynamicBatcher(fn, max_wait_ms=0))
        stop = asyncio.Event()
        task = asyncio.create_task(ticker(stop))
        assert await b.submit(5) == 50
        stop.set()
        await task
        await b.stop()

    run(main())
    assert ticks >= 10  # ~30 expected while fn sleeps 0.3 s


def test_a_cancelled_request_leaves_the_queue() -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main() -> None:
        b = await _started(DynamicBatcher(fn, max_batch_size=1, max_wait_ms=0))
        busy = asyncio.create_task(b.submit(0))
        await _until(fn.started.is_set)
        waiting = asyncio.create_task(b.submit(5))
        await _until(lambda: b.queue_depth == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert b.queue_depth == 0
        gate.set()
        assert await busy == 0
        await b.stop()

    run(main())
    assert fn.batches == [[0]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": 0},
        {"max_wait_ms": -1.0},
        {"max_wait_ms": float("nan")},
        {"max_queue": 0},
        {"timeout_s": 0.0},
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicBatcher(Recorder(), **kwargs)


def test_observer_failure_does_not_stop_the_worker() -> None:
    class Broken:
        def on_batch(self, size: int, queue_seconds: list[float], compute: float) -> None:
            raise RuntimeError("metrics down")

    async def main() -> None:
        b = await _started(DynamicBatcher(Recorder(), max_wait_ms=0, observer=Broken()))
        assert await b.submit(1) == 10
        assert await b.submit(2) == 20
        await b.stop()

    run(main())
