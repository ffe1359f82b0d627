"""Native API: POST /generate (text or input_ids + SamplingParams' own field names, stream optional) and
POST /abort_request. Close to SGLang's shape: one object per completion, `meta_info` with token counts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from semipd_runtime import CompletionOutput, RequestOutput, SamplingParams
from semipd_server.errors import ApiError, bad_request
from semipd_server.generation import Generation, merged, new_request_id, run_until_disconnect, start_all
from semipd_server.metrics import RequestTracker
from semipd_server.pd_fields import bootstraps
from semipd_server.protocol import GenerateRequest, decode_body, generate_params, generate_prompt
from semipd_server.sse import DONE, sse_event, sse_response
from semipd_server.state import ServerState
from semipd_server.structured import compile_structured


def _completion(rid: str, out: RequestOutput, c: CompletionOutput, delta: bool) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": rid,
        "index": c.index,
        "text": c.text,
        "output_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "meta_info": {
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(c.token_ids),
            "stop_reason": c.stop_reason,
        },
    }
    if delta:
        obj["delta_text"] = c.delta_text
        obj["delta_output_ids"] = c.delta_token_ids
    lps = c.delta_logprobs if delta else c.logprobs
    if lps is not None:
        obj["meta_info"]["output_token_logprobs"] = [
            [lp.logprob, lp.token_id, [list(t) for t in lp.top]] for lp in lps
        ]
    return obj


def _prepare(state: ServerState, body: bytes) -> tuple[GenerateRequest, SamplingParams, list[int]]:
    """Parse, validate and tokenize (blocking: runs on the preparation pool)."""
    req = decode_body(body, GenerateRequest)
    prompt = generate_prompt(req)
    params = generate_params(req)
    state.check_capacity(1, params.n)
    return req, params, state.prep.prompt_ids(prompt, "input_ids" if req.text is None else "text")


async def generate(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = await request.body()
    req, params, prompt_ids = await state.prep.run(len(body), _prepare, state, body)
    await compile_structured(state, params, "sampling_params.json_schema")
    rid = req.rid or new_request_id("gen")
    tracker = state.metrics.tracker()
    gens = await start_all(state.engine, [prompt_ids], params, rid, bootstraps(state.engine, req, 1))
    if req.stream:
        return sse_response(_stream(gens, rid, tracker, params.n))
    last: RequestOutput | None = None
    try:
        last = await run_until_disconnect(_last_output(gens[0], tracker), request.receive)
    finally:
        _finish(tracker, last, params.n)
    assert last is not None
    objs = [_completion(rid, last, c, delta=False) for c in last.outputs]
    return JSONResponse(objs[0] if params.n == 1 else objs)


async def _last_output(gen: Generation, tracker: RequestTracker) -> RequestOutput | None:
    last = None
    async for _, out in merged([gen]):
        tracker.on_output(out)
        last = out
    return last


def _finish(tracker: RequestTracker, last: RequestOutput | None, n: int) -> None:
    if last is None:
        tracker.on_finish(0, ["abort"] * n)
    else:
        tracker.on_finish(len(last.prompt_token_ids), [c.finish_reason for c in last.outputs])


async def _stream(gens: list[Generation], rid: str, tracker: RequestTracker, n: int) -> AsyncIterator[bytes]:
    last: RequestOutput | None = None
    done: set[int] = set()
    try:
        async for _, out in merged(gens):
            tracker.on_output(out)
            last = out
            for c in out.outputs:
                if c.index in done or (
                    not c.delta_token_ids and not c.delta_text and c.finish_reason is None
                ):
                    continue
                yield sse_event(_completion(rid, out, c, delta=True))
                if c.finish_reason is not None:
                    done.add(c.index)
        yield DONE
    except ApiError as e:
        tracker.metrics.error(e.status)
        yield b"data: " + e.sse_payload().encode() + b"\n\n"
        yield DONE
    finally:
        _finish(tracker, last, n)


class AbortBody(msgspec.Struct, forbid_unknown_fields=True):
    rid: str


async def abort_request(request: Request) -> Response:
    """Abort a request started with POST /generate {"rid": ...}; unknown ids are ignored (it may have ended)."""
    state: ServerState = request.app.state.server
    body = decode_body(await request.body(), AbortBody)
    if not body.rid:
        raise bad_request("rid must be a non-empty string", "rid")
    state.engine.abort(body.rid)
    return JSONResponse({"rid": body.rid, "aborted": True})
