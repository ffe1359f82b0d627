"""A launched step that is not resolved yet, and the rules that end a request at a token (shared by the core's
normal and early resolves)."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import torch

from semipd_runtime.request import Request
from semipd_runtime.sampler import SampledTokens


@dataclass(slots=True)
class StepInFlight:
    """A launched step: its sampled tokens stay on the device (the next step reads its placeholders there)
    until `EngineCore.resolve` reads their host copy."""

    step: int  # the scheduler's number of it
    requests: list[Request]  # the sampled ones, by row
    index: list[int]  # where each row's placeholder sits in its request's output_ids
    sampled: SampledTokens | None
    done: torch.cuda.Event | None  # recorded after all its work (CUDA)
    launched_at: float
    num_requests: int
    num_context: int  # tokens in the cache before the step (its requests')
    decode_share: float = 1.0  # the decode SM share it was launched with (0..1]
    elapsed_s: float = 0.0  # set by resolve: from max(launch, the step before done) to done
    resolved: bool = False  # resolved already (early: the next step's grammar masks needed its tokens)


def record_event(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def finish_reason(req: Request, tok: int, num_out: int, eos: Container[int], max_model_len: int) -> str | None:
    """Why req ends at its num_out-th output token tok (None: it goes on)."""
    s = req.sampling
    if (not s.ignore_eos and tok in eos) or tok in s.stop_token_ids:
        return "stop"
    if req.grammar is not None and req.grammar.terminated:  # the grammar allows nothing more
        return "stop"
    return "length" if reaches_length(req, num_out, max_model_len) else None


def reaches_length(req: Request, num_out: int, max_model_len: int) -> bool:
    """num_out output tokens are req's last: max_tokens or the context is reached."""
    return num_out >= req.sampling.max_tokens or len(req.prompt_ids) + num_out >= max_model_len
