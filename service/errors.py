"""Domain errors of the service layer, each with its HTTP status and a stable code.

Routers and the pipeline raise these; ``service/error_handlers.py`` turns every one (and the
``kg`` / ``models`` errors) into ``{"error": {"code", "message"}}`` with its status. Messages
name the problem and never carry patient data or internals.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service answers with a 4xx/5xx JSON body."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequestError(ServiceError):
    status = 400
    code = "bad_request"


class UnauthorizedError(ServiceError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServiceError):
    status = 403
    code = "forbidden"


class NotFoundError(ServiceError):
    status = 404
    code = "not_found"


class ConflictError(ServiceError):
    status = 409
    code = "conflict"


class PayloadTooLargeError(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServiceError):
    status = 415
    code = "unsupported_media_type"


class UnprocessableImageError(ServiceError):
    status = 422
    code = "unprocessable_image"


class RateLimitedError(ServiceError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class OverloadedError(ServiceError):
    """The inference queue is full (backpressure)."""

    status = 503
    code = "overloaded"

    def __init__(self, message: str = "inference queue is full", retry_after_s: int = 1):
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class NotReadyError(ServiceError):
    status = 503
    code = "not_ready"

    def __init__(self, message: str = "model and ontology are not loaded yet"):
        super().__init__(message, headers={"Retry-After": "5"})


class InferenceTimeoutError(ServiceError):
    """A request waited longer than its timeout for inference."""

    status = 504
    code = "timeout"
