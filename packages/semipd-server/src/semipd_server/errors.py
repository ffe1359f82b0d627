"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status."""

from __future__ import annotations

import json

from starlette.responses import JSONResponse, Response

from semipd_runtime.errors import SemipdError

# status -> (OpenAI error type, default code)
_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("internal_error", None),
    503: ("service_unavailable", "unavailable"),
}


class ApiError(Exception):
    """Raised anywhere in a route; the app turns it into an error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        kind, default_code = _KINDS.get(status, ("internal_error", None))
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else default_code
        self.error_type = error_type or kind

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status in (429, 503):
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def sse_payload(self) -> str:
        """The same body, for a stream that already sent its 200 header."""
        return json.dumps(self.body())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_engine_error(e: SemipdError) -> ApiError:
    """InvalidRequestError -> 400, QueueFullError -> 429, EngineDeadError -> 503 (status carried by the class)."""
    return ApiError(e.status_code, e.message, param=e.param)
