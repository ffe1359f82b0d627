"""Issue 23 over the fake engine: oversized and malformed requests (413/400/401 with OpenAI bodies, counted),
400 vs 429 for what can never fit, answers for requests cut off by the drain timeout, auth and metrics details.
(The same behaviours through a real server process: tests/test_server_hardening.py.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from server_fake_engine import FakeEngine
from test_server_app import assert_error, metric_samples, serve

from semipd_server.app import build_app
from semipd_server.gate import bearer_matches
from semipd_server.sse import parse_sse
from semipd_server.state import drain_timeout_error


async def errors_counted(c: httpx.AsyncClient) -> dict[str, float]:
    samples = metric_samples((await c.get("/metrics")).text)
    return {dict(k[1])["status"]: v for k, v in samples.items() if k[0] == "semipd:request_errors_total"}


def test_malformed_bodies_and_tokens_are_400_401_and_counted() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        auth = {"Authorization": "Bearer s3cret"}
        bad_utf8 = b'{"prompt": "caf\xe9", "max_tokens": 1}'
        assert_error(await c.post("/v1/completions", content=bad_utf8, headers=auth), 400, None, "invalid_json")
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = await c.post("/v1/completions", content=deep, headers=auth)
        assert_error(r, 400, None, "invalid_json")
        assert "nested too deeply" in r.json()["error"]["message"]
        deep_chat = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        assert_error(await c.post("/v1/chat/completions", content=deep_chat, headers=auth), 400)
        assert_error(await c.post("/generate", content=b'{"text": "\xff"}', headers=auth), 400)
        for token in ("Bearer s3crét".encode(), b"Bearer \xff\xfe", "Bearer ключ".encode()):
            r = await c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": token})
            assert_error(r, 401, None, "invalid_api_key")
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=auth)).is_success
        assert await errors_counted(c) == {"400": 4, "401": 3}

    serve(check, api_key="s3cret")


def test_bearer_matches_compares_bytes() -> None:
    assert bearer_matches([(b"authorization", b"Bearer kl\xc3\xa9")], "klé")
    assert bearer_matches([(b"authorization", b"bearer  key ")], "key")
    assert not bearer_matches([(b"authorization", b"Bearer \xff")], "key")
    assert not bearer_matches([(b"authorization", b"Basic key")], "key")
    assert not bearer_matches([], "key")


def test_body_over_the_limit_is_413_before_it_is_read() -> None:
    eng = FakeEngine()
    app = build_app(eng, max_request_bytes=1000)

    async def call(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[dict[str, Any]], int]:
        """Raw ASGI request sending `chunks` as body messages; returns what was sent and how many were read."""
        queue = [{"type": "http.request", "body": b, "more_body": i + 1 < len(chunks)} for i, b in enumerate(chunks)]
        read = 0

        async def receive() -> dict[str, Any]:
            nonlocal read
            if read < len(queue):
                read += 1
                return queue[read - 1]
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers,
                 "query_string": b"", "asgi": {"version": "3.0", "spec_version": "2.1"}, "http_version": "1.1",
                 "scheme": "http", "raw_path": b"/v1/completions", "root_path": "", "client": ("t", 1),
                 "server": ("t", 80)}
        await asyncio.wait_for(app(scope, receive, send), 5)
        return sent, read

    def status_and_error(sent: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], json.loads(body)["error"]

    # declared too large: refused from the header, no body message read at all
    sent, read = asyncio.run(call([(b"content-length", b"5000000")], [b"x" * 1000] * 5000))
    status, err = status_and_error(sent)
    assert (status, err["code"], read) == (413, "request_too_large", 0)
    assert "5000000 bytes" in err["message"] and "1000" in err["message"]
    # chunked (no length): read until the count passes the limit, not one message further
    sent, read = asyncio.run(call([], [b"x" * 400] * 50))
    status, err = status_and_error(sent)
    assert (status, err["type"], read) == (413, "invalid_request_error", 3)
    # under the limit: served
    body = json.dumps({"prompt": "ab", "max_tokens": 1}).encode()
    sent, _ = asyncio.run(call([(b"content-length", str(len(body)).encode())], [body[:10], body[10:]]))
    assert sent[0]["status"] == 200
    samples = metric_samples(app.state.server.metrics.render().decode())
    assert samples[("semipd:request_errors_total", (("status", "413"),))] == 2


def test_never_fits_is_400_and_full_queue_is_429() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        eng.max_running_requests, eng.max_queued_requests = 2, 1
        r = await c.post("/v1/completions", json={"prompt": "ab", "n": 4, "max_tokens": 1})
        assert_error(r, 400, "n", "exceeds_capacity")
        msg = r.json()["error"]["message"]
        assert "--max-running-requests 2" in msg and "--max-queued-requests 1" in msg and "at most 3" in msg
        r = await c.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2, "max_tokens": 1})
        assert_error(r, 400, "prompt", "exceeds_capacity")
        chat = {"messages": [{"role": "user", "content": "hi"}], "n": 5, "max_tokens": 1}
        assert_error(await c.post("/v1/chat/completions", json=chat), 400, "n")
        gen = {"text": "ab", "sampling_params": {"n": 4, "max_new_tokens": 1}}
        assert_error(await c.post("/generate", json=gen), 400, "n")
        ok = await c.post("/v1/completions", json={"prompt": "ab", "n": 3, "max_tokens": 1})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 3
        eng.max_active = 0  # fits in principle, but the engine is full now: waiting helps
        r = await c.post("/v1/completions", json={"prompt": "ab", "n": 3, "max_tokens": 1})
        assert_error(r, 429, None, "queue_full")
        assert r.headers["retry-after"] == "1"

    serve(check)


def test_drain_timeout_answers_every_cut_off_request() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        state = c._transport.app.state.server  # type: ignore[attr-defined]
        eng.gate = asyncio.Event()  # no token is ever produced: the requests can only be cut off
        whole = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5}))
        streamed = asyncio.create_task(
            c.post("/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
        )
        native = asyncio.create_task(c.post("/generate", json={"text": "abc", "stream": True}))
        deadline = asyncio.get_running_loop().time() + 5
        while state.in_flight < 3 or len(eng.active) < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        state.start_draining()
        assert not await state.wait_idle(0.05)
        assert state.cut_off_in_flight(drain_timeout_error(0.05)) == 3
        assert await state.wait_idle(5.0)
        r = await whole
        assert_error(r, 503, None, "drain_timeout")
        assert "drain timeout (0.05s)" in r.json()["error"]["message"]
        for r in (await streamed, await native):
            assert r.status_code == 200
            events = parse_sse(r.text)
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "drain_timeout"
        assert eng.active == set() and len(eng.aborted) == 3  # their engine work was aborted too
        samples = metric_samples((await c.get("/metrics")).text)
        assert samples[("semipd:request_errors_total", (("status", "503"),))] == 3
        assert samples[("semipd:num_aborted_requests_total", ())] == 3
        assert samples[("semipd:num_requests_in_flight", ())] == 0

    serve(check)


def test_empty_api_key_means_auth_off_and_metrics_auth() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})).status_code == 200

    serve(check, api_key="")

    app = build_app(FakeEngine(), api_key="k", metrics_auth=True)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            assert_error(await c.get("/metrics"), 401)
            assert (await c.get("/metrics", headers={"Authorization": "Bearer k"})).status_code == 200
            assert (await c.get("/health")).status_code == 200

    asyncio.run(main())


def test_models_root_health_body_and_abort_metric() -> None:
    async def check(c: httpx.AsyncClient, eng: FakeEngine) -> None:
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["root"] == "fake-model" and "/" not in card["root"]
        assert (await c.get("/health")).json() == {"status": "ok", "on_core_death": "exit"}
        await c.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2})
        samples = metric_samples((await c.get("/metrics")).text)
        assert samples[("semipd:request_success_total", (("finished_reason", "length"),))] == 1
        assert ("semipd:request_success_total", (("finished_reason", "abort"),)) not in samples
        assert samples[("semipd:num_aborted_requests_total", ())] == 0

    serve(check)


def test_client_disconnect_counts_as_aborted_not_success() -> None:
    from test_server_app import call_and_disconnect

    eng = FakeEngine(step_s=0.01)
    app = build_app(eng)
    asyncio.run(call_and_disconnect(app, "/v1/completions", {"prompt": "abcd", "max_tokens": 40, "n": 2}, 0.05))
    samples = metric_samples(app.state.server.metrics.render().decode())
    assert samples[("semipd:num_aborted_requests_total", ())] == 2  # one per completion, as request_success
    assert sum(v for k, v in samples.items() if k[0] == "semipd:request_success_total") == 0
