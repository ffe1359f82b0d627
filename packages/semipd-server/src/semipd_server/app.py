"""The Starlette app: routes, API-key and drain gate, OpenAI-shaped errors for everything that goes wrong."""

from __future__ import annotations

import logging
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from semipd_server.engine_protocol import ServedEngine
from semipd_server.errors import ApiError
from semipd_server.gate import GateMiddleware
from semipd_server.info_routes import ROUTES as INFO_ROUTES
from semipd_server.info_routes import health
from semipd_server.metrics import CONTENT_TYPE
from semipd_server.native_routes import abort_request, generate
from semipd_server.openai_routes import create_chat_completion, create_completion
from semipd_server.pd_metrics import PdCollector
from semipd_server.pd_routes import ROUTES as PD_ROUTES
from semipd_server.state import ServerState

log = logging.getLogger(__name__)


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.update_engine_stats(await state.engine_stats())
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()


def build_app(
    engine: ServedEngine,
    model_name: str | list[str] | None = None,
    api_key: str | None = None,
    page_size: int | None = None,
    *,
    max_request_bytes: int = 8 << 20,
    metrics_auth: bool = False,
    on_core_death: Literal["exit", "restart"] = "exit",
) -> Starlette:
    """The ASGI app serving `engine` (a semipd_runtime.Engine); `model_name`: the name(s) it is served under (the
    first one is used in responses); `page_size` is the engine's KV page size."""
    names = [model_name] if isinstance(model_name, str) else list(model_name or [])
    state = ServerState(
        engine=engine,
        model_name=names[0] if names else engine.model_name,
        aliases=tuple(names[1:]),
        api_key=api_key,
        page_size=page_size,
        max_request_bytes=max_request_bytes,
        metrics_auth=metrics_auth,
        on_core_death=on_core_death,
    )
    routes = [
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/abort_request", abort_request, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *INFO_ROUTES,
        *PD_ROUTES,  # what the smg gateway reads
    ]
    # anything else is answered (500, counted) by GateMiddleware, inside Starlette's outer error handler
    handlers: dict[Any, Any] = {ApiError: _api_error, HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.server = state
    state.metrics.registry.register(PdCollector(engine, state.model_name))  # type: ignore[arg-type]
    app.add_middleware(GateMiddleware, state=state)
    return app
