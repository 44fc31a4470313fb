"""DirectRouteMiddleware: predict goes past the router and answers exactly as through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException

import service.direct_route as direct_route
from service.direct_route import DirectRouteMiddleware
from tests.service.conftest import Served

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "nih_00020751_003.png"


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the router handed to a route."""
    seen: list[str] = []
    original = APIRoute.handle

    async def handle(self: APIRoute, scope: Any, receive: Any, send: Any) -> None:
        seen.append(self.path)
        await original(self, scope, receive, send)

    monkeypatch.setattr(APIRoute, "handle", handle)
    return seen


def test_predict_goes_past_the_router(served: Served, handled: list[str]) -> None:
    """The first predict goes through the router, which shows the route; the rest go
    straight to it."""
    files = {"file": ("x.png", SAMPLE.read_bytes(), "image/png")}
    for _ in range(3):
        r = served.client.post("/v1/predict", files=files, headers=served.auth())
        assert r.status_code == 200 and r.json()["findings"]
    assert handled == ["/v1/predict"]
    # the route template still reaches the metrics (scope["route"] as the router sets it)
    assert 'route="/v1/predict"' in served.client.get("/metrics").text
    served.client.get("/healthz")
    assert handled == ["/v1/predict", "/metrics", "/healthz"]


def test_near_misses_go_through_the_router(served: Served, handled: list[str]) -> None:
    files = {"file": ("x.png", SAMPLE.read_bytes(), "image/png")}
    for _ in range(2):
        served.client.post("/v1/predict", files=files, headers=served.auth())
    r = served.client.get("/v1/predict", headers=served.auth())
    assert r.status_code == 405 and r.json()["error"]["code"]
    assert handled == ["/v1/predict", "/v1/predict"]  # the first POST, then the GET


def _bad_requests(auth: dict[str, str], other: dict[str, str]) -> list[dict[str, Any]]:
    png = SAMPLE.read_bytes()
    return [
        {"files": {"file": ("x.png", png, "image/png")}},  # no key
        {"files": {"file": ("x.png", png, "image/png")}, "headers": other},  # wrong scope
        {"content": png, "headers": {**auth, "content-type": "image/png"}},
        {"data": {"text": "cough"}, "files": {"other": ("x", b"1")}, "headers": auth},
        {
            "content": b"--b\r\nnot a part",
            "headers": {**auth, "content-type": "multipart/form-data; boundary=b"},
        },
        {"files": {"file": ("x.png", png[:200], "image/png")}, "headers": auth},
        {
            "files": {"file": ("x.png", png, "image/png")},
            "data": {"threshold": "2"},
            "headers": auth,
        },
        {"files": {"file": ("x.png", b"", "image/png")}, "headers": auth},
    ]


def test_errors_read_the_same_either_way(
    make_service: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:  # no target: every request takes the router
        m.setattr(direct_route, "_target", lambda *a: None)
        routed = make_service()
        routed_answers = [
            routed.client.post("/v1/predict", **kw)
            for kw in _bad_requests(routed.auth(), routed.auth("ingest"))
        ]
    direct = make_service()
    files = {"file": ("x.png", SAMPLE.read_bytes(), "image/png")}
    assert direct.client.post("/v1/predict", files=files, headers=direct.auth()).is_success
    direct_answers = [
        direct.client.post("/v1/predict", **kw)
        for kw in _bad_requests(direct.auth(), direct.auth("ingest"))
    ]
    statuses = [r.status_code for r in routed_answers]
    assert statuses == [401, 403, 415, 422, 400, 422, 422, 422]
    for a, b in zip(routed_answers, direct_answers, strict=True):
        assert (a.status_code, a.json()) == (b.status_code, b.json())


def test_an_unhandled_error_still_answers_500(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("service.routes.predict.respond", boom)
    files = {"file": ("x.png", SAMPLE.read_bytes(), "image/png")}
    r = served.client.post("/v1/predict", files=files, headers=served.auth())
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert served.client.get("/healthz").status_code == 200  # still serving


def _tiny_app() -> FastAPI:
    app = FastAPI()

    @app.post("/plain")
    async def plain(request: Request) -> JSONResponse:
        if request.query_params.get("fail"):
            raise HTTPException(418, "teapot")
        return JSONResponse({"route": request.scope["route"].path})

    @app.post("/params")
    async def params(x: int) -> JSONResponse:
        return JSONResponse({"x": x})

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    return app


@pytest.mark.parametrize("path", ["/plain", "/params"])
def test_only_a_plain_request_endpoint_is_called_directly(path: str, handled: list[str]) -> None:
    app = _tiny_app()
    app.add_middleware(DirectRouteMiddleware, path=path)
    client = TestClient(app)
    if path == "/plain":  # routed once, then direct
        for _ in range(2):
            assert client.post("/plain").json() == {"route": "/plain"}
        failed = client.post("/plain?fail=1")
        assert (failed.status_code, failed.json()) == (418, {"error": "teapot"})
        assert handled == ["/plain"]
    else:  # a parameter to solve: always the router (422 for the missing x)
        for _ in range(2):
            assert client.post("/params").status_code == 422
        assert handled == ["/params", "/params"]


def test_a_mounted_app_goes_through_the_router(handled: list[str]) -> None:
    app = _tiny_app()
    app.add_middleware(DirectRouteMiddleware, path="/plain")
    client = TestClient(app, root_path="/api")
    for _ in range(2):
        assert client.post("/plain").json() == {"route": "/plain"}
    assert handled == ["/plain", "/plain"]


def _refuse() -> None:
    raise HTTPException(403, "refused by a dependency")


@pytest.mark.parametrize("where", ["include", "app"])
def test_dependencies_from_outside_the_route_keep_the_router(where: str) -> None:
    """FastAPI applies an included router's or the app's dependencies while it handles the
    request, not on the route: such an app never gets the direct call."""
    from fastapi import APIRouter, Depends

    router = APIRouter()

    @router.post("/guarded")
    async def guarded(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = FastAPI(dependencies=[Depends(_refuse)] if where == "app" else None)
    app.include_router(router, dependencies=[Depends(_refuse)] if where == "include" else None)
    app.add_middleware(DirectRouteMiddleware, path="/guarded")
    client = TestClient(app)
    assert [client.post("/guarded").status_code for _ in range(3)] == [403, 403, 403]


def test_a_plain_function_handler_runs_as_starlette_runs_it() -> None:
    app = FastAPI()

    @app.post("/plain")
    async def plain(request: Request) -> JSONResponse:
        raise ValueError("no")

    def value_error(_: Request, exc: Exception) -> JSONResponse:  # not a coroutine
        return JSONResponse({"error": str(exc)}, status_code=400)

    app.add_exception_handler(ValueError, value_error)
    app.add_exception_handler(HTTPException, lambda *_: JSONResponse({}, status_code=500))
    app.add_middleware(DirectRouteMiddleware, path="/plain")
    client = TestClient(app)
    answers = [client.post("/plain") for _ in range(2)]  # the router, then direct
    assert [(a.status_code, a.json()) for a in answers] == [(400, {"error": "no"})] * 2
