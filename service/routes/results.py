"""Stored results: ``GET /v1/results/{id}`` and its heat-map overlay."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response
from starlette.concurrency import run_in_threadpool

from service.deps import PredictKey, State
from service.errors import NotFoundError, ServiceError
from service.overlay import heatmap_overlay_png
from service.routes.reports import ResultId
from service.schemas import KEY_ERRORS, PredictResponse, error_responses

router = APIRouter(prefix="/v1/results", tags=["results"])

_ERRORS = error_responses(*KEY_ERRORS, 404, 422)


def _payload(state: State, result_id: str) -> dict[str, Any]:
    if state.results is None:
        raise ServiceError("result store is not available")
    stored = state.results.get(result_id)
    if stored is None:
        raise NotFoundError(f"no result with id {result_id!r}")
    return stored.payload


@router.get("/{result_id}", response_model=PredictResponse, responses=_ERRORS)
async def get_result(result_id: ResultId, state: State, _key: PredictKey) -> dict[str, Any]:
    """A stored prediction, exactly as ``POST /v1/predict`` answered it."""
    return await run_in_threadpool(_payload, state, result_id)


@router.get(
    "/{result_id}/overlay.png",
    response_class=Response,
    responses={**_ERRORS, 200: {"content": {"image/png": {}}}},
)
async def overlay(
    result_id: ResultId,
    state: State,
    _key: PredictKey,
    finding: Annotated[
        str | None,
        Query(description="Finding name or concept id (default: the most probable finding)"),
    ] = None,
) -> Response:
    """The finding's heat map over the image, as a PNG."""
    payload = await run_in_threadpool(_payload, state, result_id)
    findings = [f for f in payload.get("findings", []) if f.get("heatmap")]
    if not findings:
        raise NotFoundError(f"result {result_id!r} has no heat maps (requested with heatmap=false)")
    if finding is None:
        chosen = max(findings, key=lambda f: f["probability"])
    else:
        matches = [f for f in findings if finding in (f["name"], f["concept"]["id"])]
        if not matches:
            names = ", ".join(f["name"] for f in findings)
            raise NotFoundError(f"result {result_id!r} has no finding {finding!r}; it has {names}")
        chosen = matches[0]
    assert state.results is not None
    image = await run_in_threadpool(state.results.image, result_id)
    if image is None:
        raise NotFoundError(f"result {result_id!r} has no stored image")
    png = await run_in_threadpool(_render, image, chosen["heatmap"], payload["image"])
    return Response(content=png, media_type="image/png")


def _render(image_png: bytes, heatmap: dict[str, Any], image: dict[str, Any]) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image_png)) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    values = np.asarray(heatmap["values"], dtype=np.float32)
    extent = heatmap.get("extent")
    if extent is not None:
        # The grid spans the square model input; crop it to the image (letterbox padding).
        values = _crop_to_image(values, extent, image["width"], image["height"])
    return heatmap_overlay_png(pixels, values)


def _crop_to_image(values: np.ndarray, extent: list[float], width: int, height: int) -> np.ndarray:
    from PIL import Image

    x0, y0, x1, y1 = extent
    side = 256
    big = np.asarray(
        Image.fromarray(values).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32
    )
    sx = side / max(x1 - x0, 1e-6)
    sy = side / max(y1 - y0, 1e-6)
    left, top = round((0 - x0) * sx), round((0 - y0) * sy)
    right, bottom = round((width - x0) * sx), round((height - y0) * sy)
    left, top = max(0, left), max(0, top)
    right, bottom = min(side, max(right, left + 1)), min(side, max(bottom, top + 1))
    return big[top:bottom, left:right]
