"""A request inside the engine core: token ids, how much of it is in the KV cache, and its page slot."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from semipd_runtime.messages import Bootstrap, CoreSampling, TokenLogprobMsg

if TYPE_CHECKING:
    from semipd_runtime.grammar import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"  # with a prefill executor outside the core's step (semi-PD worker, remote prefill)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    sampling: CoreSampling
    arrival_time: float = field(default_factory=time.monotonic)
    state_since: float = field(default_factory=time.monotonic)  # when it entered its current status
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None  # row of the page allocator's req_to_page
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0
    last_step: int = 0  # newest launched step it is in: that step may write its pages until it resolves
    writer: str | None = None  # PREFILLING: the prefill batch that writes its pages (named in the allocator)
    pending_logprobs: list[TokenLogprobMsg] = field(default_factory=list)
    bootstrap: Bootstrap | None = None  # PD disaggregation: its room at a prefill instance
    grammar: RequestGrammar | None = None  # structured output: consumed every accepted output token

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def has_placeholder(self) -> bool:
        """Its newest output token is sampled by a step in flight (a negative id until that step resolves)."""
        return bool(self.output_ids) and self.output_ids[-1] < 0

    @property
    def num_uncomputed(self) -> int:
        return self.seq_len - self.num_computed

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]
