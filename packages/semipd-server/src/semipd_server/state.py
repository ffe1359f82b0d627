"""What every route shares: the engine, served model name, metrics, API key and the drain state."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from semipd_runtime import EngineStats

from semipd_server.engine_protocol import ServedEngine
from semipd_server.errors import ApiError
from semipd_server.metrics import ServerMetrics
from semipd_server.openai_format import TokenStrings

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: ServedEngine  # semipd_runtime.Engine, or the unit tests' fake
    model_name: str
    api_key: str | None = None
    page_size: int | None = None  # KV page size, to cap default lengths at what the pool can hold
    metrics: ServerMetrics = field(init=False)
    strings: TokenStrings = field(init=False)
    draining: bool = False
    created: float = field(default_factory=time.time)
    in_flight: int = 0
    _idle: asyncio.Event | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.model_name)
        self.strings = TokenStrings(self.engine.tokenizer)

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

    def check_model(self, requested: str | None) -> None:
        """OpenAI clients must name a model; only the one served is accepted."""
        if requested is not None and requested != self.model_name:
            raise ApiError(
                400,
                f"model {requested!r} is not served here; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    # --- in-flight accounting for the graceful drain ----------------------------------------------------------
    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.labels(self.model_name).set(self.in_flight)
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.labels(self.model_name).set(self.in_flight)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def start_draining(self) -> None:
        self.draining = True
        self.metrics.draining.labels(self.model_name).set(1)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no generation request is in flight; False if `timeout_s` passed first."""
        if self.in_flight == 0:
            return True
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
