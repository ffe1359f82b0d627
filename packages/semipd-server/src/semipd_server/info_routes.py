"""Routes that describe the server: `/health`, `/v1/models` and `/v1/models/{id}` (OpenAI), `/version`, `/ping` (vLLM's
liveness probe, as /health), and `/tokenize` + `/detokenize` (also under /v1; vLLM's shapes).

The model cards say `owned_by: "sglang"`: the smg gateway reads that field first to pick the protocol it speaks
to a worker, and semipd speaks SGLang's (bootstrap rooms for PD, `/server_info`, `/generate`). Without it smg
would fall back to probing, and a worker that answers `/version` is taken for vLLM there."""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from semipd_server.errors import ApiError, bad_request
from semipd_server.protocol import ChatMessage, chat_messages, decode_body, template_kwargs
from semipd_server.state import ServerState

OWNED_BY = "sglang"


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def version() -> str:
    try:
        return importlib.metadata.version("semipd-server")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree on PYTHONPATH (GPU box)
        return "0+unknown"


def _card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(state.created),
        "owned_by": OWNED_BY,
        "root": state.engine.model_name,  # the model's name, never a path on the host
        "max_model_len": state.max_model_len,
    }


async def models(request: Request) -> Response:
    state = _state(request)
    return JSONResponse({"object": "list", "data": [_card(state, n) for n in state.served_names]})


async def model_card(request: Request) -> Response:
    state = _state(request)
    name = request.path_params["model"]
    if name not in state.served_names:
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
    return JSONResponse(_card(state, name))


async def version_route(request: Request) -> Response:
    return JSONResponse({"version": version()})


async def health(request: Request) -> Response:
    """200 only when the engine core answers a round trip and reports itself healthy; the body says what the
    server does if its core dies (`on_core_death`: exit for a supervisor to restart it, or restart in place)."""
    state = _state(request)
    if state.draining:
        return ApiError(503, f"server is shutting down ({state.drain_reason})", code="draining").response()
    if state.restarting is not None:
        return ApiError(
            503, f"engine core is being restarted (--restart-core) after: {state.restarting}", code="engine_restarting"
        ).response()
    try:
        await asyncio.wait_for(state.engine.check_health(), timeout=10.0)
    except Exception as e:  # noqa: BLE001 - any failure means "not healthy"
        message = getattr(e, "message", None) or repr(e)
        return ApiError(503, f"engine is not healthy: {message}", code="engine_unhealthy").response()
    return JSONResponse({"status": "ok", "on_core_death": state.on_core_death})


async def ping(request: Request) -> Response:
    """vLLM's (SageMaker's) liveness probe: the same answer as /health."""
    return await health(request)


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    """vLLM's two forms: a `prompt`, or chat `messages` rendered by the chat template first."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template's)
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int] | None = None


def _tokenize(state: ServerState, body: bytes) -> dict[str, Any]:
    req = decode_body(body, TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    tok = state.engine.tokenizer
    if req.messages is not None:
        text = state.prep.render_chat(chat_messages(req.messages),
                                      template_kwargs(req.add_generation_prompt, req.chat_template_kwargs))
        ids = tok.encode(text, add_special_tokens=bool(req.add_special_tokens))
    else:
        assert req.prompt is not None
        state.prep.check_chars(len(req.prompt), "prompt")
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    strs = [tok.id_to_token(t) for t in ids] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}


async def tokenize(request: Request) -> Response:
    state = _state(request)
    body = await request.body()
    return JSONResponse(await state.prep.run(len(body), _tokenize, state, body))


def _detokenize(state: ServerState, body: bytes) -> dict[str, Any]:
    req = decode_body(body, DetokenizeRequest)
    state.check_model(req.model)
    if req.tokens is None:
        raise bad_request("tokens is required", "tokens", "missing_required_parameter")
    vocab = getattr(state.engine.tokenizer, "vocab_size", None)
    for t in req.tokens:
        if t < 0 or (vocab is not None and t >= vocab):
            raise bad_request(f"token id {t} is outside the vocabulary", "tokens")
    return {"prompt": state.prep.decode(req.tokens, skip_special_tokens=False)}  # as vLLM: the tokens, all of them


async def detokenize(request: Request) -> Response:
    state = _state(request)
    body = await request.body()
    return JSONResponse(await state.prep.run(len(body), _detokenize, state, body))


ROUTES = [
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", model_card, methods=["GET"]),
    Route("/version", version_route, methods=["GET"]),
    Route("/ping", ping, methods=["GET", "POST"]),
    *(Route(f"{prefix}/tokenize", tokenize, methods=["POST"]) for prefix in ("", "/v1")),
    *(Route(f"{prefix}/detokenize", detokenize, methods=["POST"]) for prefix in ("", "/v1")),
]
