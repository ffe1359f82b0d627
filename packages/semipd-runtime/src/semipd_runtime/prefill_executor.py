"""How a prompt gets prefilled: the one seam that differs between unified serving, semi-PD and (later) a remote
prefill instance. The engine core is the same for all; it is given one `PrefillExecutor`.

- `LocalPrefill` (unified): prompt chunks ride in the core's own steps, mixed with the decode batch
  (`in_step`); the executor itself never holds a request.
- `SharedPoolPrefill` (semi-PD, `shared_pool_prefill.py`): a worker on its own SM share, writing into the
  shared KV pool, as a thread or a process.

An executor outside the step is handed admitted requests (status PREFILLING, slot and pages reserved, all under
one writer name) and reports each batch back: prefilled (first token and logprobs), or failed. Its pages are
written by nobody once the report is out: the core then tells the allocator that writer is done."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

from semipd_runtime.messages import EngineStats, TokenLogprobMsg
from semipd_runtime.request import Request


@dataclass(slots=True)
class PrefillTiming:
    """What one prefill batch cost (the SLO controller's prefill observation)."""

    new_tokens: list[int]  # per request: tokens computed
    cached_tokens: list[int]  # per request: tokens found in the prefix cache
    share: float  # the prefill SM share it ran on (0..1]
    elapsed_s: float


@dataclass(slots=True)
class PrefillReport:
    writer: str  # the batch's writer name: nothing writes its pages any more
    requests: list[Request]  # every request of the batch (some may have finished meanwhile)
    first_tokens: dict[str, tuple[int, TokenLogprobMsg | None]] = field(default_factory=dict)  # by rid
    error: str = ""  # non-empty: the batch failed, none of its requests got a first token
    status: int = 503  # HTTP-like status of the failure
    timing: PrefillTiming | None = None


class PrefillExecutor(Protocol):
    @property
    def in_step(self) -> bool:
        """True: prompt chunks run inside the core's steps (nothing is ever submitted here)."""
        ...

    @property
    def error(self) -> str:
        """Why no prefill can run now ("" = healthy): waiting requests then fail."""
        ...

    @property
    def busy(self) -> bool:
        """Batches in flight or a worker starting/retiring: the core keeps stepping."""
        ...

    @property
    def split(self) -> tuple[float, float]:
        """(prefill %, decode %) of the SMs in effect."""
        ...

    @property
    def in_transition(self) -> bool: ...

    def token_budget(self) -> int:
        """Tokens to compute the next submitted batch may hold; 0 = take nothing now."""
        ...

    def next_writer(self) -> str:
        """The writer name the next submitted batch will write under."""
        ...

    def submit(self, requests: list[Request], pages: list[list[int]]) -> None:
        """Prefill these admitted requests (one batch, under `next_writer()`) into their reserved pages."""
        ...

    def poll(self, timeout_s: float) -> list[PrefillReport]:
        """Reports of batches that finished or failed (waits up to timeout_s for the first one)."""
        ...

    def decode_context(self) -> AbstractContextManager[object]:
        """Entered around the core's steps: the decode role's SM share."""
        ...

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        """Move to a new SM split; False when nothing changes (or the executor has no split)."""
        ...

    def fill_stats(self, stats: EngineStats) -> None: ...

    def close(self) -> None: ...


class LocalPrefill:
    """Unified serving: the scheduler mixes prompt chunks into the core's steps."""

    in_step = True
    error = ""
    busy = False
    split = (100.0, 100.0)
    in_transition = False

    def token_budget(self) -> int:
        return 0

    def next_writer(self) -> str:
        raise RuntimeError("LocalPrefill takes no batches: prompts are prefilled inside the core's steps")

    def submit(self, requests: list[Request], pages: list[list[int]]) -> None:
        raise RuntimeError("LocalPrefill takes no batches: prompts are prefilled inside the core's steps")

    def poll(self, timeout_s: float) -> list[PrefillReport]:
        return []

    def decode_context(self) -> AbstractContextManager[object]:
        return nullcontext()

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        return False

    def fill_stats(self, stats: EngineStats) -> None:
        pass

    def close(self) -> None:
        pass


SplitListener = Callable[[tuple[float, float], bool], None]  # (split in effect, switched to it just now)
