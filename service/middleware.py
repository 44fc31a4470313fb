"""Per-request plumbing as plain ASGI middleware: request id, size guard, metrics, logs, audit.

The audit record is queued after the response has gone out and committed by the audit log's
writer thread, so it adds no latency; it is written for every request to ``/v1`` and
``/dicomweb`` routes, whatever the outcome.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.audit import AuditRecord
from service.error_handlers import error_response
from service.logs import request_id_var
from service.state import AppState

log = logging.getLogger("kgdx.access")

AUDITED_PREFIXES = ("/v1", "/dicomweb")


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403, 429, 503):
        return "rejected"
    return "client_error" if status < 500 else "server_error"


class RequestContextMiddleware:
    """Request id, early 413 on a declared oversized body, metrics, access log and audit."""

    def __init__(self, app: ASGIApp, state: AppState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        if not request_id.replace("-", "").isalnum():
            request_id = uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status_holder: dict[str, int] = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            limit = self._body_limit(scope["path"])
            declared = headers.get("content-length")
            if limit is not None and declared and declared.isdigit() and int(declared) > limit:
                response = error_response(
                    413, "payload_too_large", f"request body is larger than {limit} bytes"
                )
                await response(scope, receive, send_wrapper)
            elif limit is not None:
                await self.app(scope, _limited(receive, limit), send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            status = status_holder["status"]
            route = _route_template(scope)
            self.state.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.state.metrics.request_seconds.labels(route).observe(elapsed)
            log.info(
                "%s %s -> %d in %.1f ms",
                scope["method"],
                route,
                status,
                elapsed * 1e3,
                extra={"route": route, "status": status, "ms": round(elapsed * 1e3, 2)},
            )
            if scope["path"].startswith(AUDITED_PREFIXES):
                await self._audit(scope, route, status, elapsed, request_id)
            request_id_var.reset(token)

    def _body_limit(self, path: str) -> int | None:
        """The most body bytes a route reads; ``None``: the route bounds its own body."""
        settings = self.state.settings
        if path.startswith("/v1/predict"):
            return settings.max_upload_bytes + 64 * 1024  # multipart framing
        return None

    async def _audit(
        self, scope: Scope, route: str, status: int, elapsed: float, request_id: str
    ) -> None:
        audit = self.state.audit
        if audit is None:
            return
        st: dict[str, Any] = scope.get("state", {})
        predictor = self.state.predictor
        record = AuditRecord(
            key_id=st.get("key_id"),
            route=route,
            method=scope["method"],
            status=status,
            outcome=_outcome(status),
            study_uid_hash=st.get("study_uid_hash"),
            instance_uid_hash=st.get("instance_uid_hash"),
            model_version=predictor.model_version if predictor else None,
            ontology_version=predictor.ontology_version if predictor else None,
            timings={"total_ms": round(elapsed * 1e3, 3)},
            request_id=request_id,
        )
        if not audit.record_later(record):  # the writer is full or closed: write it here
            await run_in_threadpool(audit.record, record)


def _limited(receive: Receive, limit: int) -> Receive:
    """``receive`` that answers 413 once more than ``limit`` body bytes came in, whatever the
    declared length (a chunked body declares none): nothing past the limit is read or
    spooled, with or without a key, since the form is parsed before the key is checked."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body is larger than {limit} bytes")
        return message

    return limited
