"""POST /v1/completions and POST /v1/chat/completions, streamed (SSE) or whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from semipd_runtime import RequestOutput, SamplingParams
from semipd_server.errors import ApiError, bad_request
from semipd_server.generation import Generation, merged, new_request_id, run_until_disconnect, start_all
from semipd_server.metrics import RequestTracker
from semipd_server.openai_format import ResponseBuilder, usage
from semipd_server.pd_fields import bootstraps
from semipd_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_max_tokens,
    chat_messages,
    chat_params,
    completion_params,
    completion_prompts,
    decode_body,
    template_kwargs,
)
from semipd_server.sse import DONE, sse_event, sse_response
from semipd_server.state import ServerState
from semipd_server.structured import ToolPlan, compile_structured, plan_tools, with_tool_calls


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


async def _collect(gens: list[Generation], tracker: RequestTracker) -> dict[int, RequestOutput]:
    """Run every generation to the end; the last output of each holds the cumulative text/tokens/logprobs."""
    last: dict[int, RequestOutput] = {}
    async for i, out in merged(gens):
        tracker.on_output(out)
        last[i] = out
    return last


def _finish(tracker: RequestTracker, last: dict[int, RequestOutput], n_gens: int, n: int) -> None:
    prompt_tokens = sum(len(o.prompt_token_ids) for o in last.values())
    reasons = [c.finish_reason for o in last.values() for c in o.outputs]
    reasons += ["abort"] * (n_gens * n - len(reasons))  # streams that never produced anything (disconnect)
    tracker.on_finish(prompt_tokens, reasons)


def _usage_of(last: dict[int, RequestOutput]) -> dict[str, int]:
    return usage(
        sum(len(o.prompt_token_ids) for o in last.values()),
        sum(len(c.token_ids) for o in last.values() for c in o.outputs),
    )


# --- /v1/completions ------------------------------------------------------------------------------------------
def _prepare_completion(
    state: ServerState, body: bytes
) -> tuple[CompletionRequest, SamplingParams, list[list[int]], list[str]]:
    """Parse, validate and tokenize (blocking: runs on the preparation pool)."""
    req = decode_body(body, CompletionRequest)
    state.check_model(req.model)
    params = completion_params(req)
    prompts = completion_prompts(req)
    _check_stream_options(req)
    state.check_capacity(len(prompts), params.n)
    ids = [state.prep.prompt_ids(p, add_special_tokens=req.add_special_tokens) for p in prompts]
    prefixes = [(p if isinstance(p, str) else state.prep.decode(p)) if req.echo else "" for p in prompts]
    return req, params, ids, prefixes


async def create_completion(request: Request) -> Response:
    state = _state(request)
    body = await request.body()
    prepared = await state.prep.run(len(body), _prepare_completion, state, body)
    req, params, prompt_ids, prefixes = prepared
    await compile_structured(state, params)
    builder = ResponseBuilder(new_request_id("cmpl"), state.model_name, params.n, state.strings)
    tracker = state.metrics.tracker()
    gens = await start_all(state.engine, list(prompt_ids), params, builder.id,
                           bootstraps(state.engine, req, len(prompt_ids)))
    want_lp = req.logprobs is not None
    if req.stream:
        usage_mode = _usage_mode(req)
        return sse_response(_stream_completion(gens, builder, tracker, prefixes, want_lp, usage_mode, params.n))
    last: dict[int, RequestOutput] = {}
    try:
        last = await run_until_disconnect(_collect(gens, tracker), request.receive)
    finally:
        _finish(tracker, last, len(gens), params.n)
    choices = [
        builder.completion_choice(i, c, prefixes[i], want_lp) for i in sorted(last) for c in last[i].outputs
    ]
    choices.sort(key=lambda ch: ch["index"])
    return JSONResponse(builder.envelope("text_completion", choices, usage=_usage_of(last)))


def _check_stream_options(req: CompletionRequest | ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


class _UsageMode:
    """stream_options: a final usage chunk (include_usage), and with continuous_usage_stats the usage so far in
    every chunk (vLLM)."""

    def __init__(self, final: bool, continuous: bool, prompt_tokens: int = 0) -> None:
        self.final = final
        self.continuous = final and continuous
        self.prompt_tokens = prompt_tokens  # known before any output (chat); completions learn it from outputs

    def field(self, last: dict[int, RequestOutput]) -> dict[str, Any]:
        """The chunk's `usage` entry: absent without include_usage, null or the running usage with it."""
        if not self.final:
            return {}
        if not self.continuous:
            return {"usage": None}
        u = _usage_of(last) if last else usage(self.prompt_tokens, 0)
        return {"usage": u}


def _usage_mode(req: CompletionRequest | ChatCompletionRequest, prompt_tokens: int = 0) -> _UsageMode:
    opts = req.stream_options
    return _UsageMode(bool(opts and opts.include_usage), bool(opts and opts.continuous_usage_stats), prompt_tokens)


