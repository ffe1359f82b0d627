"""Request body of SGLang's native POST /generate (`text` or `input_ids`, `sampling_params` under SamplingParams'
names with SGLang's json_schema / regex, SGLang's logprob fields), decoded strictly and turned into
SamplingParams."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.sampling_params import SamplingParams
from semipd_server.errors import ApiError, bad_request
from semipd_server.protocol import is_token, logit_bias, note_ignored
from semipd_server.structured import generate_spec

T = TypeVar("T")


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
    spaces_between_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int | None = None
    min_new_tokens: int | None = None  # SGLang's name of min_tokens
    logit_bias: dict[str, float] | None = None
    include_stop_str_in_output: bool | None = None
    no_stop_trim: bool | None = None  # SGLang's name of include_stop_str_in_output
    json_schema: str | None = None  # SGLang's structured output: a JSON schema as a string, or a regex
    regex: str | None = None


class GenerateRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | None = None
    input_ids: list[int] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: bool = False
    rid: str | None = None
    # SGLang's logprob fields (sampling_params.logprobs is the same thing under SamplingParams' name)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # prompt logprobs are not computed: only -1
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


def generate_prompt(req: GenerateRequest) -> str | list[int]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text or input_ids", "text")
    if req.input_ids is not None:
        if not req.input_ids or not all(is_token(t) for t in req.input_ids):
            raise bad_request("input_ids must be a non-empty list of non-negative token ids", "input_ids")
        return list(req.input_ids)
    return req.text  # type: ignore[return-value]


def _one_of(ours: T | None, sglang: T | None, names: tuple[str, str]) -> T | None:
    """A native field given under our name or SGLang's (not both, unless equal)."""
    if ours is not None and sglang is not None and ours != sglang:
        raise bad_request(f"give {names[0]} or {names[1]}, not both", f"sampling_params.{names[1]}")
    return sglang if sglang is not None else ours


def generate_params(req: GenerateRequest) -> SamplingParams:
    sp = req.sampling_params or NativeSamplingParams()
    max_tokens = _one_of(sp.max_tokens, sp.max_new_tokens, ("max_tokens", "max_new_tokens"))
    min_tokens = _one_of(sp.min_tokens, sp.min_new_tokens, ("min_tokens", "min_new_tokens"))
    keep_stop = _one_of(sp.include_stop_str_in_output, sp.no_stop_trim, ("include_stop_str_in_output",
                                                                          "no_stop_trim"))
    note_ignored(sp)
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
        logprobs=_generate_logprobs(req, sp),
        skip_special_tokens=sp.skip_special_tokens,
        presence_penalty=sp.presence_penalty,
        frequency_penalty=sp.frequency_penalty,
        repetition_penalty=sp.repetition_penalty,
        min_tokens=min_tokens or 0,
        logit_bias=logit_bias(sp.logit_bias, "sampling_params.logit_bias"),
        include_stop_str_in_output=bool(keep_stop),
        structured=generate_spec(sp.json_schema, sp.regex),
    )
    try:
        params.validate()
    except InvalidRequestError as e:
        sglang = {"max_tokens": sp.max_new_tokens, "min_tokens": sp.min_new_tokens}  # name the field as sent
        param = e.param or ""
        param = param if sglang.get(param) is None else param.replace("_tokens", "_new_tokens")
        raise ApiError(400, e.message, param=f"sampling_params.{param}") from None
    return params


def _generate_logprobs(req: GenerateRequest, sp: NativeSamplingParams) -> int | None:
    """Top logprobs per token from SGLang's return_logprob + top_logprobs_num or from sampling_params.logprobs."""
    if req.logprob_start_len != -1:
        raise bad_request("logprob_start_len: prompt logprobs are not supported (only -1)", "logprob_start_len",
                          "unsupported")
    if not req.return_logprob:
        if req.top_logprobs_num:
            raise bad_request("top_logprobs_num needs return_logprob", "top_logprobs_num")
        return sp.logprobs
    if sp.logprobs is not None and sp.logprobs != req.top_logprobs_num:
        raise bad_request("give return_logprob + top_logprobs_num or sampling_params.logprobs, not both",
                          "top_logprobs_num")
    return req.top_logprobs_num
