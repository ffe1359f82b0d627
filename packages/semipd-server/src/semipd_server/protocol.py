"""Request bodies of the OpenAI and native routes as msgspec Structs, decoded strictly, turned into SamplingParams.

Every problem becomes an ApiError(400) naming the offending field (`param`), so a client sees exactly what to
fix. Unknown fields are rejected rather than silently ignored, and OpenAI fields we accept but cannot honour
(penalties, logit_bias, suffix, best_of > n, ...) are rejected unless they hold their no-op value."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.sampling_params import SamplingParams
from semipd_server.errors import ApiError, bad_request
from semipd_server.structured import (
    ResponseFormat,
    Tool,
    ToolChoice,
    ToolPlan,
    generate_spec,
    response_format_spec,
)

T = TypeVar("T")


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, forbid_unknown_fields=True):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names + vLLM-style extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None  # structured output (`structured.py`)
    # PD disaggregation (smg --pd-disaggregation adds these; arrays for batched requests)
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int] | None = None


class CompletionRequest(SamplingFields, forbid_unknown_fields=True):
    prompt: str | list[Any] | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True):
    messages: list[ChatMessage] | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one tool call


class NativeSamplingParams(msgspec.Struct, forbid_unknown_fields=True):
    """`sampling_params` of POST /generate: SamplingParams' own names (max_new_tokens accepted as SGLang's)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    skip_special_tokens: bool = True
    json_schema: str | None = None  # SGLang's structured output: a JSON schema as a string, or a regex
    regex: str | None = None


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: bool = False
    rid: str | None = None
    bootstrap_host: str | list[str] | None = None
    bootstrap_port: int | list[int | None] | None = None
    bootstrap_room: int | list[int] | None = None
    # SGLang extensions smg fills when it re-serialises a /generate body: no effect on what is generated
    model: str | None = None
    return_text_in_logprobs: bool = False
    log_metrics: bool = True
    background: bool = False
    no_logs: bool = False
    return_bytes: bool = False
    return_entropy: bool = False


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def decode_body(body: bytes, kind: type[T]) -> T:
    """Strict JSON -> Struct; malformed JSON and wrong types become 400 with the JSON path as `param`."""
    if not body.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        text = str(e)
        unknown = _UNKNOWN.search(text)
        where = _PATH.search(text)
        path = where.group(1) if where else ""
        if unknown:
            field = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise bad_request(
                f"unknown field `{field}`: semipd does not accept it", param=field, code="unknown_field"
            ) from None
        raise bad_request(
            text if where else f"{text} (the body must be a JSON object)",
            param=path or None,
            code="invalid_type",
        ) from None
    except msgspec.DecodeError as e:
        raise bad_request(f"malformed JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError as e:  # JSON must be UTF-8 (RFC 8259); msgspec raises this, not a DecodeError
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    except RecursionError:
        raise bad_request("JSON is nested too deeply", code="invalid_json") from None


def _reject_unsupported(req: SamplingFields) -> None:
    if req.presence_penalty != 0.0:
        raise bad_request("presence_penalty is not supported (only 0)", "presence_penalty", "unsupported")
    if req.frequency_penalty != 0.0:
        raise bad_request("frequency_penalty is not supported (only 0)", "frequency_penalty", "unsupported")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias", "unsupported")


def _max_tokens(value: int | None, param: str) -> int | None:
    if value is not None and value < 1:
        raise bad_request(f"{param} must be >= 1, got {value}", param)
    return value


def build_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams from the shared fields, validated (InvalidRequestError -> 400 naming the field)."""
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=-1 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        seed=req.seed,
        max_tokens=max_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        n=req.n,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        structured=response_format_spec(req.response_format),
    )
    return checked(params)


def checked(params: SamplingParams, vocab_size: int | None = None) -> SamplingParams:
    try:
        params.validate(vocab_size)
    except InvalidRequestError as e:
        raise bad_request(e.message, e.param) from None
    return params


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """OpenAI's four prompt forms (str, [str], [int], [[int]]) as a list of engine prompts."""
    p = req.prompt
    if p is None:
        raise bad_request("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(p, str):
        return [p]
    if not p:
        raise bad_request("prompt must not be an empty list", "prompt")
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(_is_token(x) for x in p):
        return [list(p)]
    if all(isinstance(x, list) and x and all(_is_token(t) for t in x) for x in p):
        return [list(x) for x in p]
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids (non-negative integers) "
        "or a list of such lists",
        "prompt",
    )


def _is_token(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def completion_params(req: CompletionRequest) -> SamplingParams:
    _reject_unsupported(req)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (only equal to n)", "best_of", "unsupported")
    if req.echo and req.logprobs is not None:
        raise bad_request(
            "echo together with logprobs (prompt logprobs) is not supported", "echo", "unsupported"
        )
    max_tokens = _max_tokens(req.max_tokens, "max_tokens")
    return build_params(req, 16 if max_tokens is None else max_tokens, req.logprobs)


_ROLES = {"system", "developer", "user", "assistant"}


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """Messages as plain dicts for the chat template; text content parts are joined."""
    if req.messages is None:
        raise bad_request("messages is required", "messages", "missing_required_parameter")
    if not req.messages:
        raise bad_request("messages must contain at least one message", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(req.messages):
        if m.role not in _ROLES:
            raise bad_request(
                f"role {m.role!r} is not supported; use one of {sorted(_ROLES)}", f"messages[{i}].role"
            )
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part type {part.type!r} is not supported (only 'text')",
                        f"messages[{i}].content[{j}].type",
                        "unsupported",
                    )
                texts.append(part.text)
            content = "".join(texts)
        elif m.content is None:
            if m.role != "assistant":
                raise bad_request(
                    "content is required", f"messages[{i}].content", "missing_required_parameter"
                )
            content = ""
        else:
            content = m.content
        # templates know system/user/assistant; OpenAI's newer "developer" role is the system prompt
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens wins over the deprecated max_tokens; None means 'up to the context length'."""
    if req.max_completion_tokens is not None:
        return _max_tokens(req.max_completion_tokens, "max_completion_tokens")
    return _max_tokens(req.max_tokens, "max_tokens")


def chat_params(req: ChatCompletionRequest, max_tokens: int, tools: ToolPlan | None = None) -> SamplingParams:
    _reject_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    if logprobs is not None and logprobs > 20:
        raise bad_request(f"top_logprobs must be in [0, 20], got {logprobs}", "top_logprobs")
    params = build_params(req, max_tokens, logprobs)
    if tools is not None and tools.spec is not None:  # tool_choice "required" / a named function
        if params.structured is not None:
            raise bad_request("response_format cannot be combined with tool_choice 'required' or a named "
                              "function (both constrain the output)", "response_format")
        params.structured = tools.spec
    return params


def generate_prompt(req: GenerateRequest) -> str | list[int]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", "text")
    if req.input_ids is not None:
        if not req.input_ids or not all(_is_token(t) for t in req.input_ids):
            raise bad_request("input_ids must be a non-empty list of non-negative token ids", "input_ids")
        return list(req.input_ids)
    return req.text  # type: ignore[return-value]


def generate_params(req: GenerateRequest) -> SamplingParams:
    sp = req.sampling_params or NativeSamplingParams()
    if sp.max_tokens is not None and sp.max_new_tokens is not None and sp.max_tokens != sp.max_new_tokens:
        raise bad_request("give max_tokens or max_new_tokens, not both", "sampling_params.max_new_tokens")
    max_tokens = sp.max_new_tokens if sp.max_new_tokens is not None else sp.max_tokens
    params = SamplingParams(
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        seed=sp.seed,
        max_tokens=16 if max_tokens is None else max_tokens,
        stop=sp.stop,
        stop_token_ids=sp.stop_token_ids,
        ignore_eos=sp.ignore_eos,
        n=sp.n,
        logprobs=sp.logprobs,
        skip_special_tokens=sp.skip_special_tokens,
        structured=generate_spec(sp.json_schema, sp.regex),
    )
    try:
        params.validate()
    except InvalidRequestError as e:
        param = "max_new_tokens" if e.param == "max_tokens" and sp.max_new_tokens is not None else e.param
        raise ApiError(400, e.message, param=f"sampling_params.{param}") from None
    return params
