"""Typed messages between the engine front end and the engine core / workers (msgspec Structs over ZMQ)."""

from __future__ import annotations

import msgspec


class CoreSampling(msgspec.Struct, frozen=True):
    """What the core needs of SamplingParams (stop strings stay in the front end, which detokenizes)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int = 0
    max_tokens: int = 16
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None


class AddRequest(msgspec.Struct, tag=True):
    rid: str
    prompt_ids: list[int]
    sampling: CoreSampling
    arrival_time: float = 0.0


class AbortRequest(msgspec.Struct, tag=True):
    rid: str
    reason: str = "abort"  # the front end aborts with "stop" when it matched a stop string


class StatsRequest(msgspec.Struct, tag=True):
    pass


class Shutdown(msgspec.Struct, tag=True):
    pass


class TokenLogprobMsg(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class TokenEvent(msgspec.Struct, array_like=True):
    """New tokens of one request; finish_reason set on its last event."""

    rid: str
    token_ids: list[int]
    logprobs: list[TokenLogprobMsg] | None = None
    finish_reason: str | None = None
    error: str | None = None


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    pages_used: int = 0
    pages_total: int = 0
    prefill_sm: int = 0
    decode_sm: int = 0
    num_steps: int = 0


class StepOutput(msgspec.Struct, tag=True):
    events: list[TokenEvent]
    stats: EngineStats


class CoreReady(msgspec.Struct, tag=True):
    """First message of a core process once the model and KV pool are in place."""

    stats: EngineStats
    page_size: int
    max_model_len: int


class CoreFailure(msgspec.Struct, tag=True):
    message: str


ToCore = AddRequest | AbortRequest | StatsRequest | Shutdown
FromCore = StepOutput | CoreReady | CoreFailure
