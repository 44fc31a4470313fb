"""The study worker: stored DICOM instances -> jobs -> results -> DICOM SR -> back to the PACS.

:class:`StudyWorker` is an asyncio task started in the app's lifespan. Every
``worker_poll_s`` it:

1. takes back jobs whose worker died (:meth:`~service.jobs.JobQueue.recover_expired`;
   at start also those of a previous life of this process, at once);
2. turns studies quiet for ``stable_seconds`` into ``queued`` jobs
   (:meth:`~service.instances.InstanceStore.quiet_studies`,
   :meth:`~service.jobs.JobQueue.enqueue_study`);
3. claims due jobs one at a time and runs each:

   - **select** the frontal radiographs among the job's instances
     (:func:`service.selection.select_instances`); every other instance is marked skipped
     with its reason;
   - **score**: read each file (in a thread), decode it on the decode pool, submit it to the
     app's :class:`~service.batcher.DynamicBatcher`, the one ``/v1/predict`` uses, so jobs
     and synchronous requests share the device; build each result with
     :func:`service.pipeline.respond` and store it (:class:`~service.results.ResultStore`,
     by study) under an id derived from the job and the instance;
   - **report**: build a TID 1500 SR per scored image (:func:`service.sr.build_sr` reports
     one result about one source image) with a SOPInstanceUID derived from the job and the
     image (:func:`sr_uid_for`), and keep its bytes (``svc_job_srs``);
   - **push** them to ``sr_destination_url`` by STOW-RS (:func:`service.sr_push.push_sr`)
     when one is set;
   - ``done``.

Each step is recorded as it completes, and redoing one makes the same objects: a job
resumed after a crash (even between the push and its record) makes no second result and no
second SR; a re-push of the same SOPInstanceUID is answered "already stored".

Errors: a study with nothing selectable, or whose selected images all fail to decode,
fails at once with the reason. A full inference queue is waited out (interactive requests
come first; it costs no try). File, database, inference and push-transport errors
are transient: the job is retried with backoff (``job_max_attempts`` processing tries,
``sr_push_max_attempts`` pushes). Reasons carry no patient data; logs name studies by
:func:`service.logs.hash_uid` only.

Stopping (:meth:`StudyWorker.stop`) lets the current job finish within the timeout, then
cancels it and hands it back to the queue (``queued``, the try not counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError

from kg.home import kgdx_home
from models.errors import DataError
from service.coding import ConceptCodes, coder_for
from service.decode import DecodeLimits
from service.errors import OverloadedError, ServiceError
from service.failpoints import failpoint
from service.instances import InstanceStore
from service.jobs import Job, JobQueue, LeaseLostError, owner_id
from service.logs import hash_uid
from service.pipeline import (
    BatchItemResult,
    PredictOptions,
    PredictRequest,
    decode_prepared,
    respond,
    thumbnail_png,
)
from service.results import StoredResult
from service.selection import select_instances
from service.sr import build_sr, derive_uid, sr_bytes
from service.sr_push import PermanentPushError, TransientPushError, push_sr

if TYPE_CHECKING:
    from service.state import AppState

__all__ = [
    "PermanentJobError",
    "StudyWorker",
    "job_queue_for",
    "result_id_for",
    "source_finder",
    "sr_uid_for",
]

log = logging.getLogger("kgdx.worker")
# highdicom's INFO lines name the source dataset by its SOPInstanceUID in clear ("copy
# Patient-related attributes from dataset ..."), which service.logs' filter does not catch;
# its warnings still come through.
logging.getLogger("highdicom").setLevel(logging.WARNING)

#: Namespace of the result ids derived from job ids.
#: How long a study's scoring waits before trying a full inference queue again (doubling).
_ROOM_WAIT_MIN_S = 0.05
_ROOM_WAIT_MAX_S = 1.0
_NAMESPACE = uuid.UUID("6f1c3c0e-7a43-4d55-9a8e-6b2f4f0c9e11")


class PermanentJobError(Exception):
    """Retrying the job cannot help (nothing to score, nothing decodable); the message is
    the job's ``last_error`` (no patient data)."""


