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
    # applied on the device before temperature / top-k / top-p (`penalties.py`)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are out
    logit_bias: dict[int, float] = {}


class Bootstrap(msgspec.Struct, frozen=True):
    """PD disaggregation: where this completion's prefill instance is and its room there (`pd_types.room_key`)."""

    host: str
    port: int  # 0: the decode instance's default bootstrap port
    room: str


class AddRequest(msgspec.Struct, tag=True):
    rid: str
    prompt_ids: list[int]
    sampling: CoreSampling
    arrival_time: float = 0.0
    bootstrap: Bootstrap | None = None
    grammar: str = ""  # structured output: llguidance grammar text, validated by the front end ("" = none)


class AbortRequest(msgspec.Struct, tag=True):
    rid: str
    reason: str = "abort"  # the front end aborts with "stop" when it matched a stop string


class RoomRejected(msgspec.Struct, tag=True):
    """A prefill instance turned a PD request away before it reached the core (queue full, bad input, unhealthy):
    its decode side is told at once instead of waiting out the transfer timeout."""

    rooms: list[str]
    error: str


class StatsRequest(msgspec.Struct, tag=True):
    flush_cache: bool = False  # first evict every cached prefix page no request holds (/flush_cache)


class Shutdown(msgspec.Struct, tag=True):
    pass


class Repartition(msgspec.Struct, tag=True):
    """Move semi-PD to a new SM split between steps (in-flight requests continue); ignored by the unified core."""

    prefill_percent: float
    decode_percent: float


class TokenLogprobMsg(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []


class TokenEvent(msgspec.Struct, array_like=True):
    """New tokens of one request; finish_reason set on its last event. `error` + `status` (an HTTP-like code:
    400 rejected, 503 a worker died, 504 timed out) explain an abort the client did not ask for."""

    rid: str
    token_ids: list[int]
    logprobs: list[TokenLogprobMsg] | None = None
    finish_reason: str | None = None
    error: str | None = None
    status: int = 0


class EngineStats(msgspec.Struct):
    num_running: int = 0
    num_waiting: int = 0
    pages_used: int = 0  # held by requests (own pages, and cached pages some request shares)
    pages_total: int = 0
    prefill_sm: int = 0
    decode_sm: int = 0
    num_steps: int = 0
    healthy: bool = True
    health_error: str = ""
    recovering: bool = False  # unhealthy while a worker is replaced in place (semi-PD prefill restart)
    integrity_error: str = ""  # from the allocator's check when the core went idle ("" = clean)
    prefill_pid: int = 0  # semi-PD with a prefill process
    # semi-PD SM split and its controller (partition_policy "slo"); percents are of the device's SMs
    partition_policy: str = "static"
    prefill_sm_percent: float = 0.0
    decode_sm_percent: float = 0.0
    repartitions: int = 0  # splits that took effect (not counting the startup profiling pass)
    repartition_failures: int = 0
    last_repartition_s: float = 0.0  # request -> new split in effect, of the last re-partition
    slo_decisions: int = 0
    slo_observations: int = 0  # prefill + decode steps fed to the partitioner
    slo_reason: str = ""
    predicted_ttft_s: float = 0.0
    predicted_tpot_s: float = 0.0
    predicted_attainment: float = 0.0  # share of requests the slo policy predicts within both SLOs
    measured_ttft_s: float = 0.0  # mean over the last decision window
    measured_tpot_s: float = 0.0  # mean decode step time over the last decision window
    cached_pages: int = 0  # pages in the radix prefix cache (shared or not)
    evictable_pages: int = 0  # cached pages no request holds: free on demand
    prefix_hit_tokens: int = 0  # prompt tokens served from the prefix cache, since start
    prefix_query_tokens: int = 0  # prompt tokens of all admissions, since start
    # PD disaggregation (prefill/decode instances): KV transfers since start
    pd_transfers: int = 0
    pd_transfer_failures: int = 0
    pd_bytes: int = 0
    pd_latency_counts: list[int] = []  # per bucket of pd_prefill.LATENCY_BUCKETS (+inf last)
    pd_latency_sum: float = 0.0
    pd_bootstrap_queue: int = 0  # rooms waiting for their peer or transfer

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool's pages held by requests (0..1)."""
        return self.pages_used / self.pages_total if self.pages_total else 0.0


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


# --- semi-PD: decode worker (allocator owner) <-> prefill worker -------------------------------------------------
class PrefillItem(msgspec.Struct, array_like=True):
    rid: str
    token_ids: list[int]  # every token to put in the cache (prompt, plus outputs when resuming a preempted request)
    pages: list[int]  # pages reserved for them by the decode worker; the prefill worker writes only these
    sampling: CoreSampling
    step: int  # sampling step of the token to sample (len(output_ids)), so seeds give the same stream as unified
    num_cached: int = 0  # leading tokens already in (shared, cached) pages: computed from here on
    token_bitmask: bytes = b""  # structured output: the first token's grammar mask (int32 words; b"" = none)


class PrefillBatch(msgspec.Struct, tag=True):
    batch_id: int
    items: list[PrefillItem]


class PrefillResult(msgspec.Struct, array_like=True):
    rid: str
    token_id: int
    logprob: TokenLogprobMsg | None = None


class PrefillDone(msgspec.Struct, tag=True):
    batch_id: int
    results: list[PrefillResult]
    num_tokens: int
    elapsed_s: float


class PrefillFailed(msgspec.Struct, tag=True):
    batch_id: int
    message: str


class PrefillReady(msgspec.Struct, tag=True):
    sm_count: int = 0
    pid: int = 0
    mapped_bytes: int = 0  # weights + KV pool the worker maps from the decode worker (not copies)
    all_shared: bool = True  # every weight and the pool are views of shared memory


ToPrefill = PrefillBatch | Shutdown
FromPrefill = PrefillDone | PrefillFailed | PrefillReady

ToCore = AddRequest | AbortRequest | RoomRejected | StatsRequest | Shutdown | Repartition
FromCore = StepOutput | CoreReady | CoreFailure
