"""``Annotated`` dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.apikeys import ApiKey
from service.auth import require_scope
from service.errors import NotReadyError
from service.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.kgdx
    return state


def get_ready_state(request: Request) -> AppState:
    state = get_state(request)
    if not state.ready or state.draining:
        raise NotReadyError(
            "shutting down" if state.draining else "model and ontology are not loaded yet"
        )
    return state


State = Annotated[AppState, Depends(get_state)]
ReadyState = Annotated[AppState, Depends(get_ready_state)]
AnyKey = Annotated[ApiKey | None, Depends(require_scope(None))]
PredictKey = Annotated[ApiKey | None, Depends(require_scope("predict"))]
IngestKey = Annotated[ApiKey | None, Depends(require_scope("ingest"))]
AdminKey = Annotated[ApiKey | None, Depends(require_scope("admin"))]
