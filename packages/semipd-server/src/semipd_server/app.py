"""The Starlette app: routes, API-key and drain gate, OpenAI-shaped errors for everything that goes wrong."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from semipd_server.engine_protocol import ServedEngine
from semipd_server.errors import ApiError
from semipd_server.metrics import CONTENT_TYPE
from semipd_server.native_routes import abort_request, generate
from semipd_server.openai_routes import create_chat_completion, create_completion
from semipd_server.pd_metrics import PdCollector
from semipd_server.pd_routes import ROUTES as PD_ROUTES
from semipd_server.state import ServerState

log = logging.getLogger(__name__)

# requests that run generation: refused while draining, counted as in flight
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate"})
OPEN_PATHS = frozenset({"/health", "/metrics"})  # never need the API key (probes and scrapers)


class GateMiddleware:
    """API key (401), drain (503), in-flight count, and error counting by status, around every HTTP request."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        state = self.state
        if state.api_key is not None and path not in OPEN_PATHS and not self._authorized(scope):
            await self._refuse(
                ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')"),
                scope,
                receive,
                send,
            )
            return
        generation = path in GENERATION_PATHS
        if generation and state.draining:
            await self._refuse(
                ApiError(503, "server is shutting down; not accepting new requests", code="draining"),
                scope,
                receive,
                send,
            )
            return

        async def send_counting_errors(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                state.metrics.error(message["status"])
            await send(message)

        if generation:
            state.enter()
        try:
            await self.app(scope, receive, send_counting_errors)
        finally:
            if generation:
                state.leave()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip(), self.state.api_key or ""
                )
        return False

    async def _refuse(self, error: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.metrics.error(error.status)
        await error.response()(scope, receive, send)


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


async def health(request: Request) -> Response:
    """200 only when the engine core answers a round trip and reports itself healthy."""
    state = _state(request)
    if state.draining:
        return ApiError(503, "server is shutting down", code="draining").response()
    try:
        await asyncio.wait_for(state.engine.check_health(), timeout=10.0)
    except Exception as e:  # noqa: BLE001 - any failure means "not healthy"
        message = getattr(e, "message", None) or repr(e)
        return ApiError(503, f"engine is not healthy: {message}", code="engine_unhealthy").response()
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.update_engine_stats(await state.engine_stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def models(request: Request) -> Response:
    state = _state(request)
    card = {
        "id": state.model_name,
        "object": "model",
        "created": int(state.created),
        "owned_by": "semipd",
        "root": str(state.engine.model_path),
        "max_model_len": state.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [card]})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"internal server error: {type(exc).__name__}").response()


def build_app(
    engine: ServedEngine, model_name: str | None = None, api_key: str | None = None, page_size: int | None = None
) -> Starlette:
    """The ASGI app serving `engine` (a semipd_runtime.Engine); `page_size` is the engine's KV page size."""
    state = ServerState(
        engine=engine, model_name=model_name or engine.model_name, api_key=api_key, page_size=page_size
    )
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/abort_request", abort_request, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *PD_ROUTES,  # what the smg gateway reads
    ]
    handlers: dict[Any, Any] = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.server = state
    state.metrics.registry.register(PdCollector(engine, state.model_name))  # type: ignore[arg-type]
    app.add_middleware(GateMiddleware, state=state)
    return app