def result_id_for(job_id: str, sop_instance_uid: str) -> str:
    """The result id of one scored instance of a job: the same on every try."""
    return uuid.uuid5(_NAMESPACE, f"result:{job_id}:{sop_instance_uid}").hex


def sr_uid_for(job_id: str, sop_instance_uid: str) -> str:
    """The SOPInstanceUID of the SR a job makes for one scored image: the same on every try,
    so a retried job (or a retried push) makes the same SR, never a second one.

    It is the UID ``GET /v1/results/{id}/sr`` gives the result's SR too
    (``derive_uid("result", id, "sr")``), so a PACS never holds two SRs of one result.
    """
    return derive_uid("result", result_id_for(job_id, sop_instance_uid), "sr")


def source_finder(state: AppState) -> Callable[[StoredResult], Dataset | None]:
    """``StoredResult -> header of the instance it was scored from`` for results of jobs
    (``None`` for others), so ``GET /v1/results/{id}/sr`` builds the SR in the source's
    study, as the job did (register it as ``state.extras[service.routes.reports.SR_SOURCE_KEY]``).
    """

    def find(stored: StoredResult) -> Dataset | None:
        if state.db is None:
            return None
        queue = state.jobs or JobQueue(state.db)
        job = queue.by_result(stored.id)
        if job is None:
            return None
        store = state.instances or InstanceStore(state.db, kgdx_home() / "instances")
        for row in store.by_study(job.study_uid):
            if row.job_id == job.id and result_id_for(job.id, row.sop_instance_uid) == stored.id:
                return pydicom.dcmread(store.path_of(row), stop_before_pixels=True)
        return None

    return find


def job_queue_for(state: AppState) -> JobQueue:
    """A :class:`JobQueue` on the app's database with the app's retry settings."""
    assert state.db is not None
    s = state.settings
    return JobQueue(
        state.db,
        max_attempts=s.job_max_attempts,
        backoff_s=s.job_backoff_s,
        backoff_max_s=s.job_backoff_max_s,
        push_max_attempts=s.sr_push_max_attempts,
    )


@dataclass
class _Scored:
    """One scored instance of a job."""

    sop_instance_uid: str
    result_id: str
    path: Path


