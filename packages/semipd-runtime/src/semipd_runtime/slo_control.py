"""The SLO policy inside the semi-PD decode worker: feeds `SloPartitioner` the engine's own measurements (prefill
and decode step times, arrivals, queue state), asks it for a split every `repartition_interval_s`, and keeps what
the engine reports about it (stats, metrics, logs). The core applies a changed split through its PrefillRouter."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from semipd_runtime.messages import EngineStats
from semipd_runtime.slo_partitioner import (
    POLICIES,
    Decision,
    SloPartitioner,
    SloPartitionerConfig,
    sm_split_candidates,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SloSettings:
    """Settings of `partition_policy="slo"` (CoreConfig.slo); the profile_* knobs size the startup profiling pass
    (runs when no cached profile matches): `profile_splits` candidate splits, `profile_requests` dummy requests
    per split of about `profile_prompt_tokens` x (1..k)/k tokens, each decoding `profile_decode_tokens` tokens."""

    policy: str = "slo"
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 50.0
    repartition_interval_s: float = 2.0
    min_dwell_s: float = 6.0
    hysteresis: float = 0.1
    sm_step: int = 8
    profile_splits: int = 3
    profile_requests: int = 6
    # None: min(4096, max_prefill_tokens, half the context). Prompts of the size served: fitted on 256-token
    # prompts only, the attention term of 3k-token prompts was an extrapolation and the split never moved (H200)
    profile_prompt_tokens: int | None = None
    profile_decode_tokens: int = 16
    profile_cache_dir: str | None = None  # None: <semipd cache>/profiles; "": never read or write a cache
    profile_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"partition_policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("profile_splits", "profile_requests", "profile_prompt_tokens", "profile_decode_tokens"):
            v = getattr(self, name)
            if v is None and name == "profile_prompt_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "profile_splits" else 1):
                raise ValueError(f"slo {name} must be an int >= {0 if name == 'profile_splits' else 1}, got {v!r}")
        if not (isinstance(self.profile_timeout_s, (int, float)) and self.profile_timeout_s > 0):
            raise ValueError(f"slo profile_timeout_s must be > 0, got {self.profile_timeout_s!r}")
        self.partitioner_config(100, None)  # validates the SLO numbers with the argument's name in the message

    def profile_prompt_length(self, max_model_len: int, max_prefill_tokens: int) -> int:
        """Longest prompt of the profiling pass (leaving room for its decode tokens)."""
        want = self.profile_prompt_tokens
        if want is None:
            want = min(4096, max_prefill_tokens, max_model_len // 2)
        return max(1, min(want, max_model_len - self.profile_decode_tokens - 1))

    def partitioner_config(self, total_sms: int, initial: tuple[float, float] | None,
                           fixed_decode_percent: float | None = None,
                           prefill_token_budget: int = 8192,
                           max_decode_batch: int | None = None) -> SloPartitionerConfig:
        candidates = sm_split_candidates(total_sms, self.sm_step)
        if fixed_decode_percent is not None:  # MPS: the decode process keeps the cap it started with
            candidates = tuple((p, float(fixed_decode_percent)) for p, _ in candidates)
        if initial is not None:
            initial = nearest_split(candidates, initial)
        return SloPartitionerConfig(
            slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms, policy=self.policy,
            repartition_interval_s=self.repartition_interval_s, min_dwell_s=self.min_dwell_s,
            hysteresis=self.hysteresis, candidates=candidates, total_sms=total_sms, sm_step=self.sm_step,
            initial_split=initial, prefill_token_budget=prefill_token_budget, max_decode_batch=max_decode_batch)


def nearest_split(candidates: Sequence[tuple[float, float]], split: tuple[float, float]) -> tuple[float, float]:
    return min(candidates, key=lambda c: (abs(c[0] - split[0]), abs(c[1] - split[1])))


class SloController:
    """Observations in, decisions out; `profiling` mutes arrivals/queue/decisions while the startup pass runs."""

    def __init__(self, settings: SloSettings, config: SloPartitionerConfig) -> None:
        self.settings = settings
        self.partitioner = SloPartitioner(config)
        self.profiling = False
        self.last: Decision | None = None
        self.decisions = 0
        self.observations = 0
        self._next_eval = -math.inf
        self._arrived: dict[str, float] = {}
        # measured since the previous decision: sums and counts of TTFT, prefill and decode step seconds
        self._window = {"ttft": [0.0, 0], "prefill": [0.0, 0], "decode": [0.0, 0]}
        self.measured = {"ttft": 0.0, "prefill": 0.0, "decode": 0.0}

    @property
    def split(self) -> tuple[float, float]:
        return self.partitioner.current_split

    # --- observations ---------------------------------------------------------------------------------------
    def _measure(self, key: str, seconds: float) -> None:
        w = self._window[key]
        w[0] += seconds
        w[1] += 1

    def observe_arrival(self, rid: str, prompt_tokens: int, now: float) -> None:
        if self.profiling or prompt_tokens < 1:
            return
        self.partitioner.observe_arrival(now, prompt_tokens)
        self._arrived[rid] = now

    def observe_first_token(self, rid: str, now: float) -> None:
        t = self._arrived.pop(rid, None)
        if t is not None:
            self._measure("ttft", now - t)
            self.partitioner.observe_ttft(max(0.0, now - t))

    def observe_finish(self, output_tokens: int) -> None:
        if not self.profiling:
            self.partitioner.observe_finish(output_tokens)

    def forget(self, rid: str) -> None:
        self._arrived.pop(rid, None)

    def observe_prefill(self, new_tokens: list[int], cached_tokens: list[int], share: float, seconds: float) -> None:
        if seconds <= 0 or not new_tokens or sum(new_tokens) == 0 or not 0 < share <= 1:
            return
        self.partitioner.observe_prefill(new_tokens, cached_tokens, share, seconds)
        self.observations += 1
        self._measure("prefill", seconds)

    def observe_decode(self, batch: int, context_tokens: int, share: float, seconds: float) -> None:
        if seconds <= 0 or batch < 1 or not 0 < share <= 1:
            return
        self.partitioner.observe_decode(batch, context_tokens, share, seconds)
        self.observations += 1
        self._measure("decode", seconds)

    def update_queue(self, waiting_prompt_tokens: list[int], running_batch: int, running_context: int) -> None:
        if not self.profiling:
            self.partitioner.update_queue(waiting_prompt_tokens, running_batch, running_context)

    # --- decisions ------------------------------------------------------------------------------------------
    def decide(self, now: float) -> Decision | None:
        """A decision when one is due (every repartition_interval_s), else None."""
        if self.profiling or now < self._next_eval:
            return None
        self._next_eval = now + self.settings.repartition_interval_s
        d = self.partitioner.decide(now)
        self.last, self.decisions = d, self.decisions + 1
        for key, (total, n) in self._window.items():
            if n:
                self.measured[key] = total / n
        self._window = {k: [0.0, 0] for k in self._window}
        info = d.as_dict()
        info.update(measured_ttft_ms=1000 * self.measured["ttft"], measured_prefill_step_ms=1000 *
                    self.measured["prefill"], measured_decode_step_ms=1000 * self.measured["decode"])
        log.info("slo decision: %s", {k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()})
        return d

    def applied(self, split: tuple[float, float], now: float) -> None:
        """The engine now runs `split` (a forced re-partition, or it could not apply the chosen one)."""
        try:
            self.partitioner.force_split(*split, now)
        except ValueError:
            log.warning("split %s is not an SLO candidate; the partitioner keeps %s", split, self.split)

    def fill_stats(self, s: EngineStats) -> None:
        s.partition_policy = self.settings.policy
        s.slo_decisions = self.decisions
        s.slo_observations = self.observations
        s.measured_ttft_s = float(self.measured["ttft"])
        s.measured_tpot_s = float(self.measured["decode"])  # one decode step = one token of every running request
        s.ttft_correction = float(self.partitioner.ttft_correction)
        d = self.last
        if d is not None:
            s.slo_reason = d.reason
            if d.predicted is not None:
                s.predicted_ttft_s = float(d.predicted.ttft_ms) / 1000
                s.predicted_tpot_s = float(d.predicted.tpot_ms) / 1000
