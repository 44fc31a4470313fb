"""``POST /v1/predict``: one image (PNG, JPEG or DICOM) in, findings with explanations out."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from service.decode import DecodeLimits
from service.deps import PredictKey, ReadyState
from service.errors import (
    PayloadTooLargeError,
    UnprocessableImageError,
    UnsupportedMediaTypeError,
)
from service.logs import hash_uid
from service.pipeline import PredictOptions, PredictRequest, decode, respond, thumbnail_png
from service.schemas import KEY_ERRORS, PredictResponse, error_responses

router = APIRouter(prefix="/v1", tags=["predict"])

_ERRORS = error_responses(*KEY_ERRORS, 400, 413, 415, 422, 503, 504)


async def require_form_upload(request: Request) -> None:
    """415 for a body that is not ``multipart/form-data`` (a bare image, JSON), which would
    otherwise be answered as a form that lacks its ``file`` field. (``async``: FastAPI runs a
    plain ``def`` dependency in the thread pool.)"""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "multipart/form-data":
        got = repr(media_type[:100]) if media_type else "no Content-Type"
        raise UnsupportedMediaTypeError(
            f"send the image as multipart/form-data in the field 'file', not {got}"
        )


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(
    request: Request,
    state: ReadyState,
    _key: PredictKey,
    _form: Annotated[None, Depends(require_form_upload)],
    file: Annotated[UploadFile, File(description="PNG, JPEG or DICOM image")],
    text: Annotated[str | None, Form(max_length=4000, description="Clinical indication")] = None,
    threshold: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
    top_k_paths: Annotated[int | None, Form(ge=0, le=20)] = None,
    heatmap: Annotated[bool, Form()] = True,
) -> Response:
    """Score an image: findings, probabilities, heat maps, evidence and ontology paths."""
    settings = state.settings
    assert state.batcher is not None and state.predictor is not None
    t0 = time.perf_counter()
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise PayloadTooLargeError(f"upload is larger than {settings.max_upload_bytes} bytes")
    limits = DecodeLimits(
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        min_side=settings.min_image_side,
    )
    if text is not None and not text.strip():
        text = None
    options = PredictOptions(
        threshold=threshold,
        top_k_paths=settings.top_k_paths if top_k_paths is None else top_k_paths,
        heatmap=heatmap,
        evidence_k=settings.evidence_k,
        max_hops=settings.max_path_hops,
    )
    loop = asyncio.get_running_loop()
    with state.batcher.expecting() as announced:  # a filling batch may wait for this one
        decoded = await loop.run_in_executor(
            state.decode_pool, decode, data, file.content_type, file.filename, limits
        )
        decode_ms = (time.perf_counter() - t0) * 1e3
        if decoded.dicom is not None:
            request.state.study_uid_hash = hash_uid(decoded.dicom.study_uid)
            request.state.instance_uid_hash = hash_uid(decoded.dicom.sop_instance_uid)
        # The thumbnail for the overlay endpoint is drawn while the model runs.
        thumb_future = loop.run_in_executor(state.decode_pool, thumbnail_png, decoded.pixels)
        try:
            result, timing = await state.batcher.submit_timed(
                PredictRequest(decoded, text, options), announced
            )
        except BaseException:
            thumb_future.cancel()
            raise
    payload = respond(
        result,
        decoded,
        options,
        state.predictor,
        default_threshold=settings.threshold,
        decode_ms=decode_ms,
        queue_ms=timing.queue_ms,
    )
    if not payload["findings"]:
        raise UnprocessableImageError("the model returned no findings")
    thumb = await thumb_future
    # The payload was built by respond() to PredictResponse's shape (tests check it against
    # the schema); it is encoded once, for the answer and the stored copy, without
    # re-validating a large nested document.
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