class StudyWorker:
    """The background task that runs study jobs (see the module doc).

    Args:
        state: the app's state; needs ``db``, ``results``, ``batcher``, ``predictor`` and
            ``decode_pool`` (the worker is only started once the model is loaded).
        instances: the instance store (default: ``state.instances``, else the one under
            ``$KGDX_HOME/instances``).
        queue: the job queue (default: :func:`job_queue_for` ``state``).
        owner: this worker's owner id (default: :func:`service.jobs.owner_id`).
    """

    def __init__(
        self,
        state: AppState,
        *,
        instances: InstanceStore | None = None,
        queue: JobQueue | None = None,
        owner: str | None = None,
    ):
        if instances is None:
            instances = state.instances
        if instances is None:
            if state.db is None:
                raise ValueError("the study worker needs the app's database (state.db)")
            instances = InstanceStore(state.db, kgdx_home() / "instances")
        self.state = state
        self.instances: InstanceStore = instances
        self.queue = queue if queue is not None else job_queue_for(state)
        self.owner = owner or owner_id()
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._next_recovery = 0.0
        self._coders: dict[Any, Any] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the polling task (once)."""
        if self._task is not None:
            return
        self._stop.clear()
        self._task = asyncio.create_task(self._loop(), name="kgdx-study-worker")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling; let the current job finish for up to ``timeout_s``, then cancel it
        and hand it back to the queue."""
        self._stop.set()
        task = self._task
        if task is None:
            return
        current = self._current
        if current is not None and not current.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(current), timeout_s)
            if not current.done():
                current.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, timeout=max(timeout_s, 5.0))
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self) -> None:
        try:
            taken = await asyncio.to_thread(self.queue.recover_dead_owners, self.owner)
            if taken:
                log.info("took back %d job(s) of a stopped kgdx process", taken)
        except SQLAlchemyError as e:
            log.warning("job recovery failed: %s", type(e).__name__)
        poll = self.state.settings.worker_poll_s
        while not self._stop.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database is down, say: try again next time
                log.warning("study worker pass failed: %s", type(e).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), poll)

    # -- one pass ------------------------------------------------------------------------

    async def tick(self) -> int:
        """One pass: recover, enqueue quiet studies, run every due job. Returns jobs run."""
        settings = self.state.settings
        now = time.time()
        if now >= self._next_recovery:
            taken = await asyncio.to_thread(self.queue.recover_expired)
            if taken:
                log.info("took back %d job(s) whose lease expired", taken)
            self._next_recovery = now + min(settings.job_lease_s / 2, 10.0)
        stable = settings.stable_seconds
        studies = await asyncio.to_thread(self.instances.quiet_studies, stable, now)
        for study in studies:
            failpoint("worker.before_enqueue")
            job_id = await asyncio.to_thread(self.queue.enqueue_study, study, stable_seconds=stable)
            if job_id is not None:
                log.info("job queued", extra={"job_id": job_id, "study": hash_uid(study)})
        ran = 0
        while not self._stop.is_set():
            job = await asyncio.to_thread(self.queue.claim, self.owner, settings.job_lease_s)
            if job is None:
                break
            ran += 1
            self._current = asyncio.create_task(self._run(job), name=f"kgdx-job-{job.id}")
            try:
                await asyncio.shield(self._current)
            finally:
                self._current = None
        return ran

    async def _run(self, job: Job) -> None:
        """Run a claimed job with a lease heartbeat; settle its state whatever happens."""
        lease = self.state.settings.job_lease_s
        work = asyncio.create_task(self._process(job))
        beat = asyncio.create_task(self._heartbeat(job, lease, work))
        try:
            await work
        except asyncio.CancelledError:
            if beat.done() and not beat.cancelled() and beat.exception() is not None:
                log.warning("job %s: lease lost; another worker has it", job.id)
                return
            with contextlib.suppress(LeaseLostError, SQLAlchemyError):
                await asyncio.to_thread(self.queue.release, job.id, self.owner)
            log.info("job %s handed back (shutdown)", job.id)
            raise
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat

    async def _heartbeat(self, job: Job, lease: float, work: asyncio.Task[None]) -> None:
        while not work.done():
            await asyncio.sleep(lease / 3)
            try:
                await asyncio.to_thread(self.queue.renew, job.id, self.owner, lease)
            except LeaseLostError:
                work.cancel()
                raise
            except SQLAlchemyError as e:
                log.warning("job %s: lease renewal failed: %s", job.id, type(e).__name__)

    # -- the job -------------------------------------------------------------------------

    async def _process(self, job: Job) -> None:
        q, me = self.queue, self.owner
        study = hash_uid(job.study_uid)
        try:
            scored = await self._score(job)
            if not job.result_ids:
                failpoint("worker.results_stored")
                ids = [s.result_id for s in scored]
                await asyncio.to_thread(q.record_results, job.id, me, ids)
                log.info("job %s: %d result(s) stored", job.id, len(ids), extra={"study": study})
            if job.sr_sop_instance_uid is None:
                await self._report(job, scored)
            if self.state.settings.sr_destination_url and job.sr_pushed_at is None:
                await self._push(job)
            await asyncio.to_thread(q.complete, job.id, me)
            log.info("job %s done", job.id, extra={"study": study})
        except LeaseLostError:
            log.warning("job %s: lease lost; another worker has it", job.id)
        except PermanentJobError as e:
            await self._settle(q.fail, job, str(e))
        except PermanentPushError as e:
            await self._settle(q.fail, job, f"SR push refused: {e}")
        except TransientPushError as e:
            await self._settle(q.retry_push, job, f"SR push failed: {e}")
        except asyncio.CancelledError:
            raise
        except Exception as e:
            await self._settle(q.retry, job, _reason(e))

    async def _settle(self, how: Any, job: Job, reason: str) -> None:
        try:
            state = await asyncio.to_thread(how, job.id, self.owner, reason)
        except LeaseLostError:
            log.warning("job %s: lease lost; another worker has it", job.id)
            return
        log.warning(
            "job %s: %s (%s)",
            job.id,
            state or "failed",
            reason,
            extra={"study": hash_uid(job.study_uid)},
        )

    # -- select + score ------------------------------------------------------------------

    async def _score(self, job: Job) -> list[_Scored]:
        """Select, then score what has no result yet; returns every scored instance."""
        rows = await asyncio.to_thread(self._job_instances, job)
        chosen = select_instances(rows)
        for row, reason in chosen.skipped:
            if getattr(row, "skip_reason", None) is None:
                await asyncio.to_thread(self.instances.set_skipped, row.sop_instance_uid, reason)
        if job.result_ids:  # scored on an earlier try: find which instances they were
            done = set(job.result_ids)
            return [
                _Scored(r.sop_instance_uid, rid, self.instances.path_of(r))
                for r in chosen.selected
                if (rid := result_id_for(job.id, r.sop_instance_uid)) in done
            ]
        if not chosen.selected:
            raise PermanentJobError(_nothing_to_score(chosen.skipped))
        state = self.state
        settings = state.settings
        assert state.batcher is not None and state.predictor is not None
        assert state.results is not None and state.pipeline is not None
        limits = DecodeLimits(
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            min_side=settings.min_image_side,
        )
        options = PredictOptions(
            threshold=settings.threshold,
            top_k_paths=settings.top_k_paths,
            heatmap=True,
            evidence_k=settings.evidence_k,
            max_hops=settings.max_path_hops,
        )
        loop = asyncio.get_running_loop()
        ready: list[tuple[Any, Any, Any, float]] = []
        failed: list[str] = []
        for row in chosen.selected:
            path = self.instances.path_of(row)
            t0 = time.perf_counter()
            data = await asyncio.to_thread(path.read_bytes)
            try:
                image, prepared, _ = await loop.run_in_executor(
                    state.decode_pool,
                    decode_prepared,
                    state.pipeline,
                    data,
                    "application/dicom",
                    None,
                    limits,
                )
            except (ServiceError, DataError) as e:
                reason = f"decode error: {getattr(e, 'message', None) or type(e).__name__}"
                failed.append(reason)
                await asyncio.to_thread(self.instances.set_skipped, row.sop_instance_uid, reason)
                continue
            finally:
                del data
            ready.append((row, image, prepared, (time.perf_counter() - t0) * 1e3))
        if not ready:
            raise PermanentJobError(f"no decodable image: {'; '.join(sorted(set(failed)))}")
        answers = await asyncio.gather(
            *(
                self._submit_when_room(
                    PredictRequest(image, None, options, settings.threshold, prepared)
                )
                for _, image, prepared, _ in ready
            )
        )
        failpoint("worker.inference")
        scored = []
        for (row, image, _, decode_ms), (item, timing) in zip(ready, answers, strict=True):
            rid = result_id_for(job.id, row.sop_instance_uid)
            payload = respond(
                item,
                image,
                options,
                state.predictor,
                result_id=rid,
                decode_ms=decode_ms,
                queue_ms=timing.queue_ms,
                notes=chosen.notes.get(row.sop_instance_uid, ()),
            )
            if not payload["findings"]:
                raise PermanentJobError("the model returned no findings")
            if await asyncio.to_thread(state.results.get, rid) is None:
                thumb = await loop.run_in_executor(state.decode_pool, thumbnail_png, image.pixels)
                await asyncio.to_thread(
                    state.results.put,
                    payload,
                    result_id=rid,
                    study_uid=job.study_uid,
                    image_png=thumb,
                    model_version=str(state.predictor.model_version),
                    ontology_version=str(state.predictor.ontology_version),
                )
            scored.append(_Scored(row.sop_instance_uid, rid, self.instances.path_of(row)))
        return scored

    def _job_instances(self, job: Job) -> list[Any]:
        return [r for r in self.instances.by_study(job.study_uid) if r.job_id == job.id]

    # -- report --------------------------------------------------------------------------

    async def _submit_when_room(self, request: PredictRequest) -> tuple[BatchItemResult, Any]:
        """Score one image; a full inference queue is waited out, not counted as a failed
        try: interactive ``/v1/predict`` requests go first, background studies take the
        room they leave (the job's lease is renewed meanwhile)."""
        assert self.state.batcher is not None
        delay = _ROOM_WAIT_MIN_S
        while True:
            try:
                return await self.state.batcher.submit_timed(request)
            except OverloadedError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, _ROOM_WAIT_MAX_S)

    async def _report(self, job: Job, scored: Sequence[_Scored]) -> None:
        """Build one SR per scored image (each reports one result and references its image)
        and keep them with the job; SRs already kept by an earlier try are not rebuilt."""
        if not scored:
            raise PermanentJobError("no stored result to report")
        state = self.state
        assert state.results is not None
        kept = {s.sop_instance_uid for s in await asyncio.to_thread(self.queue.srs, job.id)}
        first = None
        for item in scored:
            uid = sr_uid_for(job.id, item.sop_instance_uid)
            first = first or uid
            if uid in kept:
                continue
            stored = await asyncio.to_thread(state.results.get, item.result_id)
            if stored is None:
                raise PermanentJobError("a result of the job is missing from the result store")
            source = await asyncio.to_thread(pydicom.dcmread, item.path, stop_before_pixels=True)
            data = await asyncio.to_thread(
                build_job_sr, stored.payload, source, uid, self._codes(stored.payload)
            )
            await asyncio.to_thread(
                self.queue.add_sr, job.id, self.owner, item.result_id, uid, data
            )
        assert first is not None
        await asyncio.to_thread(self.queue.record_sr, job.id, self.owner, first)

    def _codes(self, payload: dict[str, Any]) -> ConceptCodes:
        """Concept codes (SNOMED CT / UMLS / the ontology's own) of the result's ontology."""
        state = self.state
        return coder_for(
            state.store, payload, default_ref=state.ontology_ref or None, cache=self._coders
        )

    # -- push ----------------------------------------------------------------------------

    async def _push(self, job: Job) -> None:
        """Push every SR of the job not yet accepted; each one is recorded as it lands."""
        settings = self.state.settings
        assert settings.sr_destination_url is not None
        password = settings.sr_destination_password
        token = settings.sr_destination_token
        for sr in await asyncio.to_thread(self.queue.srs, job.id):
            if sr.pushed_at is not None:
                continue
            data = await asyncio.to_thread(self.queue.sr_data, sr.sop_instance_uid)
            if data is None:
                raise PermanentJobError("a stored SR of the job is missing")
            outcome = await asyncio.to_thread(
                push_sr,
                data,
                settings.sr_destination_url,
                user=settings.sr_destination_user,
                password=password.get_secret_value() if password is not None else None,
                token=token.get_secret_value() if token is not None else None,
                timeout_s=settings.sr_push_timeout_s,
            )
            await asyncio.to_thread(self.queue.mark_sr_pushed, sr.sop_instance_uid)
            log.info(
                "job %s: SR pushed (HTTP %d%s)",
                job.id,
                outcome.status,
                ", already stored" if outcome.already_stored else "",
                extra={"study": hash_uid(job.study_uid)},
            )
        await asyncio.to_thread(self.queue.record_pushed, job.id, self.owner)