async def _stream_completion(
    gens: list[Generation],
    builder: ResponseBuilder,
    tracker: RequestTracker,
    prefixes: list[str],
    want_lp: bool,
    usage_mode: _UsageMode,
    n: int,
) -> AsyncIterator[bytes]:
    last: dict[int, RequestOutput] = {}
    offsets: dict[int, int] = {}  # choice index -> characters sent so far (text_offset of logprobs)
    done: set[int] = set()
    try:
        async for i, out in merged(gens):
            tracker.on_output(out)
            last[i] = out
            for c in out.outputs:
                idx = builder.index(i, c)
                if idx in done:
                    continue
                text = c.delta_text
                if idx not in offsets:
                    text = prefixes[i] + text
                    offsets[idx] = 0
                new_logprobs = want_lp and bool(c.delta_logprobs)
                if not text and not new_logprobs and c.finish_reason is None:
                    continue
                yield sse_event(
                    builder.completion_chunk(
                        i,
                        c,
                        text,
                        want_lp,
                        offsets[idx] + len(text) - len(c.delta_text),
                        c.finish_reason,
                        usage_mode.field(last),
                    )
                )
                offsets[idx] += len(text)
                if c.finish_reason is not None:
                    done.add(idx)
        if usage_mode.final:
            u = _usage_of(last)
            yield sse_event(
                builder.usage_chunk("text_completion", u["prompt_tokens"], u["completion_tokens"])
            )
        yield DONE
    except ApiError as e:  # the engine failed after the 200 header went out: report in-band, then end
        tracker.metrics.error(e.status)
        yield b"data: " + e.sse_payload().encode() + b"\n\n"
        yield DONE
    finally:
        _finish(tracker, last, len(gens), n)


# --- /v1/chat/completions -------------------------------------------------------------------------------------
def _chat_sampling(state: ServerState, req: ChatCompletionRequest, n_prompt: int, tools: ToolPlan) -> SamplingParams:
    max_tokens = chat_max_tokens(req)
    if max_tokens is None:  # OpenAI's default: as much as the context leaves
        max_tokens = state.default_max_tokens(n_prompt)
    return chat_params(req, max_tokens, tools)


def _prepare_chat(
    state: ServerState, body: bytes
) -> tuple[ChatCompletionRequest, SamplingParams, list[int], ToolPlan]:
    """Parse, validate, render the template and tokenize (blocking: runs on the preparation pool)."""
    req = decode_body(body, ChatCompletionRequest)
    state.check_model(req.model)
    _check_stream_options(req)
    tools = plan_tools(req.tools, req.tool_choice, state.prep.tokenizer.supports_tools, req.stream,
                       req.parallel_tool_calls)
    kwargs = template_kwargs(req.add_generation_prompt, req.chat_template_kwargs)
    if tools.render is not None:
        kwargs["tools"] = tools.render
    prompt_ids = state.prep.chat_ids(chat_messages(req.messages), kwargs)
    params = _chat_sampling(state, req, len(prompt_ids), tools)
    state.check_capacity(1, params.n)
    return req, params, prompt_ids, tools


async def create_chat_completion(request: Request) -> Response:
    state = _state(request)
    body = await request.body()
    req, params, prompt_ids, tools = await state.prep.run(len(body), _prepare_chat, state, body)
    await compile_structured(state, params, "tools" if tools.spec is not None else "response_format")
    builder = ResponseBuilder(new_request_id("chatcmpl"), state.model_name, params.n, state.strings)
    tracker = state.metrics.tracker()
    gens = await start_all(state.engine, [prompt_ids], params, builder.id, bootstraps(state.engine, req, 1))
    if req.stream:
        usage_mode = _usage_mode(req, len(prompt_ids))
        return sse_response(_stream_chat(gens, builder, tracker, req.logprobs, usage_mode, params.n))
    last: dict[int, RequestOutput] = {}
    try:
        last = await run_until_disconnect(_collect(gens, tracker), request.receive)
    finally:
        _finish(tracker, last, len(gens), params.n)
    choices = sorted(
        (with_tool_calls(builder.chat_choice(i, c, req.logprobs), tools) for i in last for c in last[i].outputs),
        key=lambda ch: ch["index"],
    )
    return JSONResponse(builder.envelope("chat.completion", choices, usage=_usage_of(last)))


async def _stream_chat(
    gens: list[Generation],
    builder: ResponseBuilder,
    tracker: RequestTracker,
    want_lp: bool,
    usage_mode: _UsageMode,
    n: int,
) -> AsyncIterator[bytes]:
    last: dict[int, RequestOutput] = {}
    done: set[int] = set()
    try:
        # the role comes first, before any token, as OpenAI streams it
        for j in range(n):
            yield sse_event(
                builder.chat_chunk(
                    j, {"role": "assistant", "content": ""}, [] if want_lp else None, None, usage_mode.field(last)
                )
            )
        async for i, out in merged(gens):
            tracker.on_output(out)
            last[i] = out
            for c in out.outputs:
                idx = builder.index(i, c)
                if idx in done:
                    continue
                lps = (c.delta_logprobs or []) if want_lp else None
                if c.delta_text or lps:
                    yield sse_event(
                        builder.chat_chunk(idx, {"content": c.delta_text}, lps, None, usage_mode.field(last))
                    )
                if c.finish_reason is not None:
                    yield sse_event(builder.chat_chunk(idx, {}, None, c.finish_reason, usage_mode.field(last),
                                                       c.stop_reason))
                    done.add(idx)
        if usage_mode.final:
            u = _usage_of(last)
            yield sse_event(
                builder.usage_chunk("chat.completion.chunk", u["prompt_tokens"], u["completion_tokens"])
            )
        yield DONE
    except ApiError as e:
        tracker.metrics.error(e.status)
        yield b"data: " + e.sse_payload().encode() + b"\n\n"
        yield DONE
    finally:
        _finish(tracker, last, len(gens), n)
