"""Request-body validation -> typed SamplingParams, error bodies, SSE framing (no engine involved)."""

from __future__ import annotations

import json

import pytest

from semipd_runtime.errors import EngineDeadError, InvalidRequestError, QueueFullError
from semipd_runtime.grammar import StructuredOutput
from semipd_server.errors import ApiError, from_engine_error
from semipd_server.native_protocol import GenerateRequest, generate_params, generate_prompt
from semipd_server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_max_tokens,
    chat_messages,
    chat_params,
    completion_params,
    completion_prompts,
    decode_body,
)
from semipd_server.sse import DONE, parse_sse, sse_event


def completion(**body: object) -> CompletionRequest:
    return decode_body(json.dumps({"model": "m", "prompt": "hi", **body}).encode(), CompletionRequest)


def chat(**body: object) -> ChatCompletionRequest:
    return decode_body(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode(), ChatCompletionRequest
    )


def error_of(fn: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.status == 400
    return info.value


def test_completion_fields_map_to_sampling_params() -> None:
    req = completion(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=3,
        n=2,
        stop=["\n", "END"],
        logprobs=2,
        ignore_eos=True,
        stop_token_ids=[5],
    )
    p = completion_params(req)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.n) == (
        7,
        0.5,
        0.9,
        40,
        0.05,
        3,
        2,
    )
    assert p.stop_list == ["\n", "END"] and p.logprobs == 2 and p.ignore_eos and p.stop_token_ids == [5]
    default = completion_params(completion())
    assert (default.max_tokens, default.temperature, default.top_p, default.top_k, default.logprobs) == (
        16,
        1.0,
        1.0,
        -1,
        None,
    )


@pytest.mark.parametrize(
    "body, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # above max_tokens (16 by default)
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"-5": 1.0}}, "logit_bias"),
        ({"logit_bias": {"five": 1.0}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_bad_completion_values_name_their_param(body: dict[str, object], param: str) -> None:
    e = error_of(completion_params, completion(**body))
    assert e.param == param
    assert e.body()["error"]["type"] == "invalid_request_error"
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "raw, param, code",
    [
        (b'{"prompt": "x", "max_tokens": "ten"}', "max_tokens", "invalid_type"),
        (b'{"prompt": "x", "max_tokens": 1.5}', "max_tokens", "invalid_type"),
        (b'{"prompt": "x", "stream": 1}', "stream", "invalid_type"),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature", "invalid_type"),
        (
            b'{"prompt": "x", "stream_options": {"include_usage": "yes"}}',
            "stream_options.include_usage",
            "invalid_type",
        ),
        (b'{"prompt": "x", "bogus": 1}', "bogus", "unknown_field"),
        (b'{"prompt": "x", "stream_options": {"extra": 1}}', "stream_options.extra", "unknown_field"),
        (b'{"prompt": "x",', None, "invalid_json"),
        (b"not json", None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[1, 2]", None, "invalid_type"),
    ],
)
def test_malformed_bodies(raw: bytes, param: str | None, code: str) -> None:
    e = error_of(decode_body, raw, CompletionRequest)
    assert (e.param, e.code) == (param, code), e.message


def test_chat_message_paths_in_errors() -> None:
    e = error_of(decode_body, b'{"messages": [{"role": "user", "content": 5}]}', ChatCompletionRequest)
    assert e.param == "messages[0].content"
    e = error_of(chat_messages, chat(messages=[{"role": "tool", "content": "x"}]).messages)
    assert e.param == "messages[0].role"
    e = error_of(chat_messages, chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).messages)
    assert e.param == "messages[0].content[0].type"
    assert error_of(chat_messages, chat(messages=[]).messages).param == "messages"
    assert error_of(chat_messages, decode_body(b"{}", ChatCompletionRequest).messages).param == "messages"


def test_chat_messages_and_limits() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]
    )
    assert chat_messages(req.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
    ]
    assert chat_max_tokens(chat(max_tokens=5, max_completion_tokens=9)) == 9
    assert chat_max_tokens(chat(max_tokens=5)) == 5
    assert chat_max_tokens(chat()) is None
    assert error_of(chat_max_tokens, chat(max_completion_tokens=0)).param == "max_completion_tokens"
    assert chat_params(chat(logprobs=True, top_logprobs=3), 10).logprobs == 3
    assert chat_params(chat(logprobs=True), 10).logprobs == 0
    assert chat_params(chat(), 10).logprobs is None
    assert error_of(chat_params, chat(top_logprobs=2), 10).param == "top_logprobs"
    assert error_of(chat_params, chat(logprobs=True, top_logprobs=21), 10).param == "top_logprobs"
    assert chat_params(chat(response_format={"type": "json_object"}), 10).structured == StructuredOutput("json_object")
    assert error_of(chat_params, chat(response_format={"type": "yaml"}), 10).param == "response_format"
    assert error_of(chat_params, chat(response_format={"type": "json_schema"}), 10).param == "response_format"


