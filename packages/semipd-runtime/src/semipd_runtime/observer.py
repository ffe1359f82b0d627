"""CoreObserver: what a policy that watches the engine core is told (arrivals, first tokens, finishes, step
timings, split changes) and may ask for after each step (a new SM split). The SLO controller is one
(`slo_control.SloObserver`); the core has no branch of its own for it."""

from __future__ import annotations

from typing import Protocol

from semipd_runtime.messages import EngineStats
from semipd_runtime.prefill_executor import PrefillTiming
from semipd_runtime.request import Request
from semipd_runtime.scheduler import Scheduler


class CoreObserver(Protocol):
    def on_arrival(self, req: Request, now: float) -> None: ...
    def on_first_token(self, req: Request, now: float) -> None: ...
    def on_finish(self, req: Request) -> None: ...
    def on_abort(self, rid: str) -> None: ...
    def on_decode_step(self, batch: int, context_tokens: int, share: float, seconds: float) -> None: ...
    def on_prefill(self, timing: PrefillTiming) -> None: ...

    def on_split(self, split: tuple[float, float], switched: bool) -> None:
        """The split in effect: switched to just now, or kept (a move that changed nothing or failed)."""
        ...

    def after_step(self, scheduler: Scheduler, now: float) -> tuple[float, float] | None:
        """A split to move to, or None."""
        ...

    def fill_stats(self, stats: EngineStats) -> None: ...
