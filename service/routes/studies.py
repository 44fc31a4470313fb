"""``GET /v1/studies/{StudyInstanceUID}``: what became of a study sent to kgdx.

One answer gathers the instances received (and why any were skipped), the study's jobs
with their states, tries and errors, the results (summaries, or the full payloads with
``?full=true``) and the DICOM SRs with their push status. Results of ``POST /v1/predict``
calls on DICOM files of the study are listed too.

``status`` is the study's, derived from its parts:

- ``running`` / ``queued``: a job of the study is;
- ``received``: instances wait for the study to go quiet (``stable_seconds``);
- otherwise the newest job's ``done`` or ``failed``; ``done`` when there is no job but
  there are results (``/v1/predict``); ``failed`` when every instance was skipped at
  ingest (a study of non-image objects only), with ``reason`` saying so.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from kg.home import kgdx_home
from service.deps import PredictKey, State
from service.errors import NotFoundError, ServiceError
from service.instances import InstanceRow, InstanceStore
from service.jobs import Job, JobQueue, StoredSr
from service.logs import hash_uid
from service.results import StoredResult
from service.schemas import KEY_ERRORS, PredictResponse, error_responses
from service.state import AppState

router = APIRouter(prefix="/v1/studies", tags=["studies"])

_ERRORS = error_responses(*KEY_ERRORS, 404, 422)

#: DICOM UI syntax (digits and dots, at most 64 characters); leading zeros in a component
#: are tolerated because real archives hold such UIDs.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"

StudyState = Literal["received", "queued", "running", "done", "failed"]


class StudyInstance(BaseModel):
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str | None
    view_position: str | None
    received_at: str = Field(description="ISO 8601, UTC")
    job_id: str | None = Field(description="The job that took it, if any")
    skip_reason: str | None = Field(description="Why it is not scored, if it is not")


class SkippedInstance(BaseModel):
    sop_instance_uid: str
    reason: str


class StudySr(BaseModel):
    sop_instance_uid: str
    result_id: str = Field(description="The result it reports")
    created_at: str
    pushed_at: str | None = Field(description="When the destination accepted it")


class StudyJob(BaseModel):
    id: str
    state: Literal["received", "queued", "running", "done", "failed"]
    attempts: int = Field(description="Processing tries so far")
    next_attempt_at: str | None = Field(description="When a queued job is tried next (ISO)")
    last_error: str | None
    result_ids: list[str]
    sr_sop_instance_uid: str | None = Field(description="The job's first SR, once built")
    sr_pushed_at: str | None = Field(description="When every SR of the job was accepted")
    sr_push_attempts: int
    srs: list[StudySr]
    created_at: str
    updated_at: str


class FindingSummary(BaseModel):
    name: str
    concept_id: str
    probability: float
    positive: bool


class StudyResult(BaseModel):
    id: str
    created_at: str
    model_version: str
    ontology_version: str
    job_id: str | None = Field(description="The job that made it; None for /v1/predict")
    sr_sop_instance_uid: str | None
    findings: list[FindingSummary]
    payload: PredictResponse | None = Field(None, description="The full result (?full=true)")


class SrStatus(BaseModel):
    destination_configured: bool = Field(description="Whether SRs are pushed to a PACS")
    built: int = Field(description="SRs made for the study")
    pushed: int = Field(description="SRs the destination accepted")


class StudyStatus(BaseModel):
    study_instance_uid: str
    status: StudyState
    reason: str | None = Field(None, description="Why the study failed, when it did")
    instances_received: int
    instances: list[StudyInstance]
    skipped: list[SkippedInstance]
    jobs: list[StudyJob]
    results: list[StudyResult]
    sr: SrStatus


@router.get("/{study_uid}", response_model=StudyStatus, responses=_ERRORS)
async def get_study(
    request: Request,
    state: State,
    _key: PredictKey,
    study_uid: Annotated[
        str,
        Path(
            max_length=64,
            pattern=UID_PATTERN,
            description="StudyInstanceUID (digits and dots, at most 64 characters)",
        ),
    ],
    full: Annotated[bool, Query(description="Include the full result payloads")] = False,
) -> dict[str, Any]:
    """Status, instances, skipped instances with reasons, jobs, results and SRs of a study."""
    request.state.study_uid_hash = hash_uid(study_uid)
    return await run_in_threadpool(study_status, state, study_uid, full=full)


def study_status(state: AppState, study_uid: str, *, full: bool = False) -> dict[str, Any]:
    """The body of ``GET /v1/studies/{uid}`` (blocking: database reads)."""
    if state.db is None or state.results is None:
        raise ServiceError("the database is not available")
    queue = state.jobs or JobQueue(state.db)
    rows = _instance_store(state).by_study(study_uid)
    jobs = queue.by_study(study_uid)
    results = state.results.by_study(study_uid)
    if not rows and not jobs and not results:
        raise NotFoundError("no study with this StudyInstanceUID")
    srs = {j.id: queue.srs(j.id) for j in jobs}
    job_of_result = {rid: j.id for j in jobs for rid in j.result_ids}
    sr_of_result = {s.result_id: s.sop_instance_uid for found in srs.values() for s in found}
    status, reason = _status(rows, jobs, results)
    built = [s for found in srs.values() for s in found]
    return {
        "study_instance_uid": study_uid,
        "status": status,
        "reason": reason,
        "instances_received": len(rows),
        "instances": [_instance(r) for r in rows],
        "skipped": [
            {"sop_instance_uid": r.sop_instance_uid, "reason": r.skip_reason}
            for r in rows
            if r.skip_reason
        ],
        "jobs": [_job(j, srs[j.id]) for j in jobs],
        "results": [
            _result(r, job_of_result.get(r.id), sr_of_result.get(r.id), full) for r in results
        ],
        "sr": {
            "destination_configured": bool(state.settings.sr_destination_url),
            "built": len(built),
            "pushed": sum(1 for s in built if s.pushed_at),
        },
    }


def _instance_store(state: AppState) -> InstanceStore:
    if state.instances is not None:
        return state.instances
    assert state.db is not None
    return InstanceStore(state.db, kgdx_home() / "instances")


def _status(
    rows: list[InstanceRow], jobs: list[Job], results: list[StoredResult]
) -> tuple[StudyState, str | None]:
    states = {j.state for j in jobs}
    if "running" in states:
        return "running", None
    if "queued" in states:
        return "queued", None
    if any(r.job_id is None and r.skip_reason is None for r in rows):
        return "received", None
    if jobs:
        latest = jobs[-1]
        return ("done", None) if latest.state == "done" else ("failed", latest.last_error)
    if results:
        return "done", None
    return "failed", "no selectable image: every instance was skipped"


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _instance(r: InstanceRow) -> dict[str, Any]:
    return {
        "sop_instance_uid": r.sop_instance_uid,
        "series_instance_uid": r.series_uid,
        "sop_class_uid": r.sop_class_uid,
        "modality": r.modality,
        "view_position": r.view_position,
        "received_at": _iso(r.received_at),
        "job_id": r.job_id,
        "skip_reason": r.skip_reason,
    }


def _job(job: Job, srs: list[StoredSr]) -> dict[str, Any]:
    body = job.to_dict()
    body["next_attempt_at"] = _iso(job.next_attempt_at) if job.state == "queued" else None
    body["srs"] = [s.to_dict() for s in srs]
    return body


def _result(r: StoredResult, job_id: str | None, sr_uid: str | None, full: bool) -> dict[str, Any]:
    findings = r.payload.get("findings", [])
    return {
        "id": r.id,
        "created_at": r.created_at,
        "model_version": r.model_version,
        "ontology_version": r.ontology_version,
        "job_id": job_id,
        "sr_sop_instance_uid": sr_uid,
        "findings": [
            {
                "name": f["name"],
                "concept_id": f["concept"]["id"],
                "probability": f["probability"],
                "positive": f["positive"],
            }
            for f in findings
        ],
        "payload": r.payload if full else None,
    }