def build_job_sr(
    payload: dict[str, Any], source: Dataset, instance_uid: str, concept_codes: ConceptCodes
) -> bytes:
    """One result of a job as a DICOM SR (:func:`service.sr.build_sr`), Part 10 bytes.

    Built exactly as ``GET /v1/results/{id}/sr`` builds it (same UID, source and codes), so
    the SR the PACS receives and the one the API serves are the same instance.
    """
    sr = build_sr(payload, source=source, concept_codes=concept_codes, instance_uid=instance_uid)
    return sr_bytes(sr)


def _nothing_to_score(skipped: Sequence[tuple[Any, str]]) -> str:
    if not skipped:
        return "no selectable image: the job has no instances"
    counts: dict[str, int] = {}
    for _, reason in skipped:
        counts[reason] = counts.get(reason, 0) + 1
    listed = "; ".join(f"{reason} (x{n})" if n > 1 else reason for reason, n in counts.items())
    return f"no selectable image: {listed}"


def _reason(e: BaseException) -> str:
    """A retry reason without patient data: error types and codes, our own messages."""
    if isinstance(e, ServiceError):
        return f"{type(e).__name__}: {e.message}"
    if isinstance(e, OSError):
        return f"file error ({type(e).__name__}: {e.strerror or 'unknown'})"
    if isinstance(e, SQLAlchemyError):
        return f"database error ({type(e).__name__})"
    return f"unexpected error ({type(e).__name__})"
