"""DICOMweb: ``POST /dicomweb/studies[/{study}]`` (STOW-RS) and ``GET /dicomweb/studies`` (QIDO-RS).

Both take an API key with the ``ingest`` scope (``admin`` grants it too): the PACS that
pushes studies is the one that lists them, and a ``predict``-only key can neither store nor
enumerate StudyInstanceUIDs. Neither needs the model: instances are accepted while it loads.

STOW-RS answers a DICOM JSON Store Instances Response (200 / 202 / 409) or the service's
JSON error body (400 / 413 / 415); see :mod:`service.stow` for the codes.

QIDO-RS is the minimum that lets a client such as ``dicomweb_client`` list what kgdx holds:
one object per study with StudyInstanceUID (0020,000D), ModalitiesInStudy (0008,0061) and
NumberOfStudyRelatedInstances (0020,1208); matching on StudyInstanceUID (a UID list,
comma-separated) and ModalitiesInStudy, by keyword or by tag (``0020000D``); ``limit``
(default 100, larger values are clamped to 1000) and ``offset``. ``includefield`` and
``fuzzymatching`` are accepted and ignored; other matching keys (PatientID, ...) cannot be
matched, as kgdx keeps no patient attributes, so they are ignored and named in a
``Warning: 299`` header to tell the client its filter was not applied. No match is a 204
(PS3.18 search transaction status codes).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.deps import IngestKey, State
from service.errors import BadRequestError, NotReadyError, PayloadTooLargeError
from service.instances import InstanceStore, StudySummary
from service.logs import hash_uid
from service.schemas import KEY_ERRORS, error_responses
from service.stow import DICOM_JSON, limits_from_settings, stow

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

#: Most studies one QIDO-RS answer lists.
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: Largest ``offset``: larger ones are refused (the database's integers are 64-bit; an
#: unbounded one overflowed them, a 500 found by API fuzzing).
MAX_OFFSET = 2**31 - 1

_DICOM_JSON_CONTENT: dict[str, Any] = {"content": {DICOM_JSON: {}}}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**_DICOM_JSON_CONTENT, "description": "All instances stored"},
    202: {**_DICOM_JSON_CONTENT, "description": "Some stored; failures or warnings"},
    409: {**_DICOM_JSON_CONTENT, "description": "No instance stored"},
    # 422: a request FastAPI's validation refuses (answered with the error body too).
    **error_responses(*KEY_ERRORS, 400, 413, 415, 422, 503),
}
#: The STOW-RS body, declared for clients and API fuzzers (the route reads the raw stream).
_STOW_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "DICOM Part 10 instances, one per part; the Content-Type must be "
            '`multipart/related; type="application/dicom"; boundary=...`'
        ),
        "content": {
            "multipart/related": {
                "schema": {
                    "type": "array",
                    "items": {
                        "type": "string",
                        "format": "binary",
                        "contentMediaType": "application/dicom",
                    },
                }
            }
        },
    }
}
_QIDO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**_DICOM_JSON_CONTENT, "description": "Matching studies"},
    204: {"description": "No matching study"},
    **error_responses(*KEY_ERRORS, 400),
}

#: The QIDO-RS query, declared for clients and API fuzzers (the route reads the raw query,
#: where each matching key may also be given by its tag).
_QIDO_QUERY: dict[str, Any] = {
    "parameters": [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": description,
            "schema": schema,
        }
        for name, schema, description in (
            (
                "StudyInstanceUID",
                {"type": "string"},
                "UIDs to match, comma-separated (also as 0020000D)",
            ),
            (
                "ModalitiesInStudy",
                {"type": "string"},
                "Modalities to match, comma-separated (also as 00080061)",
            ),
            (
                "limit",
                {"type": "integer", "minimum": 1, "default": 100},
                "Most studies to list; larger values are clamped to 1000",
            ),
            (
                "offset",
                {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                "Studies to skip",
            ),
            ("includefield", {"type": "string"}, "Accepted and ignored"),
            ("fuzzymatching", {"type": "string"}, "Accepted and ignored"),
        )
    ]
}
_STUDY_UID_KEYS = ("StudyInstanceUID", "0020000D")
_MODALITY_KEYS = ("ModalitiesInStudy", "00080061")
_IGNORED_KEYS = {"includefield", "fuzzymatching", "limit", "offset"}


def _instances(state: State) -> InstanceStore:
    if state.instances is None:
        raise NotReadyError("the instance store is not open yet")
    return state.instances


async def _store(request: Request, state: State, study_uid: str | None) -> Response:
    store = _instances(state)
    if study_uid is not None:
        request.state.study_uid_hash = hash_uid(study_uid)
    limits = limits_from_settings(state.settings)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise PayloadTooLargeError(f"the request body is larger than {limits.max_bytes} bytes")
    try:
        result = await stow(
            request.stream(),
            request.headers.get("content-type"),
            store,
            study_uid=study_uid,
            limits=limits,
            max_inflated_bytes=state.settings.max_inflated_bytes,
        )
    except ClientDisconnect:
        raise BadRequestError("the client went away before the body was complete") from None
    request.state.study_uid_hash = hash_uid(result.study_uid)
    first = next((r.sop_instance_uid for r in result.instances if r.sop_instance_uid), None)
    request.state.instance_uid_hash = hash_uid(first)
    studies_url = str(request.url_for("store_instances"))
    return JSONResponse(
        result.to_json(studies_url), status_code=result.status, media_type=DICOM_JSON
    )


@router.post(
    "/studies", response_class=Response, responses=_STOW_RESPONSES, openapi_extra=_STOW_BODY
)
async def store_instances(request: Request, state: State, _key: IngestKey) -> Response:
    """Store the DICOM instances of a ``multipart/related; type="application/dicom"`` body."""
    return await _store(request, state, None)


@router.post(
    "/studies/{study_uid}",
    response_class=Response,
    responses=_STOW_RESPONSES,
    openapi_extra=_STOW_BODY,
)
async def store_study_instances(
    study_uid: str, request: Request, state: State, _key: IngestKey
) -> Response:
    """Store instances that must all belong to this study (others fail with 0xA901)."""
    return await _store(request, state, study_uid)


@router.get(
    "/studies", response_class=Response, responses=_QIDO_RESPONSES, openapi_extra=_QIDO_QUERY
)
async def search_for_studies(request: Request, state: State, _key: IngestKey) -> Response:
    """The studies kgdx holds, as QIDO-RS study results."""
    store = _instances(state)
    params = request.query_params
    limit = _int_param(params.get("limit"), "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int_param(params.get("offset"), "offset", 0, 0, MAX_OFFSET, clamp=False)
    study_uids = _list_param(params, _STUDY_UID_KEYS)
    modalities = _list_param(params, _MODALITY_KEYS)
    known = {*_STUDY_UID_KEYS, *_MODALITY_KEYS}
    unsupported = sorted({k for k in params if k not in known and k.lower() not in _IGNORED_KEYS})
    if study_uids:
        request.state.study_uid_hash = hash_uid(study_uids[0])
    found = await run_in_threadpool(
        store.studies, study_uids=study_uids, modalities=modalities, limit=limit, offset=offset
    )
    headers = {}
    if unsupported:
        names = ", ".join(_header_text(k[:64]) for k in unsupported[:10])
        headers["Warning"] = f'299 kgdx "matching on {names} is not supported and was ignored"'
    if not found:
        return Response(status_code=204, headers=headers)
    return JSONResponse([_study_json(s) for s in found], media_type=DICOM_JSON, headers=headers)


def _header_text(text: str) -> str:
    """``text`` fit for a quoted header value: printable ASCII, other characters as ``?``.

    Query keys are whatever the client sent; a non-Latin-1 one in the ``Warning`` header
    made the response unencodable (a 500, found by API fuzzing).
    """
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)


def _study_json(summary: StudySummary) -> dict[str, Any]:
    ds = Dataset()
    ds.StudyInstanceUID = summary.study_uid
    ds.ModalitiesInStudy = list(summary.modalities)
    ds.NumberOfStudyRelatedInstances = summary.instances
    return ds.to_json_dict()


def _int_param(
    value: str | None, name: str, default: int, low: int, high: int, *, clamp: bool = True
) -> int:
    """An integer query parameter in ``[low, high]``: above ``high`` clamped (or refused)."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer, got {value[:40]!r}") from None
    if number < low:
        raise BadRequestError(f"{name} must be at least {low}, got {number}")
    if number > high and not clamp:
        raise BadRequestError(f"{name} must be at most {high}, got {value[:40]}")
    return min(number, high)


def _list_param(params: Any, keys: tuple[str, ...]) -> list[str] | None:
    values: list[str] = []
    for key in keys:
        for raw in params.getlist(key):
            values += [v.strip() for v in raw.replace("\\", ",").split(",") if v.strip()]
    return values or None
