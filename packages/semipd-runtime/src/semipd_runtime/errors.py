"""Errors the engine raises to its callers; the server maps them to HTTP status codes."""

from __future__ import annotations


class SemipdError(Exception):
    """Base class: `message` is safe to show to a client."""

    status_code = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(SemipdError, ValueError):
    """Bad sampling values, an over-long prompt, a request that can never fit the KV pool (HTTP 400)."""

    status_code = 400
    error_type = "invalid_request_error"


class QueueFullError(SemipdError):
    """More requests are waiting than the engine was configured to queue (HTTP 429)."""

    status_code = 429
    error_type = "rate_limit_error"


class EngineDeadError(SemipdError):
    """The engine process (or a worker it needs) is gone or shutting down (HTTP 503)."""

    status_code = 503
    error_type = "service_unavailable"


class KvTransferError(SemipdError):
    """PD decode instance: the prompt's KV never arrived from the prefill instance (it refused the request, the
    transfer failed or timed out) (HTTP 502)."""

    status_code = 502
    error_type = "bad_gateway"
