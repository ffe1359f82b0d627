"""response_format, tools and tool_choice in the HTTP layer (fake engine): what is refused with which param, the
plan each tool_choice gives, and tool calls read back from an output. The real grammar runs end to end in
tests/test_server_structured_e2e.py."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from server_fake_engine import FakeEngine
from test_server_app import assert_error, serve

from semipd_server.errors import ApiError
from semipd_server.structured import (
    FunctionDef,
    NamedFunction,
    NamedToolChoice,
    Tool,
    ToolPlan,
    parse_tool_calls,
    plan_tools,
    with_tool_calls,
)

WEATHER = Tool("function", FunctionDef("get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))
TIME = Tool("function", FunctionDef("get_time"))


def param_of(fn: Any, *args: Any) -> str | None:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value.param


def test_tool_plans() -> None:
    assert plan_tools(None, None, False, False) == ToolPlan()
    assert plan_tools([], "auto", False, True) == ToolPlan()  # an empty list is fine anywhere
    assert plan_tools([WEATHER], "none", False, True) == ToolPlan()
    auto = plan_tools([WEATHER], None, True, False)
    assert auto.parse == "auto" and auto.render is not None and auto.render[0]["function"]["name"] == "get_weather"
    assert param_of(plan_tools, [WEATHER], "auto", False, False) == "tools"  # the template never reads tools
    assert param_of(plan_tools, [WEATHER], "auto", True, True) == "stream"
    assert param_of(plan_tools, [], "required", True, False) == "tool_choice"
    assert param_of(plan_tools, [WEATHER], "sometimes", True, False) == "tool_choice"
    assert param_of(plan_tools, [WEATHER], NamedToolChoice("function", NamedFunction("nope")), True,
                    False) == "tool_choice"
    required = plan_tools([WEATHER, TIME], "required", False, False)
    assert required.render is None and required.spec is not None and required.spec.kind == "json_schema"
    schema = json.loads(required.spec.value)
    assert [c["properties"]["name"]["const"] for c in schema["items"]["anyOf"]] == ["get_weather", "get_time"]
    single = plan_tools([WEATHER, TIME], "required", False, False, parallel=False)
    assert single.spec is not None and json.loads(single.spec.value)["maxItems"] == 1
    named = plan_tools([WEATHER, TIME], NamedToolChoice("function", NamedFunction("get_weather")), True, False)
    assert named.parse == "named" and named.spec is not None
    assert json.loads(named.spec.value) == WEATHER.function.parameters


def test_parse_tool_calls() -> None:
    auto = ToolPlan(parse="auto")
    text = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n' \
           '<tool_call>{"name": "get_time", "parameters": {}}</tool_call><tool_call>{bad</tool_call>'
    content, calls = parse_tool_calls(text, auto)
    assert content == "Sure. \n<tool_call>{bad</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len(parse_tool_calls(text, ToolPlan(parse="auto", parallel=False))[1]) == 1
    assert parse_tool_calls("no calls here", auto) == ("no calls here", [])
    content, calls = parse_tool_calls('[{"name": "get_time", "arguments": {}}]', ToolPlan(parse="required"))
    assert content is None and calls[0]["function"]["name"] == "get_time"
    content, calls = parse_tool_calls('{"city": "Oslo"}', ToolPlan(parse="named", function="get_weather"))
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    cut = {"index": 0, "message": {"role": "assistant", "content": '[{"name": "get_ti'}, "finish_reason": "length"}
    assert with_tool_calls(dict(cut), ToolPlan(parse="required")) == cut  # cut short: left as text


def test_auto_tool_call_over_http() -> None:
    # the fake engine answers with the rendered prompt reversed: a reversed tool-call block in the user message
    # comes back as a tool call, and the stop string (the reversed "<user>") ends it with "stop"
    block = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'

    async def check(client: httpx.AsyncClient, engine: FakeEngine) -> None:
        body = {"messages": [{"role": "user", "content": block[::-1]}], "max_tokens": 200, "stop": ">resu<",
                "tools": [json.loads(json.dumps({"type": "function", "function": {
                    "name": "get_weather", "parameters": WEATHER.function.parameters}}))]}
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == ">tnatsissa<"
        (call,) = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        plain = await client.post("/v1/chat/completions", json={**body, "tools": []})
        assert plain.json()["usage"]["prompt_tokens"] < r.json()["usage"]["prompt_tokens"]  # tools rendered

    serve(check, FakeEngine(max_model_len=4096))


def test_refusals_over_http() -> None:
    async def check(client: httpx.AsyncClient, engine: FakeEngine) -> None:
        msgs = [{"role": "user", "content": "hi"}]
        r = await client.post("/v1/chat/completions", json={
            "messages": msgs, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
        assert_error(r, 400, "response_format")
        r = await client.post("/v1/completions", json={"prompt": "hi", "response_format": {"type": "xml"}})
        assert_error(r, 400, "response_format")
        r = await client.post("/generate", json={"text": "hi", "sampling_params": {"json_schema": "{"}})
        assert_error(r, 400, "sampling_params.json_schema")
        r = await client.post("/v1/chat/completions", json={
            "messages": msgs, "response_format": {"type": "json_object"}, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f"}}]})
        assert_error(r, 400, "response_format")
        r = await client.post("/v1/chat/completions", json={
            "messages": msgs, "response_format": {"type": "json_object"}, "max_tokens": 3})
        assert r.status_code == 200, r.text

    serve(check, FakeEngine(max_model_len=4096))
