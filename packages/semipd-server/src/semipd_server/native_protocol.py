"""Request body of SGLang's native POST /generate (`text` or `input_ids`, `sampling_params` under SamplingParams'
names, SGLang's logprob fields), decoded strictly and turned into SamplingParams."""

from __future__ import annotations

import msgspec

from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.sampling_params import SamplingParams
from semipd_server.errors import ApiError, bad_request
from semipd_server.protocol import is_token, note_ignored


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


def generate_params(req: GenerateRequest) -> SamplingParams:
    sp = req.sampling_params or NativeSamplingParams()
    if sp.max_tokens is not None and sp.max_new_tokens is not None and sp.max_tokens != sp.max_new_tokens:
        raise bad_request("give max_tokens or max_new_tokens, not both", "sampling_params.max_new_tokens")
    max_tokens = sp.max_new_tokens if sp.max_new_tokens is not None else sp.max_tokens
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
    )
    try:
        params.validate()
    except InvalidRequestError as e:
        param = "max_new_tokens" if e.param == "max_tokens" and sp.max_new_tokens is not None else e.param
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
