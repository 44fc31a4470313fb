"""Liveness, readiness and Prometheus metrics: the only routes open without a key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.deps import State
from service.error_handlers import error_response
from service.schemas import ErrorResponse, Health, ModelInfo, OntologyInfo, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": ErrorResponse, "description": "Not ready"}},
)
async def readyz(state: State) -> Readiness | JSONResponse:
    """Readiness: 200 once the model, ontology and entity embeddings are loaded."""
    if state.draining:
        return error_response(503, "not_ready", "shutting down", {"Retry-After": "5"})
    if not state.ready or state.predictor is None:
        reason = state.load_error or "model and ontology are loading"
        return error_response(503, "not_ready", reason, {"Retry-After": "5"})
    described = state.predictor.describe()
    return Readiness(
        status="ready",
        model=ModelInfo(name=described["model"]["name"], version=described["model"]["version"]),
        ontology=OntologyInfo(**described["ontology"]),
        device=str(state.predictor.device),
    )


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus metrics: requests, queue time, inference time, batch sizes, queue depth."""
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.queue_depth)
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
