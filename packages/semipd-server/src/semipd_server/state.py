"""What every route shares: the engine, served model name, metrics, API key and the drain state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from semipd_runtime import EngineStats
from semipd_server.engine_protocol import ServedEngine
from semipd_server.errors import ApiError
from semipd_server.metrics import ServerMetrics
from semipd_server.openai_format import TokenStrings
from semipd_server.prompts import PromptPrep

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: ServedEngine  # semipd_runtime.Engine, or the unit tests' fake
    model_name: str
    api_key: str | None = None
    page_size: int | None = None  # KV page size, to cap default lengths at what the pool can hold
    max_request_bytes: int = 8 << 20
    metrics_auth: bool = False  # /metrics behind the API key too
    on_core_death: Literal["exit", "restart"] = "exit"
    aliases: tuple[str, ...] = ()  # further names clients may send as `model` (--served-model-name a b ...)
    metrics: ServerMetrics = field(init=False)
    strings: TokenStrings = field(init=False)
    prep: PromptPrep = field(init=False)
    draining: bool = False
    drain_reason: str = ""
    created: float = field(default_factory=time.time)
    in_flight: int = 0
    restarting: str | None = None  # why, while a dead engine core is being replaced (--restart-core)
    cut_off_error: ApiError | None = None  # the answer of requests cut off (drain timeout, core restart)
    _idle: asyncio.Event | None = field(default=None, init=False)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False)
    _cut_off: set[asyncio.Task[Any]] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if not self.api_key:  # "" (e.g. SEMIPD_API_KEY="") means auth off, not "an empty bearer token"
            self.api_key = None
        self.metrics = ServerMetrics(self.model_name)
        self.strings = TokenStrings(self.engine.tokenizer)
        self.prep = PromptPrep(self.engine.tokenizer, self.max_model_len)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def default_max_tokens(self, n_prompt: int) -> int:
        """Output budget when a chat request sets none (OpenAI: the rest of the context), capped by the KV pool
        so that the default never turns into a 'needs more pages than the pool has' rejection."""
        room = self.max_model_len - n_prompt
        pages_total = self.engine.stats().pages_total
        if self.page_size and pages_total:
            room = min(room, pages_total * self.page_size - n_prompt)
        return max(1, room)

    @property
    def served_names(self) -> list[str]:
        return [self.model_name, *(a for a in self.aliases if a != self.model_name)]

    def check_model(self, requested: str | None) -> None:
        """OpenAI clients must name a model; only the names served are accepted."""
        if requested is not None and requested not in self.served_names:
            names = ", ".join(repr(n) for n in self.served_names)
            raise ApiError(
                400,
                f"model {requested!r} is not served here; this server serves {names}",
                param="model",
                code="model_not_found",
            )

    def check_capacity(self, prompts: int, n: int) -> None:
        """400, not 429, for a request that no amount of waiting would let in: the engine admits at most
        running + queued completions at once, and this one alone needs prompts x n of them."""
        running, queued = self.engine.max_running_requests, self.engine.max_queued_requests
        if queued is None or prompts * n <= running + queued:  # no queue limit: anything fits in time
            return
        what = f"n={n}" if prompts == 1 else f"{prompts} prompts x n={n}"
        raise ApiError(
            400,
            f"this request needs {prompts * n} sequences ({what}) but the server admits at most {running + queued} "
            f"at once (--max-running-requests {running} + --max-queued-requests {queued})",
            param="n" if prompts == 1 else "prompt",
            code="exceeds_capacity",
        )

    # --- in-flight accounting for the graceful drain ----------------------------------------------------------
    def enter(self, task: asyncio.Task[Any] | None = None) -> None:
        if task is not None:
            self._tasks.add(task)
        self.in_flight += 1
        self.metrics.in_flight.labels(self.model_name).set(self.in_flight)
        if self._idle is not None:
            self._idle.clear()

    def leave(self, task: asyncio.Task[Any] | None = None) -> None:
        self._tasks.discard(task)  # type: ignore[arg-type]
        self._cut_off.discard(task)  # type: ignore[arg-type]
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.model_name).set(self.in_flight)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def start_draining(self, reason: str = "signal") -> None:
        self.draining = True
        self.drain_reason = reason
        self.metrics.draining.labels(self.model_name).set(1)

    def cut_off_in_flight(self, error: ApiError) -> int:
        """Cancel every generation request still running (drain timeout, core restart); the gate answers each
        one with `error` (or, on a stream, an error event and [DONE]) and the cancellation aborts its engine
        work. Returns how many."""
        self.cut_off_error = error
        for task in self._tasks - self._cut_off:
            self._cut_off.add(task)
            task.cancel(error.code)
        return len(self._cut_off)

    def was_cut_off(self, task: asyncio.Task[Any] | None) -> bool:
        return task in self._cut_off

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no generation request is in flight; False if `timeout_s` passed first."""
        if self.in_flight == 0:
            return True
        if self._idle is None:  # one event for every waiter (the drain and a second signal's may overlap)
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def engine_stats(self) -> EngineStats:
        """Fresh numbers from the engine core when it can give them (one round trip), else its last report."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self.engine.refresh_stats, 2.0)
        except Exception as e:  # noqa: BLE001 - a dead core still has last-known stats to show
            log.debug("engine stats refresh failed: %r", e)
        return self.engine.stats()


def drain_timeout_error(timeout_s: float) -> ApiError:
    return ApiError(
        503,
        f"the server is shutting down and its drain timeout ({timeout_s:g}s) expired before this request "
        "finished; it was aborted",
        code="drain_timeout",
    )

