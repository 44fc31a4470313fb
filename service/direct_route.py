"""One hot route called straight from the middleware stack, past the router.

``POST /v1/predict`` reads its request by hand (see service.routes.predict) and needs nothing
from the layers between the innermost middleware and its endpoint: Starlette's exception
middleware, FastAPI's exit-stack middleware, matching the path against every route, and the
endpoint wrapper solving a signature with no parameters to solve. At one request at a time
those layers took about 0.14 ms of each request (the caches cold after the forward pass), a
seventh of what the service's 2 ms overhead budget leaves after the loopback round trip.

:class:`DirectRouteMiddleware` sits innermost among the app's middleware (below CORS and the
request context, so both still see every request) and calls the endpoint itself:

- only for the exact method and path, with no ``root_path``; anything else (another method,
  a trailing slash, a mounted app) goes to the router as before;
- the route is learnt from the router itself: the first such request goes through it, and
  the route it chose (``scope["route"]``) is called directly from then on if it is a plain
  ``async def endpoint(request: Request)`` with no dependencies; otherwise every request
  keeps going through the router;
- the route stays registered, so the OpenAPI document is unchanged;
- an exception is answered by the app's own exception handlers through Starlette's own
  ``wrap_app_handling_exceptions`` (what its ``request_response`` and FastAPI's wrap every
  endpoint in), given them as Starlette's exception middleware holds them; one with no
  handler propagates to the server-error middleware, which answers 500 as before;
- the route is called directly only when the router would add nothing around it: no
  dependencies (its own, its routers' or the app's), no body or form limits, and a
  ``Response`` returned (see :func:`_target`);
- ``scope["route"]`` is set as the router would set it, for the metrics, logs and audit.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Any]


@dataclass(frozen=True)
class _Target:
    """What a direct call needs: the route, its endpoint and the app's exception handlers
    as Starlette's exception middleware holds them (by class, by status code)."""

    route: APIRoute
    endpoint: Endpoint
    handlers: tuple[dict[Any, Handler], dict[int, Handler]]


class DirectRouteMiddleware:
    """Call the endpoint of ``method path`` directly (see the module docstring).

    Args:
        app: the rest of the middleware stack.
        path: the route's path, e.g. ``"/v1/predict"``.
        method: its HTTP method (default ``POST``).
    """

    def __init__(self, app: ASGIApp, path: str, method: str = "POST"):
        self.app = app
        self.path = path
        self.method = method
        self._target: _Target | None = None  # learnt from the router's first answer
        self._resolved = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != self.method
            or scope["path"] != self.path
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        target = self._target
        if target is None:
            try:
                await self.app(scope, receive, send)
            finally:
                if not self._resolved:
                    self._learn(scope)
            return
        scope["route"] = target.route
        scope["endpoint"] = target.endpoint
        scope["path_params"] = {}
        scope["starlette.exception_handlers"] = target.handlers
        request = Request(scope, receive, send)

        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            response = await target.endpoint(request)
            await response(scope, receive, send)

        # What Starlette's request_response does around an endpoint, FastAPI's too.
        await wrap_app_handling_exceptions(endpoint, request)(scope, receive, send)

    def _learn(self, scope: Scope) -> None:
        """After the router's first answer: the route it chose, if it can be called directly
        (see :func:`_target`). Decided once, whatever the answer."""
        route = scope.get("route")
        if not isinstance(route, APIRoute):
            return  # not routed (refused before the router): decide on the next one
        self._resolved = True
        if route.path == self.path and self.method in (route.methods or ()):
            self._target = _target(route, scope.get("app"))


def _target(route: APIRoute, app: Any) -> _Target | None:
    """``route`` as a direct target, or ``None`` when anything the router would add around
    its endpoint could matter: it must be a plain ``async def endpoint(request: Request) ->
    Response`` with no dependencies and no body or form limits of its own, in an app with a
    handler for ``HTTPException``, no app-wide dependencies, and no router included with
    dependencies or a body limit (FastAPI applies those at handling time, not on the
    route)."""
    endpoint = route.endpoint
    params = list(inspect.signature(endpoint).parameters.values())
    try:
        hints = typing.get_type_hints(endpoint)
    except Exception:  # an annotation that does not resolve: leave it to the router
        return None
    returns = hints.get("return")
    plain = (
        inspect.iscoroutinefunction(endpoint)
        and len(params) == 1
        and hints.get(params[0].name) is Request
        and isinstance(returns, type)
        and issubclass(returns, Response)
        and not route.dependencies
        and getattr(route, "max_body_size", None) is None
        and not getattr(route, "form_limits", None)
    )
    handlers: Mapping[Any, Handler] = getattr(app, "exception_handlers", {})
    if not plain or HTTPException not in handlers or not _bare_includes(app):
        return None
    by_class = {k: v for k, v in handlers.items() if isinstance(k, type) and k is not Exception}
    by_status = {k: v for k, v in handlers.items() if isinstance(k, int) and k != 500}
    return _Target(route, endpoint, (by_class, by_status))


def _bare_includes(app: Any) -> bool:
    """No app-wide dependencies, and no included router (at any depth) that brings
    dependencies or a body limit."""
    router = getattr(app, "router", None)
    if router is None or getattr(router, "dependencies", None):
        return False
    pending = list(getattr(router, "routes", ()))
    while pending:
        route = pending.pop()
        context = getattr(route, "include_context", None)
        if context is None:
            continue
        if getattr(context, "dependencies", None) or getattr(context, "max_body_size", None):
            return False
        inner = getattr(route, "original_router", None)
        pending.extend(getattr(inner, "routes", ()))
    return True
