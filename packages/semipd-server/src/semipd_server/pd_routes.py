"""The routes the smg gateway reads from a worker besides the OpenAI ones: `/server_info` and `/model_info` (and
their `/get_*` spellings: model id, `disaggregation_mode`, `max_running_requests`, tp size), `/health_generate`
and `/flush_cache`. smg tells SGLang workers (parallel PD dispatch with bootstrap rooms, the protocol we speak)
from vLLM ones by the `owned_by` of `/v1/models` (`info_routes`), so `/version` can be served too."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from semipd_runtime import SamplingParams
from semipd_runtime.errors import SemipdError
from semipd_server.errors import ApiError, from_engine_error
from semipd_server.info_routes import version
from semipd_server.state import ServerState


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


async def server_info(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    cfg = engine.config
    last = engine.stats()  # the core's last report: the integrity check it ran when it went idle
    fresh = await state.engine_stats()
    stats = msgspec.structs.asdict(fresh)
    return JSONResponse({
        "model_path": state.model_name,
        "served_model_name": state.model_name,
        "served_model_names": state.served_names,
        "disaggregation_mode": cfg.semi_pd.disaggregation_mode,
        "disaggregation_bootstrap_port": cfg.semi_pd.disaggregation_bootstrap_port,
        "disaggregation_transfer_backend": cfg.semi_pd.disaggregation_transfer_backend,
        "mode": cfg.semi_pd.mode,
        "tp_size": cfg.parallel.tp_size, "dp_size": 1,
        "version": version(),
        "max_running_requests": cfg.scheduler.max_running_requests,
        "max_total_num_tokens": fresh.pages_total * cfg.scheduler.page_size,
        "page_size": cfg.scheduler.page_size,
        "context_length": engine.max_model_len,
        "internal_states": [{**stats, "integrity_error": last.integrity_error}],
    })


async def model_info(request: Request) -> Response:
    state = _state(request)
    engine = state.engine
    return JSONResponse({
        "model_path": state.model_name,
        "served_model_name": state.model_name,
        "tokenizer_path": state.model_name,
        "is_generation": True,
        "disaggregation_mode": engine.config.semi_pd.disaggregation_mode,
        "max_running_requests": engine.config.scheduler.max_running_requests,
        "tp_size": engine.config.parallel.tp_size,
        "context_length": engine.max_model_len,
    })


async def health_generate(request: Request) -> Response:
    """The engine answers and, outside PD mode (where a prompt needs its peer instance), generates a token."""
    engine = _state(request).engine
    try:
        await asyncio.wait_for(engine.check_health(), timeout=10.0)
        if engine.config.semi_pd.disaggregation_mode == "null":

            async def one() -> None:
                async for _ in engine.stream([1], SamplingParams(max_tokens=1, temperature=0)):
                    pass

            await asyncio.wait_for(one(), timeout=30.0)
    except Exception as e:  # noqa: BLE001 - any failure means "not healthy"
        message = getattr(e, "message", None) or repr(e)
        return ApiError(503, f"engine is not healthy: {message}", code="engine_unhealthy").response()
    return Response(status_code=200)


async def flush_cache(request: Request) -> Response:
    """SGLang's /flush_cache: drop the prefix cache (pages running requests hold stay until they finish)."""
    engine = _state(request).engine
    try:
        before = engine.stats().cached_pages
        after = await asyncio.get_running_loop().run_in_executor(None, lambda: engine.refresh_stats(10.0, True))
    except SemipdError as e:
        return from_engine_error(e).response()
    return JSONResponse({"success": True, "message": "Cache flushed.", "cached_pages_before": before,
                         "cached_pages_after": after.cached_pages})


ROUTES = [
    Route("/server_info", server_info, methods=["GET"]),
    Route("/get_server_info", server_info, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/get_model_info", model_info, methods=["GET"]),
    Route("/health_generate", health_generate, methods=["GET"]),
    Route("/flush_cache", flush_cache, methods=["POST", "GET"]),
]
