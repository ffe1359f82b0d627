"""Request bodies of the OpenAI and native routes as msgspec Structs, decoded strictly, turned into SamplingParams.

Every problem becomes an ApiError(400) naming the offending field (`param`), so a client sees exactly what to
fix. Unknown fields are rejected rather than silently ignored, and OpenAI fields we accept but cannot honour
(suffix, best_of > n, ...) are rejected unless they hold their no-op value. Fields that cannot change the output
(`user`, `service_tier`, `metadata`, `store`, `spaces_between_special_tokens` with a fast tokenizer,
`separate_reasoning` without a reasoning parser, ...) are accepted and logged at debug level."""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

import msgspec

from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.sampling_params import SamplingParams
from semipd_server.errors import bad_request
from semipd_server.structured import ResponseFormat, Tool, ToolChoice, ToolPlan, response_format_spec

T = TypeVar("T")
log = logging.getLogger(__name__)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage (so far) in every chunk


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
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # keys: token ids as strings (JSON object keys)
    user: str | None = None
    service_tier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # extensions (vLLM / SGLang names)
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    repetition_penalty: float | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
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
    add_special_tokens: bool = True  # vLLM: BOS (and the like) on a text prompt


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True):
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True  # vLLM; also settable through chat_template_kwargs
    chat_template_kwargs: dict[str, Any] | None = None  # variables for the chat template (vLLM / SGLang)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one tool call
    # SGLang: split reasoning from content with its --reasoning-parser; without one the text is left whole
    separate_reasoning: bool = True
    stream_reasoning: bool = True


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


def logit_bias(bias: dict[str, float] | None, param: str) -> dict[int, float] | None:
    """JSON object keys are strings: each must be a token id."""
    if bias is None:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param)
        out[int(key)] = value
    return out


# field -> its no-op value, and why ignoring any other value leaves the output as it is
_IGNORED: dict[str, tuple[Any, str]] = {
    "user": (None, "no per-user state"),
    "service_tier": (None, "one tier here"),
    "metadata": (None, "nothing is stored"),
    "store": (None, "nothing is stored"),
    "spaces_between_special_tokens": (True, "fast tokenizers decode special tokens as they are"),
    "separate_reasoning": (True, "no reasoning parser: the text is left whole"),
    "stream_reasoning": (True, "no reasoning parser: the text is left whole"),
}


def note_ignored(req: msgspec.Struct) -> None:
    """Debug-log the accepted fields that have no effect here (set to anything but their no-op value)."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    for name, (noop, why) in _IGNORED.items():
        value = getattr(req, name, noop)
        if value != noop:
            log.debug("%s=%r accepted and ignored: %s", name, value, why)


def _max_tokens(value: int | None, param: str) -> int | None:
    if value is not None and value < 1:
        raise bad_request(f"{param} must be >= 1, got {value}", param)
    return value


def build_params(req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """SamplingParams from the shared fields, validated (InvalidRequestError -> 400 naming the field)."""
    note_ignored(req)
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
        presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
        frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens,
        logit_bias=logit_bias(req.logit_bias, "logit_bias"),
        include_stop_str_in_output=req.include_stop_str_in_output,
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
    if all(is_token(x) for x in p):
        return [list(p)]
    if all(isinstance(x, list) and x and all(is_token(t) for t in x) for x in p):
        return [list(x) for x in p]
    raise bad_request(
        "prompt must be a string, a list of strings, a list of token ids (non-negative integers) "
        "or a list of such lists",
        "prompt",
    )


def is_token(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def completion_params(req: CompletionRequest) -> SamplingParams:
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


def chat_messages(messages: list[ChatMessage] | None) -> list[dict[str, str]]:
    """Messages as plain dicts for the chat template; text content parts are joined."""
    if messages is None:
        raise bad_request("messages is required", "messages", "missing_required_parameter")
    if not messages:
        raise bad_request("messages must contain at least one message", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
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


_TEMPLATE_OWN = ("messages", "tools", "documents")  # variables the server itself passes to the template


def template_kwargs(add_generation_prompt: bool, chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Variables for the chat template: `chat_template_kwargs` (which may also set add_generation_prompt, as in
    vLLM) over `add_generation_prompt`."""
    extra = dict(chat_template_kwargs or {})
    for key in _TEMPLATE_OWN:
        if key in extra:
            raise bad_request(f"chat_template_kwargs must not set {key!r} (the request's own fields do)",
                              f"chat_template_kwargs.{key}")
    return {"add_generation_prompt": add_generation_prompt, **extra}


def chat_max_tokens(req: ChatCompletionRequest) -> int | None:
    """max_completion_tokens wins over the deprecated max_tokens; None means 'up to the context length'."""
    if req.max_completion_tokens is not None:
        return _max_tokens(req.max_completion_tokens, "max_completion_tokens")
    return _max_tokens(req.max_tokens, "max_tokens")


def chat_params(req: ChatCompletionRequest, max_tokens: int, tools: ToolPlan | None = None) -> SamplingParams:
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
