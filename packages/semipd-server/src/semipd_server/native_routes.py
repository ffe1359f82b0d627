"""Native API: POST /generate (text or input_ids + SamplingParams' own field names, stream optional) and
POST /abort_request. In SGLang's shape: one object per completion (a list when n > 1), `meta_info` with the token
counts, SGLang's `finish_reason` object and, with logprobs, `output_token_logprobs` / `output_top_logprobs`."""

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
from semipd_server.native_protocol import GenerateRequest, generate_params, generate_prompt
from semipd_server.openai_format import TokenStrings
from semipd_server.pd_fields import bootstraps
from semipd_server.protocol import decode_body
from semipd_server.sse import DONE, sse_event, sse_response
from semipd_server.state import ServerState
from semipd_server.structured import compile_structured


def finish_reason_of(c: CompletionOutput) -> dict[str, Any] | None:
    """SGLang's finish_reason: {"type": "stop", "matched": token id or stop string} (EOS is the matched token),
    {"type": "length", "length": n}, {"type": "abort", "message": ...}; None while running."""
    if c.finish_reason is None:
        return None
    if c.finish_reason == "stop":
        matched = c.stop_reason if c.stop_reason is not None else (c.token_ids[-1] if c.token_ids else None)
        return {"type": "stop", "matched": matched}
    if c.finish_reason == "length":
        return {"type": "length", "length": len(c.token_ids)}
    return {"type": "abort", "message": "the request was aborted (client gone, /abort_request or a timeout)"}


def _completion(rid: str, out: RequestOutput, c: CompletionOutput, delta: bool, strings: TokenStrings,
                with_text: bool) -> dict[str, Any]:
    """One completion in SGLang's shape: cumulative `text` and `output_ids` (a stream also carries the new part
    as `delta_text` / `delta_output_ids`), the rest under `meta_info`."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": finish_reason_of(c),
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(c.token_ids),
    }
    if c.finish_reason is not None and "finished" in out.metrics:
        meta["e2e_latency"] = out.metrics["finished"] - out.metrics["arrival"]
    if c.logprobs is not None:

        def entry(token_id: int, logprob: float) -> list[Any]:
            return [logprob, token_id, strings.text(token_id) if with_text else None]

        meta["output_token_logprobs"] = [entry(lp.token_id, lp.logprob) for lp in c.logprobs]
        meta["output_top_logprobs"] = [[entry(t, v) for t, v in lp.top] for lp in c.logprobs]
    obj: dict[str, Any] = {"text": c.text, "output_ids": c.token_ids, "meta_info": meta, "index": c.index}
    if delta:
        obj["delta_text"] = c.delta_text
        obj["delta_output_ids"] = c.delta_token_ids
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
        return sse_response(_stream(gens, rid, tracker, params.n, state.strings, req.return_text_in_logprobs))
    last: RequestOutput | None = None
    try:
        last = await run_until_disconnect(_last_output(gens[0], tracker), request.receive)
    finally:
        _finish(tracker, last, params.n)
    assert last is not None
    objs = [_completion(rid, last, c, False, state.strings, req.return_text_in_logprobs) for c in last.outputs]
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


async def _stream(gens: list[Generation], rid: str, tracker: RequestTracker, n: int, strings: TokenStrings,
                  with_text: bool) -> AsyncIterator[bytes]:
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
                yield sse_event(_completion(rid, out, c, True, strings, with_text))
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
