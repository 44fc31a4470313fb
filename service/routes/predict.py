"""``POST /v1/predict``: one image (PNG, JPEG or DICOM) in, findings with explanations out."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.auth import require_scope
from service.decode import DecodeLimits
from service.deps import get_ready_state
from service.errors import (
    PayloadTooLargeError,
    UnprocessableImageError,
    UnsupportedMediaTypeError,
)
from service.form_data import SMALL_FORM_BYTES, FormFile, split_form
from service.logs import hash_uid
from service.pipeline import (
    PredictOptions,
    PredictRequest,
    decode_prepared,
    respond,
    thumbnail_png,
)
from service.schemas import KEY_ERRORS, PredictResponse, error_responses
from service.state import AppState

router = APIRouter(prefix="/v1", tags=["predict"])

_ERRORS = error_responses(*KEY_ERRORS, 400, 413, 415, 422, 503, 504)


async def require_form_upload(request: Request) -> None:
    """415 for a body that is not ``multipart/form-data`` (a bare image, JSON), which would
    otherwise be answered as a form that lacks its ``file`` field."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        got = repr(media_type[:100]) if media_type else "no Content-Type"
        raise UnsupportedMediaTypeError(
            f"send the image as multipart/form-data in the field 'file', not {got}"
        )


class PredictForm(BaseModel):
    """The form fields of ``POST /v1/predict`` besides the ``file``, checked as FastAPI would
    check ``Form`` parameters (strings coerced, limits enforced, unknown fields ignored)."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, max_length=4000, description="Clinical indication")
    threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="Probability at which a finding is positive"
    )
    top_k_paths: int | None = Field(
        None, ge=0, le=20, description="Ontology paths per finding (default from settings)"
    )
    heatmap: bool = Field(True, description="Return each finding's heat map")


def _form_schema() -> dict[str, Any]:
    schema = PredictForm.model_json_schema()
    schema["properties"] = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "PNG, JPEG or DICOM image",
        },
        **schema["properties"],
    }
    schema["required"] = ["file"]
    schema["title"] = "PredictForm"
    schema["description"] = "The image and the options of one prediction."
    return schema


_FORM_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": _form_schema()}},
    }
}
_require_predict = require_scope("predict")
#: Most file parts and text fields a predict form may have (more -> 400).
MAX_FILE_PARTS = 8
MAX_FIELD_PARTS = 32


@router.post(
    "/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_FORM_BODY
)
async def predict(request: Request) -> Response:
    """Score an image: findings, probabilities, heat maps, evidence and ontology paths.

    The form is read by hand rather than through ``File``/``Form`` parameters: FastAPI's
    parameter machinery cost about 0.3 ms of the event loop per request. The order of the
    checks is the dependencies' was: ready (503), key (401/403), form type (415), then the
    fields (422).
    """
    state = await get_ready_state(request)
    await _require_predict(request)
    await require_form_upload(request)
    # A small, well-formed form is split by hand (service.form_data); anything else, and a
    # body too large for that, goes through Starlette's parser, which answers a malformed
    # body 400 (its HTTPException, rendered as JSON), as it does parts beyond these counts.
    # Extra parts within them are ignored, and a repeated field counts once, its last value,
    # as FastAPI's Form parameters did.
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) <= SMALL_FORM_BYTES:
        quick = split_form(
            await request.body(),
            request.headers["content-type"],
            max_files=MAX_FILE_PARTS,
            max_fields=MAX_FIELD_PARTS,
        )
        if quick is not None:
            upload = quick.files.get("file")
            if upload is None:
                raise _no_file(quick.fields.get("file"))
            return await _predict(request, state, upload, _options(quick.fields))
    form = await request.form(max_files=MAX_FILE_PARTS, max_fields=MAX_FIELD_PARTS)
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise _no_file(file)
        fields = _options({k: v for k, v in form.items() if isinstance(v, str)})
        data = await file.read(state.settings.max_upload_bytes + 1)
        return await _predict(
            request, state, FormFile(file.filename or "", file.content_type, data), fields
        )
    finally:
        await form.close()


def _no_file(value: object) -> RequestValidationError:
    """422 for a form whose ``file`` is missing or a text field."""
    return RequestValidationError(
        [
            {
                "type": "missing" if value is None else "value_error",
                "loc": ("body", "file"),
                "msg": "Field required"
                if value is None
                else "expected a file upload, got a text field",
                "input": None,
            }
        ]
    )


def _options(form: dict[str, str]) -> PredictForm:
    """The text fields checked; an empty one counts as not sent (``curl -F threshold=``),
    as with Form()."""
    try:
        return PredictForm.model_validate({k: v for k, v in form.items() if k != "file" and v})
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None


async def _predict(
    request: Request, state: AppState, upload: FormFile, fields: PredictForm
) -> Response:
    settings = state.settings
    assert state.batcher is not None and state.predictor is not None
    assert state.pipeline is not None
    t0 = time.perf_counter()
    data = upload.data
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLargeError(f"upload is larger than {settings.max_upload_bytes} bytes")
    limits = DecodeLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        min_side=settings.min_image_side,
    )
    text = fields.text if fields.text and fields.text.strip() else None
    options = PredictOptions(
        threshold=fields.threshold,
        top_k_paths=settings.top_k_paths if fields.top_k_paths is None else fields.top_k_paths,
        heatmap=fields.heatmap,
        evidence_k=settings.evidence_k,
        max_hops=settings.max_path_hops,
    )
    loop = asyncio.get_running_loop()
    with state.batcher.expecting() as announced:  # a filling batch may wait for this one
        decoded, prepared, reused = await loop.run_in_executor(
            state.decode_pool,
            decode_prepared,
            state.pipeline,
            data,
            upload.content_type,
            upload.filename,
            limits,
        )
        decode_ms = (time.perf_counter() - t0) * 1e3
        if decoded.dicom is not None:
            request.state.study_uid_hash = hash_uid(decoded.dicom.study_uid)
            request.state.instance_uid_hash = hash_uid(decoded.dicom.sop_instance_uid)
        # The thumbnail for the overlay endpoint: the upload itself when it is a plain small
        # grayscale PNG, else drawn while the model runs.
        thumb_future = (
            None
            if reused is not None
            else loop.run_in_executor(state.decode_pool, thumbnail_png, decoded.pixels)
        )
        try:
            result, timing = await state.batcher.submit_timed(
                PredictRequest(decoded, text, options, settings.threshold, prepared), announced
            )
        except BaseException:
            if thumb_future is not None:
                thumb_future.cancel()
            raise
    payload = respond(
        result,
        decoded,
        options,
        state.predictor,
        decode_ms=decode_ms,
        queue_ms=timing.queue_ms,
    )
    if not payload["findings"]:
        raise UnprocessableImageError("the model returned no findings")
    thumb = reused if thumb_future is None else await thumb_future
    # The payload was built by respond() to PredictResponse's shape (tests check it against
    # the schema); it is encoded once, for the answer and the stored copy, without
    # re-validating a large nested document. The findings, most of it, were encoded by the
    # batch worker (BatchItemResult.findings_encoded) and are spliced in as they are.
    payload["findings"] = orjson.Fragment(result.findings_encoded)
    body = orjson.dumps(payload)
    results = state.results
    assert results is not None
    store = functools.partial(
        results.put if results.durable else results.put_later,
        body,
        result_id=str(payload["id"]),
        study_uid=decoded.dicom.study_uid if decoded.dicom else None,
        image_png=thumb,
        model_version=str(state.predictor.model_version),
        ontology_version=str(state.predictor.ontology_version),
    )
    if results.durable:  # on disk before the answer (KGDX_DURABLE_RESULTS)
        await run_in_threadpool(store)
    else:  # committed by the writer thread right after; readable from now on
        store()
    request.state.result_id = payload["id"]
    return Response(content=body, media_type="application/json")