def test_prompt_forms() -> None:
    assert completion_prompts(completion(prompt="a")) == ["a"]
    assert completion_prompts(completion(prompt=["a", "b"])) == ["a", "b"]
    assert completion_prompts(completion(prompt=[1, 2, 3])) == [[1, 2, 3]]
    assert completion_prompts(completion(prompt=[[1], [2, 3]])) == [[1], [2, 3]]
    for bad in ([], ["a", 1], [[1], []], [-1], [True], [1.5], [[1], "a"]):
        assert error_of(completion_prompts, completion(prompt=bad)).param == "prompt", bad
    assert error_of(completion_prompts, decode_body(b"{}", CompletionRequest)).param == "prompt"


def test_penalty_fields_map_to_sampling_params() -> None:
    body = dict(presence_penalty=-1.5, frequency_penalty=2, repetition_penalty=1.3, min_tokens=4,
                logit_bias={"17": -100, "3": 2.5}, include_stop_str_in_output=True, max_tokens=8)
    for p in (completion_params(completion(**body)), chat_params(chat(**body), 8)):
        assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (-1.5, 2, 1.3, 4)
        assert p.logit_bias == {17: -100, 3: 2.5} and p.include_stop_str_in_output
    default = completion_params(completion())
    assert (default.presence_penalty, default.frequency_penalty, default.repetition_penalty) == (0, 0, 1)
    assert (default.min_tokens, default.logit_bias, default.include_stop_str_in_output) == (0, None, False)
    assert error_of(chat_params, chat(min_tokens=9), 8).param == "min_tokens"


def test_native_penalties_take_sglang_names() -> None:
    def native(sp: dict[str, object]) -> GenerateRequest:
        return decode_body(json.dumps({"text": "hi", "sampling_params": sp}).encode(), GenerateRequest)

    p = generate_params(native({"max_new_tokens": 9, "min_new_tokens": 3, "no_stop_trim": True,
                                "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
                                "logit_bias": {"8": -100}}))
    assert (p.min_tokens, p.include_stop_str_in_output, p.logit_bias) == (3, True, {8: -100})
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, 0.25, 1.1)
    assert generate_params(native({"min_tokens": 2, "include_stop_str_in_output": True})).min_tokens == 2
    for sp, param in (({"min_new_tokens": 20}, "min_new_tokens"), ({"min_tokens": 20}, "min_tokens"),
                      ({"min_tokens": 1, "min_new_tokens": 2}, "min_new_tokens"),
                      ({"repetition_penalty": 0.0}, "repetition_penalty"),
                      ({"logit_bias": {"x": 1}}, "logit_bias")):
        assert error_of(generate_params, native(sp)).param == f"sampling_params.{param}", sp


def test_native_generate_body() -> None:
    req = decode_body(
        b'{"text": "hi", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}', GenerateRequest
    )
    assert generate_prompt(req) == "hi"
    p = generate_params(req)
    assert (p.max_tokens, p.temperature) == (4, 0.0)
    both = decode_body(b'{"text": "hi", "input_ids": [1]}', GenerateRequest)
    assert error_of(generate_prompt, both).param == "text"
    zero = decode_body(b'{"input_ids": [1], "sampling_params": {"max_new_tokens": 0}}', GenerateRequest)
    assert error_of(generate_params, zero).param == "sampling_params.max_new_tokens"
    assert (
        error_of(decode_body, b'{"text": "a", "sampling_params": {"topk": 1}}', GenerateRequest).param
        == "sampling_params.topk"
    )


def test_engine_errors_map_to_status() -> None:
    cases = [
        (InvalidRequestError("too long", param="prompt"), 400, "invalid_request_error", "prompt"),
        (QueueFullError("full"), 429, "rate_limit_error", None),
        (EngineDeadError("gone"), 503, "service_unavailable", None),
    ]
    for exc, status, kind, param in cases:
        e = from_engine_error(exc)
        assert (e.status, e.error_type, e.param) == (status, kind, param)
        assert json.loads(e.response().body)["error"]["message"] == exc.message


def test_sse_framing() -> None:
    assert sse_event({"a": 1}) == b'data: {"a":1}\n\n'
    # a newline inside a value is escaped, so it can never end an event early
    evt = sse_event({"text": "line1\n\nline2"})
    assert evt.count(b"\n") == 2 and evt.endswith(b"\n\n")
    body = sse_event({"text": "x\ny"}) + sse_event({"text": "é😀"}) + DONE
    payloads = parse_sse(body)
    assert [json.loads(p) for p in payloads[:-1]] == [{"text": "x\ny"}, {"text": "é😀"}]
    assert payloads[-1] == "[DONE]"
    for bad in (b"data: {}\n", b"event: x\ndata: {}\n\n", b"{}\n\n"):
        with pytest.raises(ValueError):
            parse_sse(bad)
