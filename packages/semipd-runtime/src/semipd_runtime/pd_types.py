"""Prefill/decode instances (SGLang's PD disaggregation protocol): the messages between a decode instance and
a prefill instance's bootstrap/transfer side, the KV layout both must share, and the environment knobs (SGLang's
names and defaults; a SEMIPD_ spelling wins over the SGLANG_ one)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import msgspec

from semipd_runtime.messages import TokenLogprobMsg

MODES = ("null", "prefill", "decode")


class KvLayout(msgspec.Struct, frozen=True):
    """What must match between the two instances for page-by-page copies to be right."""

    page_size: int
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def mismatch(self, other: KvLayout) -> str:
        """'' when equal, else which fields differ (prefill value vs decode value)."""
        diffs = [f"{f}: prefill {getattr(other, f)} vs decode {getattr(self, f)}"
                 for f in self.__struct_fields__ if getattr(self, f) != getattr(other, f)]
        return "; ".join(diffs)


class RankInfo(msgspec.Struct):
    """A prefill rank's registration at its bootstrap server."""

    rank: int
    session: str  # Mooncake session id host:rpc_port
    endpoint: str  # tcp://host:port where it takes KvRequest / RoomAbort
    layout: KvLayout


class KvRequest(msgspec.Struct, tag=True):
    """Decode -> prefill: write room's KV pages [start_page, start_page + len(dst_pages)) into these pages."""

    room: str
    session: str  # the decode's Mooncake session
    notify: str  # tcp://host:port of the decode's status socket
    base: int  # address of the decode's registered KV buffer
    num_pages: int  # pages per layer in the decode's pool (the buffer's stride)
    start_page: int  # the first page of the prompt to send (earlier ones the decode has cached)
    dst_pages: list[int]


class RoomAbort(msgspec.Struct, tag=True):
    room: str
    notify: str = ""  # the decode's status socket: answered even when this prefill never saw the room's indices


class KvStatus(msgspec.Struct, tag=True):
    """Prefill -> decode: room's KV has landed (with its first token), or it failed (nothing writes any more)."""

    room: str
    ok: bool
    token_id: int = -1
    logprob: TokenLogprobMsg | None = None
    error: str = ""
    nbytes: int = 0
    seconds: float = 0.0


ToPrefillSide = KvRequest | RoomAbort


def room_key(room: int | str, index: int) -> str:
    """One completion of a request: smg gives one room per prompt (or per n on chat), we fan out n."""
    return f"{room}:{index}"


def _env(name: str, default: float) -> float:
    for prefix in ("SEMIPD_", "SGLANG_"):
        raw = os.environ.get(prefix + name)
        if raw:
            try:
                return float(raw)
            except ValueError as e:
                raise ValueError(f"{prefix}{name}={raw!r} is not a number") from e
    return default


@dataclass(frozen=True, slots=True)
class PdEnv:
    bootstrap_timeout_s: float  # prefill: longest wait for the decode's page indices
    waiting_timeout_s: float  # decode: longest wait for the KV once the pages were sent
    heartbeat_interval_s: float
    heartbeat_max_failures: int
    thread_pool_size: int  # prefill: transfer threads
    queue_size: int  # prefill: transfer queues (shards)

    @classmethod
    def load(cls) -> PdEnv:
        pool = min(max(4, int(0.75 * (os.cpu_count() or 8)) // 8), 12)
        return cls(_env("DISAGGREGATION_BOOTSTRAP_TIMEOUT", 300.0), _env("DISAGGREGATION_WAITING_TIMEOUT", 300.0),
                   _env("DISAGGREGATION_HEARTBEAT_INTERVAL", 5.0),
                   int(_env("DISAGGREGATION_HEARTBEAT_MAX_FAILURE", 2)),
                   int(_env("DISAGGREGATION_THREAD_POOL_SIZE", pool)), int(_env("DISAGGREGATION_QUEUE_SIZE", 4)))
