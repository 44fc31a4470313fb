"""``GET /openapi.json``: the API's schema, for any valid key; the browser UIs only without
authentication.

FastAPI would serve the schema, ``/docs`` and ``/redoc`` to anyone; kgdx keeps every route but
the probes behind a key, so the schema is served here instead and the UIs, which cannot send
a key, exist only with ``--no-auth`` (loopback).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse

from service.deps import AnyKey

router = APIRouter(tags=["docs"])
ui_router = APIRouter(include_in_schema=False)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _key: AnyKey) -> dict[str, Any]:
    """The OpenAPI document of this service."""
    return request.app.openapi()


@ui_router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    """Swagger UI (only with ``--no-auth``)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="kgdx API")


@ui_router.get("/redoc")
async def redoc() -> HTMLResponse:
    """ReDoc (only with ``--no-auth``)."""
    return get_redoc_html(openapi_url="/openapi.json", title="kgdx API")
