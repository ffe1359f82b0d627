"""The HTTP layer over a small fake engine: OpenAI shapes, streaming, errors and their bodies, auth, drain,
disconnect -> abort, metrics. (End-to-end tests with the real engine and server process are in tests/.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fake_engine import FakeEngine, expected_tokens, logprob_of

from semipd_runtime import EngineStats
from semipd_server.app import build_app
from semipd_server.sse import parse_sse

Check = Callable[[httpx.AsyncClient, FakeEngine], Awaitable[None]]


def serve(
    check: Check, engine: FakeEngine | None = None, api_key: str | None = None, page_size: int | None = None
) -> FakeEngine:
    engine = engine or FakeEngine()
    app = build_app(engine, api_key=api_key, page_size=page_size)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await check(client, engine)

    asyncio.run(main())
    return engine


def expected_text(prompt: str, index: int, n_tokens: int) -> str:
    return "".join(chr(t) for t in expected_tokens([ord(c) for c in prompt], index, n_tokens))


def chunks(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.headers["content-type"].startswith("text/event-stream")
    payloads = parse_sse(resp.text)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def assert_error(
    resp: httpx.Response, status: int, param: str | None = None, code: str | None = None
) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_completion_whole_and_usage() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        r = await c.post(
            "/v1/completions",
            json={"model": "fake-model", "prompt": ["abc", "hello"], "n": 2, "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "fake-model"
        assert body["id"].startswith("cmpl-")
        texts = [(ch["index"], ch["text"], ch["finish_reason"]) for ch in body["choices"]]
        assert texts == [
            (0, expected_text("abc", 0, 4), "length"),
            (1, expected_text("abc", 1, 4), "length"),
            (2, expected_text("hello", 0, 4), "length"),
            (3, expected_text("hello", 1, 4), "length"),
        ]
        assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 16, "total_tokens": 24}
        r = await c.post("/v1/completions", json={"prompt": [104, 105], "max_tokens": 3, "echo": True})
        assert r.json()["choices"][0]["text"] == "hi" + expected_text("hi", 0, 3)

    serve(check)


def test_completion_stop_and_logprobs() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        # "abcdef" reversed: "fedcba"; stop at "c" -> "fed"
        r = await c.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 6, "stop": "c"})
        ch = r.json()["choices"][0]
        assert (ch["text"], ch["finish_reason"], ch["stop_reason"]) == ("fed", "stop", "c")
        r = await c.post("/v1/completions", json={"prompt": "xy", "max_tokens": 2, "logprobs": 2})
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["tokens"] == ["y", "x"]
        assert lp["token_logprobs"] == [logprob_of(0), logprob_of(1)]
        assert lp["top_logprobs"] == [
            {"y": logprob_of(0), "z": logprob_of(0) - 1},
            {"x": logprob_of(1), "y": logprob_of(1) - 1},
        ]
        assert lp["text_offset"] == [0, 1]

    serve(check)


def test_completion_stream_framing_and_usage() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        body = {
            "prompt": "hello",
            "max_tokens": 5,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        evts = chunks(await c.post("/v1/completions", json=body))
        *token_chunks, last = evts
        assert last["choices"] == [] and last["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 10,
            "total_tokens": 15,
        }
        for j in range(2):
            mine = [e["choices"][0] for e in token_chunks if e["choices"][0]["index"] == j]
            assert "".join(m["text"] for m in mine) == expected_text("hello", j, 5)
            assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + ["length"]
        assert all(e["usage"] is None and e["object"] == "text_completion" for e in token_chunks)
        plain = chunks(
            await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
        )
        assert all("usage" not in e for e in plain)

    serve(check)


def test_batched_prompts_stream_interleaved() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        body = {"prompt": ["abc", "wxyz"], "max_tokens": 3, "n": 2, "stream": True}
        evts = chunks(await c.post("/v1/completions", json=body))
        for i, prompt in enumerate(["abc", "wxyz"]):
            for j in range(2):
                mine = [e["choices"][0] for e in evts if e["choices"][0]["index"] == i * 2 + j]
                assert "".join(m["text"] for m in mine) == expected_text(prompt, j, 3)
                assert mine[-1]["finish_reason"] == "length"
        assert sorted(eng.finished) == sorted({e["id"] + "-0" for e in evts} | {e["id"] + "-1" for e in evts})

    serve(check)


def test_chat_whole_stream_and_logprobs() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hey"}]
        prompt = eng.tokenizer.apply_chat_template(msgs)
        r = await c.post("/v1/chat/completions", json={"model": "fake-model", "messages": msgs})
        body = r.json()
        assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
        # no max_tokens: generate up to the context length
        n_out = eng.max_model_len - len(prompt)
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": expected_text(prompt, 0, n_out),
        }
        assert body["usage"] == {
            "prompt_tokens": len(prompt),
            "completion_tokens": n_out,
            "total_tokens": eng.max_model_len,
        }
        r = await c.post(
            "/v1/chat/completions",
            json={
                "messages": msgs,
                "max_completion_tokens": 3,
                "stream": True,
                "logprobs": True,
                "top_logprobs": 1,
            },
        )
        evts = chunks(r)
        assert evts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" for e in evts)
        content = [e["choices"][0] for e in evts[1:] if e["choices"][0]["delta"].get("content")]
        assert "".join(ch["delta"]["content"] for ch in content) == expected_text(prompt, 0, 3)
        first = content[0]["logprobs"]["content"][0]
        tok = expected_text(prompt, 0, 1)
        assert first == {
            "token": tok,
            "logprob": logprob_of(0),
            "bytes": list(tok.encode()),
            "top_logprobs": [{"token": tok, "logprob": logprob_of(0), "bytes": list(tok.encode())}],
        }
        assert evts[-1]["choices"][0] == {
            "index": 0,
            "delta": {},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }

    serve(check)


def test_chat_default_length_fits_the_kv_pool() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        eng.pages_total = 10  # 10 pages x 4 tokens = 40 tokens < the 64-token context
        msgs = [{"role": "user", "content": "hey"}]
        n_prompt = len(eng.tokenizer.apply_chat_template(msgs))
        body = (await c.post("/v1/chat/completions", json={"messages": msgs})).json()
        assert body["usage"]["completion_tokens"] == 40 - n_prompt

    serve(check, page_size=4)


def test_models_route() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        data = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["object"], m["max_model_len"]) for m in data] == [("fake-model", "model", 64)]

    serve(check)


def test_error_statuses_and_bodies() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        post = c.post
        assert_error(await post("/v1/completions", content=b"{bad"), 400, None, "invalid_json")
        assert_error(await post("/v1/completions", json={"prompt": 5}), 400, "prompt")
        assert_error(
            await post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}),
            400,
            "model",
            "model_not_found",
        )
        assert_error(await post("/v1/completions", json={"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
        assert_error(
            await post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400, "temperature"
        )
        assert_error(
            await post("/v1/completions", json={"prompt": "x" * 60, "max_tokens": 10}), 400, "prompt"
        )
        assert_error(
            await post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": True}}),
            400,
            "stream_options",
        )
        assert_error(
            await post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]}),
            400,
            "messages",
        )
        assert_error(await post("/v1/chat/completions", json={"messages": "hi"}), 400, "messages")
        assert_error(await c.get("/v1/nope"), 404)
        assert_error(await c.get("/v1/completions"), 405)
        assert eng.active == set()
        eng.max_active = 0
        assert_error(await post("/v1/completions", json={"prompt": "x"}), 429, None, "queue_full")
        assert_error(
            await post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True}
            ),
            429,
        )
        eng.max_active, eng.dead = 8, True
        assert_error(await post("/v1/completions", json={"prompt": "x"}), 503)
        assert_error(await c.get("/health"), 503, None, "engine_unhealthy")
        eng.dead = False
        assert (await c.get("/health")).status_code == 200
        assert (await post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200

    serve(check)


def test_engine_death_mid_stream_is_reported_in_band() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        async def kill_soon() -> None:
            await asyncio.sleep(0.05)
            eng.dead = True

        killer = asyncio.create_task(kill_soon())
        eng.step_s = 0.02
        r = await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 50, "stream": True})
        await killer
        evts = chunks(r)
        assert r.status_code == 200 and evts[-1]["error"]["type"] == "service_unavailable"
        assert any("choices" in e for e in evts[:-1])

    serve(check)


def test_api_key() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        body = {"prompt": "x", "max_tokens": 1}
        assert_error(await c.post("/v1/completions", json=body), 401, None, "invalid_api_key")
        assert_error(
            await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401
        )
        assert_error(await c.get("/v1/models"), 401)
        ok = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/metrics")).status_code == 200

    serve(check, api_key="s3cret")


def test_drain_refuses_new_requests_and_finishes_running_ones() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        state = c._transport.app.state.server  # type: ignore[attr-defined]
        eng.gate = asyncio.Event()
        running = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3}))
        while state.in_flight == 0:
            await asyncio.sleep(0.001)
        state.start_draining()
        assert_error(await c.post("/v1/completions", json={"prompt": "x"}), 503, None, "draining")
        assert_error(await c.get("/health"), 503)
        assert (await c.get("/metrics")).status_code == 200
        idle = asyncio.create_task(state.wait_idle(5.0))
        await asyncio.sleep(0.01)
        assert not idle.done()
        eng.gate.set()
        assert (await running).json()["choices"][0]["text"] == expected_text("abc", 0, 3)
        assert await idle and state.in_flight == 0

    serve(check)


async def call_and_disconnect(
    app: Any, path: str, body: dict[str, Any], after_s: float
) -> list[dict[str, Any]]:
    """Raw ASGI call whose client goes away `after_s` seconds after sending the body."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("t", 1),
        "server": ("t", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), 5.0)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_aborts_request(stream: bool) -> None:
    eng = FakeEngine(step_s=0.01)
    app = build_app(eng)
    body = {"prompt": "abcd", "max_tokens": 40, "stream": stream}
    asyncio.run(call_and_disconnect(app, "/v1/completions", body, after_s=0.05))
    assert len(eng.aborted) == 1 and eng.aborted[0].startswith("cmpl-")
    assert eng.active == set() and eng.finished == []
    assert app.state.server.in_flight == 0


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def test_metrics_parse_and_move() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        before = metric_samples((await c.get("/metrics")).text)
        assert before[("semipd:prompt_tokens_total", ())] == 0
        assert before[("semipd:kv_pages_total", ())] == 100
        assert before[("semipd:sm_split", (("role", "decode"),))] == 0
        await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "stream": True})
        await c.post("/v1/completions", json={"prompt": "abcdef", "max_tokens": 6, "stop": "c"})
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
        after = metric_samples((await c.get("/metrics")).text)
        assert after[("semipd:prompt_tokens_total", ())] == 9
        assert (
            after[("semipd:generation_tokens_total", ())] == 4 + 4
        )  # the stop string ended the 2nd at token 4
        assert after[("semipd:request_success_total", (("finished_reason", "length"),))] == 1
        assert after[("semipd:request_success_total", (("finished_reason", "stop"),))] == 1
        assert after[("semipd:request_errors_total", (("status", "400"),))] == 1
        assert after[("semipd:time_to_first_token_seconds_count", ())] == 2
        assert after[("semipd:e2e_request_latency_seconds_count", ())] == 2
        assert after[("semipd:time_per_output_token_seconds_count", ())] == 2
        assert after[("semipd:inter_token_latency_seconds_count", ())] == 3 + 3
        assert after[("semipd:num_requests_running", ())] == 0

    serve(check)


def test_prefix_cache_metrics_follow_engine_totals() -> None:
    from semipd_server.metrics import ServerMetrics

    m = ServerMetrics("tiny")
    m.update_engine_stats(EngineStats(pages_used=3, pages_total=10, cached_pages=5, evictable_pages=2,
                                      prefix_hit_tokens=32, prefix_query_tokens=100))
    m.update_engine_stats(EngineStats(pages_used=0, pages_total=10, cached_pages=6, evictable_pages=6,
                                      prefix_hit_tokens=48, prefix_query_tokens=130))
    got = metric_samples(m.render().decode())
    assert got[("semipd:prefix_cache_hit_tokens_total", ())] == 48  # totals, not the sum of reports
    assert got[("semipd:prefix_cache_query_tokens_total", ())] == 130
    assert (
        got[("semipd:prefix_cache_pages", ())] == 6 and got[("semipd:prefix_cache_evictable_pages", ())] == 6
    )
    assert got[("semipd:kv_pages_used", ())] == 0  # cached-evictable pages are not "in use"
