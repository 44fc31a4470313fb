"""A stored result as a report: ``GET /v1/results/{id}/sr`` (DICOM SR), ``.../fhir`` (FHIR R4).

The result store keeps the response JSON and a small PNG, never the DICOM input, so a result
of ``POST /v1/predict`` has no source dataset: its SR starts a new, anonymous study (the
``X-Kgdx-Sr-Study: new`` header says so) and its FHIR report names no ImagingStudy. Results
of STOW-RS jobs get their SR from the job worker, built with the stored instance as source;
a component that can find a result's source dataset registers a callable
``StoredResult -> pydicom.Dataset | None`` as ``state.extras[SR_SOURCE_KEY]`` and these
routes then build in the source's study too (``X-Kgdx-Sr-Study: source``).

Findings are coded from the ontology version that produced the result (its SNOMED CT or
UMLS xrefs, else its own ids), looked up in the ontology store once per concept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool

from service.coding import ConceptCoder, coder_for
from service.deps import PredictKey, State
from service.errors import NotFoundError, ServiceError
from service.fhir import FHIR_MEDIA_TYPE, build_fhir
from service.results import StoredResult
from service.schemas import KEY_ERRORS, error_responses
from service.sr import build_sr, derive_uid, sr_bytes
from service.state import AppState

__all__ = ["SR_SOURCE_KEY", "SourceFinder", "router"]

router = APIRouter(prefix="/v1/results", tags=["reports"])

#: ``state.extras`` key of an optional ``Callable[[StoredResult], Dataset | None]`` that
#: finds the DICOM source of a result (e.g. the stored instance of a STOW-RS job).
SR_SOURCE_KEY = "sr_source"
#: What may be registered under :data:`SR_SOURCE_KEY`.
SourceFinder = Callable[[StoredResult], Dataset | None]
_CODERS_KEY = "reports.concept_coders"

_ERRORS = error_responses(*KEY_ERRORS, 404, 422)
_ID_PATTERN = (
    r"^(?:[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)
_PATIENT_PATTERN = r"^[^\s\x00-\x1f\x7f]+$"
ResultId = Annotated[
    str, Path(pattern=_ID_PATTERN, description="Result id: 32 hex digits or a dashed UUID")
]


@router.get(
    "/{result_id}/sr",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"application/dicom": {}}}},
)
async def get_sr(result_id: ResultId, state: State, _key: PredictKey) -> Response:
    """The result as a DICOM Structured Report (TID 1500 Comprehensive 3D SR, Part 10 file)."""
    stored = await run_in_threadpool(_stored, state, result_id)
    data, in_source_study = await run_in_threadpool(_sr, state, stored)
    return Response(
        content=data,
        media_type="application/dicom",
        headers={
            "Content-Disposition": f'attachment; filename="kgdx-{stored.id}-sr.dcm"',
            "X-Kgdx-Sr-Study": "source" if in_source_study else "new",
        },
    )


@router.get(
    "/{result_id}/fhir",
    response_class=JSONResponse,
    responses={**_ERRORS, 200: {"content": {FHIR_MEDIA_TYPE: {}}}},
)
async def get_fhir(
    result_id: ResultId,
    state: State,
    _key: PredictKey,
    patient: Annotated[
        str | None,
        Query(
            max_length=256,
            # No blanks or control characters. Spelled out: the route's check (Rust regex)
            # and build_fhir's (Python re) disagree on whether \x1c-\x1f are blanks (\s).
            pattern=_PATIENT_PATTERN,
            description="The EHR's patient reference for subject, e.g. Patient/123",
        ),
    ] = None,
) -> JSONResponse:
    """The result as a FHIR R4 DiagnosticReport with one contained Observation per finding."""
    stored = await run_in_threadpool(_stored, state, result_id)
    report = await run_in_threadpool(_fhir, state, stored, patient)
    return JSONResponse(report, media_type=FHIR_MEDIA_TYPE)


# -- work (on a thread: database lookups and DICOM encoding block) -------------------------


def _stored(state: AppState, result_id: str) -> StoredResult:
    if state.results is None:
        raise ServiceError("result store is not available")
    stored = state.results.get(result_id)
    if stored is None:
        raise NotFoundError(f"no result with id {result_id!r}")
    return stored


def _sr(state: AppState, stored: StoredResult) -> tuple[bytes, bool]:
    source = _source(state, stored)
    sr = build_sr(
        stored.payload,
        source=source,
        concept_codes=_coder(state, stored.payload),
        # The same result always gives the same SR instance, so a PACS that receives it
        # twice keeps one copy.
        instance_uid=derive_uid("result", stored.id, "sr"),
    )
    return sr_bytes(sr), source is not None


def _fhir(state: AppState, stored: StoredResult, patient: str | None) -> dict[str, Any]:
    source = _source(state, stored)
    return build_fhir(
        stored.payload,
        patient_ref=patient,
        study_uid=str(source.StudyInstanceUID) if source is not None else None,
        concept_codes=_coder(state, stored.payload),
    )


def _source(state: AppState, stored: StoredResult) -> Dataset | None:
    finder = state.extras.get(SR_SOURCE_KEY)
    if finder is None:
        return None
    if not callable(finder):
        raise ServiceError(f"state.extras[{SR_SOURCE_KEY!r}] is not callable")
    found = finder(stored)
    return found if isinstance(found, Dataset) else None


def _coder(state: AppState, payload: dict[str, Any]) -> ConceptCoder | None:
    cache = state.extras.get(_CODERS_KEY)
    if not isinstance(cache, dict):
        cache = {}
        state.extras[_CODERS_KEY] = cache
    return coder_for(state.store, payload, default_ref=state.ontology_ref or None, cache=cache)
