"""Structured output through the real `semipd-server` (default model on CPU) and the official `openai` client:
20 random small JSON schemas, sent concurrently, each answered with JSON valid against its schema; json_object
output parses; bad schemas and unsupported tool use are 400s naming the field; tool_choice "required" and a
named function come back as tool calls; and the same in semi-PD mode, where the prefill worker (a separate
process) samples the first token under its grammar mask."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from semipd_server.testing import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 96  # the largest random schema needs about 60 tokens; ~100 ms a step on CPU


def random_schema(rng: random.Random) -> dict[str, Any]:
    """A small object schema: 1-4 required fields of string (short), integer (bounded), boolean, enum or a
    short array of integers, so that any valid answer fits MAX_TOKENS."""
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": rng.randint(1, 8)},
        {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 999)},
        {"type": "boolean"},
        {"enum": rng.sample(["red", "green", "blue", "small", "large", "yes", "no"], rng.randint(2, 4))},
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": rng.randint(1, 3)},
    ]
    names = rng.sample(["name", "age", "color", "size", "ok", "count", "tags", "city", "id"], rng.randint(1, 4))
    props = {n: rng.choice(kinds) for n in names}
    return {"type": "object", "properties": props, "required": names, "additionalProperties": False}


def ask(schema: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with a JSON object with the fields {', '.join(schema['properties'])}."}]


def fmt(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess("--num-pages", "1024", "--max-running-requests", "32",
                        log_path=tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)


def test_twenty_random_schemas_validate(server: ServerProcess) -> None:
    rng = random.Random(2024)
    schemas = [random_schema(rng) for _ in range(20)]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i: int, schema: dict[str, Any]) -> tuple[str | None, str]:
        r = await aclient.chat.completions.create(
            model=MODEL, messages=ask(schema), response_format=fmt(schema),  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS, temperature=0.7, seed=i)
        return r.choices[0].message.content, r.choices[0].finish_reason

    async def all_of() -> list[tuple[str | None, str]]:
        try:
            return await asyncio.gather(*(one(i, s) for i, s in enumerate(schemas)))
        finally:
            await aclient.close()

    for schema, (text, reason) in zip(schemas, asyncio.run(all_of())):
        assert reason == "stop", (schema, text)  # the grammar ended it, not the length limit
        jsonschema.validate(json.loads(text or ""), schema)


def test_json_object_on_both_routes(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Output the JSON {"ok": true} and nothing else.'}],
        response_format={"type": "json_object"}, max_tokens=48, temperature=0)
    assert r.choices[0].finish_reason == "stop"  # the object closed: the grammar ended the output
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Output the JSON {"ok": true} and nothing else.'}],
        response_format={"type": "json_object"}, max_tokens=48, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    c = client.completions.create(model=MODEL, prompt="A number:", max_tokens=16, temperature=0,
                                  extra_body={"response_format": fmt(schema)})
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].text), schema)


def test_invalid_schemas_are_400(client: openai.OpenAI) -> None:
    for bad in ({"type": "objectx"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                {"type": "string", "pattern": "(["}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           response_format=fmt(bad), max_tokens=4)  # type: ignore[arg-type]
        assert info.value.body["param"] == "response_format", bad  # type: ignore[index]


def test_tools(client: openai.OpenAI) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw: dict[str, Any] = dict(model=MODEL, messages=msgs, max_tokens=40, temperature=0)
    # SmolLM2's template never reads `tools`: "auto" with tools would hide them from the model
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kw, tools=[weather])
    assert info.value.body["param"] == "tools" and "template" in info.value.body["message"]  # type: ignore[index]
    for ok in ({"tools": []}, {"tools": [], "tool_choice": "auto"}, {"tools": [weather], "tool_choice": "none"}):
        r = client.chat.completions.create(**kw, **ok)
        assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    named = client.chat.completions.create(
        **kw, tools=[weather], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].finish_reason == "tool_calls"
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    required = client.chat.completions.create(**kw, tools=[weather], tool_choice="required")
    calls = required.choices[0].message.tool_calls or []
    assert required.choices[0].finish_reason == "tool_calls" and calls
    assert all(c.function.name == "get_weather" for c in calls)


def test_semipd_server_obeys_the_grammar(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = ServerProcess("--mode", "semi-pd", "--num-pages", "512", "--max-running-requests", "8",
                        log_path=tmp_path_factory.mktemp("semipd") / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=300)
        schema = random_schema(random.Random(7))
        # a first token forced by the grammar ('{' or '{"'), sampled in the prefill process
        r = client.chat.completions.create(model=MODEL, messages=ask(schema), response_format=fmt(schema),
                                           max_tokens=MAX_TOKENS, temperature=1.0, seed=3)  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
        g = httpx.post(f"{srv.url}/generate", timeout=300, json={
            "text": "The answer is", "sampling_params": {"regex": "(yes|no)!", "max_new_tokens": 8}})
        assert g.json()["text"] in ("yes!", "no!")
    finally:
        assert srv.stop() == 0, srv.log()
