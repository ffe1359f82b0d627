"""The real `semipd-server` (default model, engine core in its own process) driven by the official `openai`
client: greedy outputs equal the offline Engine's, usage is exact, every bad input gets its status and body,
50 concurrent streams with a third disconnecting leave no KV page in use, /metrics parses and moves."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from semipd_runtime import Engine, SamplingParams
from semipd_server.engine_protocol import ServedEngine, ServedTokenizer
from semipd_server.testing import ServerProcess, scrape_metrics

pytestmark = pytest.mark.slow
KEY = "e2e-key"
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        "--num-pages",
        "1024",
        "--max-running-requests",
        "64",
        "--chunked-prefill-size",
        "512",
        log_path=tmp_path_factory.mktemp("server") / "server.log",
        api_key=KEY,
    )
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def offline() -> Iterator[Engine]:
    eng = Engine(num_pages=256, max_running_requests=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def metrics(server: ServerProcess) -> dict[str, float]:
    return scrape_metrics(server.url)


def test_engine_satisfies_the_server_protocol(offline: Engine) -> None:
    assert isinstance(offline, ServedEngine) and isinstance(offline.tokenizer, ServedTokenizer)


def test_completions_equal_offline_engine(client: openai.OpenAI, offline: Engine) -> None:
    ref = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [o.text for o in ref]
    assert [c.finish_reason for c in r.choices] == [o.finish_reason for o in ref]
    n_prompt = sum(len(offline.tokenizer.encode(p)) for p in PROMPTS)
    n_out = sum(len(o.token_ids) for o in ref)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        n_out,
        n_prompt + n_out,
    )
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[0],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref[0].token_ids)


def test_chat_equals_offline_engine(client: openai.OpenAI, offline: Engine) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    ids = offline.tokenizer.encode(offline.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    ref = offline.generate([ids], SamplingParams(temperature=0.0, max_tokens=10, logprobs=2))[0]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(ref.token_ids))
    lps = choice.logprobs.content
    assert len(lps) == len(ref.token_ids)
    for got, want in zip(lps, ref.outputs[0].logprobs or []):
        assert math.isclose(got.logprob, want.logprob, abs_tol=1e-3)
        assert len(got.top_logprobs) == 2 and got.top_logprobs[0].logprob >= got.top_logprobs[1].logprob
    # the tokens' exact bytes spell the text
    assert b"".join(bytes(t.bytes) for t in lps).decode() == ref.text
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_sampling_n_seed_stop(client: openai.OpenAI, offline: Engine) -> None:
    kw = {
        "model": MODEL,
        "prompt": PROMPTS[2],
        "max_tokens": 8,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 7,
        "n": 2,
        "extra_body": {"top_k": 40, "min_p": 0.01, "ignore_eos": True},
    }
    a, b = client.completions.create(**kw), client.completions.create(**kw)  # type: ignore[call-overload]
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 16 and all(c.finish_reason == "length" for c in a.choices)
    base = offline.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[
        0
    ].text
    stop = base.strip()[:2]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == base[: base.index(stop)]


def test_stream_never_splits_utf8(client: openai.OpenAI, offline: Engine) -> None:
    for prompt in ("Emoji list: 😀 😃 😄 😁", "Chinese: 你好，世界。我"):
        ref = offline.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
        assert len(ref.text.encode()) > len(ref.text)  # the model does write multi-byte characters here
        deltas = [
            c.choices[0].text
            for c in client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        ]
        assert "".join(deltas) == ref.text
        assert not any("\ufffd" in d for d in deltas)


def test_bad_inputs_status_and_body(server: ServerProcess, client: openai.OpenAI) -> None:
    url, h = server.url, server.headers()

    def post(path: str, body: object, headers: dict[str, str] | None = None) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            url + path,
            content=raw,
            timeout=60,
            headers={"Content-Type": "application/json", **(h if headers is None else headers)},
        )

    def expect(resp: httpx.Response, status: int, param: str | None) -> None:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param

    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    expect(post("/v1/completions", b'{"prompt": "x",'), 400, None)
    expect(post("/v1/completions", {"prompt": "x", "max_tokens": "5"}), 400, "max_tokens")
    expect(post(chat, {"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content")
    expect(post("/v1/completions", {"model": "gpt-4o", "prompt": "x"}), 400, "model")
    expect(post("/v1/completions", {"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    expect(post(chat, {"messages": msgs, "max_completion_tokens": -1}), 400, "max_completion_tokens")
    expect(post("/v1/completions", {"prompt": "hi " * 9000, "max_tokens": 4}), 400, "prompt")
    expect(post("/v1/completions", {"prompt": "x", "max_tokens": 9000}), 400, "max_tokens")
    expect(post("/v1/completions", {"prompt": "x", "temperature": -2}), 400, "temperature")
    expect(post(chat, {"messages": msgs, "top_p": 0}), 400, "top_p")
    expect(post(chat, {"messages": msgs, "top_k": 0}), 400, "top_k")
    expect(post("/v1/completions", {"prompt": [10**9]}), 400, "prompt")
    expect(post("/v1/completions", {"prompt": "x"}, headers={}), 401, None)
    expect(post("/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401, None)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert info.value.status_code == 400 and info.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_concurrent_streams_with_disconnects_free_every_page(server: ServerProcess) -> None:
    before = metrics(server)

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        leave_early = i % 3 == 0
        stream = await client.completions.create(
            model=MODEL,
            prompt=f"Request {i}: tell me a story about the number {i}.",
            stream=True,
            temperature=0.7,
            seed=i,
            max_tokens=64 if leave_early else 6,
            extra_body={"ignore_eos": True},
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            if leave_early:
                break
        await stream.close()
        return text, reason

    async def bad(client: openai.AsyncOpenAI) -> int:
        try:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=0)
        except openai.BadRequestError as e:
            return e.status_code
        return 200

    async def burst() -> tuple[list[tuple[str, str | None]], list[int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300
        ) as client:
            # bad requests in the middle of the burst are refused without disturbing the others
            results = asyncio.gather(*(one(client, i) for i in range(50)))
            refused = asyncio.gather(*(bad(client) for _ in range(5)))
            return await results, await refused

    results, refused = asyncio.run(burst())
    assert refused == [400] * 5
    left = [r for i, r in enumerate(results) if i % 3 == 0]
    stayed = [r for i, r in enumerate(results) if i % 3 != 0]
    assert len(left) == 17 and all(reason is None for _, reason in left)
    assert all(reason == "length" and text for text, reason in stayed)
    deadline = time.monotonic() + 60
    while True:
        after = metrics(server)
        if after["semipd:kv_pages_used{}"] == 0 and after["semipd:num_requests_running{}"] == 0:
            break
        assert time.monotonic() < deadline, after
        time.sleep(0.5)
    assert after["semipd:kv_pages_total{}"] == 1024
    assert after["semipd:num_requests_waiting{}"] == 0
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["semipd:num_aborted_requests_total{}"] == 17  # not request_success (vLLM/SGLang dashboards)
    assert 'semipd:request_success_total{"finished_reason": "abort"}' not in after
    assert delta['semipd:request_success_total{"finished_reason": "length"}'] == 33
    assert delta["semipd:generation_tokens_total{}"] >= 33 * 6 + 17
    assert delta["semipd:time_to_first_token_seconds_count{}"] == 50
    assert delta["semipd:e2e_request_latency_seconds_count{}"] == 50
    # and the server still answers
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=server.headers(),
        timeout=60,
        json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_metrics_parse_and_counters_move(server: ServerProcess) -> None:
    before = metrics(server)
    r = httpx.post(
        f"{server.url}/generate",
        headers=server.headers(),
        timeout=60,
        json={
            "text": "Water boils at",
            "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True},
        },
    )
    body = r.json()
    assert r.status_code == 200 and len(body["output_ids"]) == 4
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    after = metrics(server)
    assert after["semipd:generation_tokens_total{}"] - before["semipd:generation_tokens_total{}"] == 4
    assert (
        after["semipd:prompt_tokens_total{}"] - before["semipd:prompt_tokens_total{}"]
        == body["meta_info"]["prompt_tokens"]
    )
    assert (
        after["semipd:time_to_first_token_seconds_count{}"]
        == before["semipd:time_to_first_token_seconds_count{}"] + 1
    )
    for role in ("prefill", "decode"):
        assert f'semipd:sm_split{{"role": "{role}"}}' in after
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_flush_cache_drops_the_prefix_cache(server: ServerProcess, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="A long shared prefix. " * 8, max_tokens=2, temperature=0)
    r = httpx.post(f"{server.url}/flush_cache", headers=server.headers(), timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["success"] is True, body
    assert body["cached_pages_before"] > 0 and body["cached_pages_after"] == 0
    assert metrics(server)["semipd:prefix_cache_pages{}"] == 0
