"""The SLO policy inside the semi-PD decode worker: feeds `SloPartitioner` the engine's own measurements (prefill
and decode step times, arrivals, queue state), asks it for a split every `repartition_interval_s`, and keeps what
the engine reports about it (stats, metrics, logs). `SloObserver` is the controller as the core's observer hook:
the core applies the split it returns through its prefill executor."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from semipd_runtime.knobs import knob, validate_knobs
from semipd_runtime.messages import EngineStats
from semipd_runtime.prefill_executor import PrefillTiming
from semipd_runtime.request import Request
from semipd_runtime.scheduler import Scheduler
from semipd_runtime.slo_config import nearest_split
from semipd_runtime.slo_partitioner import (
    POLICIES,
    Decision,
    SloPartitioner,
    SloPartitionerConfig,
    sm_split_candidates,
)

log = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class SloSettings:
    """The SLO section of the engine config (`partition_policy="slo"`, semi-PD only); the profile_* knobs size the
    startup profiling pass (runs when no cached profile matches): `profile_splits` candidate splits,
    `profile_requests` dummy requests per split of about `profile_prompt_tokens` x (1..k)/k tokens, each decoding
    `profile_decode_tokens` tokens."""

    partition_policy: str = knob("static", "static: keep the SM split; slo: move it at run time to keep TTFT/TPOT "
                                 "within their SLOs (semi-pd)", flags=("--partition-policy",), choices=POLICIES,
                                 group="pd")
    slo_ttft_ms: float = knob(1000.0, "TTFT target of the slo policy", flags=("--slo-ttft-ms",), minimum=0,
                              exclusive=True, group="pd")
    slo_tpot_ms: float = knob(50.0, "TPOT target of the slo policy", flags=("--slo-tpot-ms",), minimum=0,
                              exclusive=True, group="pd")
    repartition_interval_s: float = knob(2.0, "how often the slo policy re-decides the split (seconds)",
                                         flags=("--repartition-interval-s",), minimum=0, exclusive=True, group="pd")
    min_dwell_s: float = knob(6.0, "least time between two moves of the split", minimum=0)
    hysteresis: float = knob(0.25, "a move for TTFT alone must cut the mean TTFT by this fraction", minimum=0)
    sm_step: int = knob(8, "granularity of candidate splits (SMs)", minimum=1)
    profile_splits: int = knob(3, "splits the startup profiling pass runs (0: none)", minimum=0)
    profile_requests: int = knob(6, "dummy requests per profiled split", minimum=1)
    # None: min(4096, max_prefill_tokens, half the context). Prompts of the size served: fitted on 256-token
    # prompts only, the attention term of 3k-token prompts was an extrapolation and the split never moved (H200)
    profile_prompt_tokens: int | None = knob(None, "longest profiling prompt", minimum=1)
    profile_decode_tokens: int = knob(16, "tokens each profiling request decodes", minimum=1)
    profile_cache_dir: str | None = knob(None, "None: <semipd cache>/profiles; '': never read or write a cache")
    profile_timeout_s: float = knob(600.0, "longest profiling pass", minimum=0, exclusive=True)

    def __post_init__(self) -> None:
        for name in ("profile_splits", "profile_requests", "profile_prompt_tokens", "profile_decode_tokens",
                     "sm_step"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"slo {name} must be an int, got {v!r}")
        validate_knobs(self)
        self.partitioner_config(100, None)  # validates the SLO numbers with the argument's name in the message

    def profile_prompt_length(self, max_model_len: int, max_prefill_tokens: int) -> int:
        """Longest prompt of the profiling pass (leaving room for its decode tokens)."""
        want = self.profile_prompt_tokens
        if want is None:
            want = min(4096, max_prefill_tokens, max_model_len // 2)
        return max(1, min(want, max_model_len - self.profile_decode_tokens - 1))

    def partitioner_config(self, total_sms: int, initial: tuple[float, float] | None,
                           fixed_decode_percent: float | None = None,
                           prefill_token_budget: int = 8192, max_decode_batch: int | None = None,
                           cheap_moves: bool = True) -> SloPartitionerConfig:
        candidates = sm_split_candidates(total_sms, self.sm_step)
        if fixed_decode_percent is not None:  # MPS: the decode process keeps the cap it started with
            candidates = tuple((p, float(fixed_decode_percent)) for p, _ in candidates)
        if initial is not None:
            initial = nearest_split(candidates, initial)
        return SloPartitionerConfig(
            slo_ttft_ms=self.slo_ttft_ms, slo_tpot_ms=self.slo_tpot_ms, policy=self.partition_policy,
            repartition_interval_s=self.repartition_interval_s, min_dwell_s=self.min_dwell_s,
            hysteresis=self.hysteresis, candidates=candidates, total_sms=total_sms, sm_step=self.sm_step,
            initial_split=initial, prefill_token_budget=prefill_token_budget, max_decode_batch=max_decode_batch,
            cheap_moves=cheap_moves)


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
        self._window_start: float | None = None  # when the previous decision was made
        # means over the last window, plus the share of it the prefill worker was busy and first tokens per
        # second: against the predicted prefill utilization and rate, they show time lost between prefill steps
        self.measured = {"ttft": 0.0, "prefill": 0.0, "decode": 0.0, "prefill_busy": 0.0, "first_tokens_per_s": 0.0}

    @property
    def split(self) -> tuple[float, float]:
        return self.partitioner.current_split

    # --- observations ---------------------------------------------------------------------------------------
    def _measure(self, key: str, seconds: float) -> None:
        w = self._window[key]
        w[0] += seconds
        w[1] += 1

    def observe_arrival(self, rid: str, prompt_tokens: int, now: float, max_output_tokens: int = 0) -> None:
        if self.profiling or prompt_tokens < 1:
            return
        self.partitioner.observe_arrival(now, prompt_tokens, max(0, max_output_tokens))
        self._arrived[rid] = now

    def observe_first_token(self, rid: str, now: float) -> None:
        t = self._arrived.pop(rid, None)
        if t is not None:
            self._measure("ttft", now - t)

    def observe_finish(self, output_tokens: int, max_output_tokens: int = 0) -> None:
        if not self.profiling:
            self.partitioner.observe_finish(output_tokens, max_output_tokens)

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

    def update_queue(self, waiting_prompt_tokens: list[int], running_batch: int, running_context: int,
                     running_remaining: Sequence[int] = ()) -> None:
        if not self.profiling:
            self.partitioner.update_queue(waiting_prompt_tokens, running_batch, running_context, running_remaining)

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
        if self._window_start is not None and now > self._window_start:
            span = now - self._window_start
            self.measured["prefill_busy"] = self._window["prefill"][0] / span
            self.measured["first_tokens_per_s"] = self._window["ttft"][1] / span
        self._window, self._window_start = {k: [0.0, 0] for k in self._window}, now
        info = d.as_dict()
        info.update(measured_ttft_ms=1000 * self.measured["ttft"], measured_prefill_step_ms=1000 *
                    self.measured["prefill"], measured_decode_step_ms=1000 * self.measured["decode"],
                    measured_prefill_busy=self.measured["prefill_busy"],
                    measured_first_tokens_per_s=self.measured["first_tokens_per_s"])
        log.info("slo decision: %s", {k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()})
        return d

    def applied(self, split: tuple[float, float], now: float) -> None:
        """The engine now runs `split` (a forced re-partition, or it could not apply the chosen one)."""
        try:
            self.partitioner.force_split(*split, now)
        except ValueError:
            log.warning("split %s is not an SLO candidate; the partitioner keeps %s", split, self.split)

    def fill_stats(self, s: EngineStats) -> None:
        s.partition_policy = self.settings.partition_policy
        s.slo_decisions = self.decisions
        s.slo_observations = self.observations
        s.measured_ttft_s = float(self.measured["ttft"])
        s.measured_tpot_s = float(self.measured["decode"])  # one decode step = one token of every running request
        d = self.last
        if d is not None:
            s.slo_reason = d.reason
            if d.predicted is not None:
                s.predicted_attainment = float(d.predicted.attainment)
                s.predicted_ttft_s = float(d.predicted.ttft_ms) / 1000
                s.predicted_tpot_s = float(d.predicted.tpot_ms) / 1000


class SloObserver:
    """The SloController as a CoreObserver (`observer.py`)."""

    def __init__(self, controller: SloController) -> None:
        self.controller = controller

    def on_arrival(self, req: Request, now: float) -> None:
        self.controller.observe_arrival(req.rid, len(req.prompt_ids), now, req.sampling.max_tokens)

    def on_first_token(self, req: Request, now: float) -> None:
        self.controller.observe_first_token(req.rid, now)

    def on_finish(self, req: Request) -> None:  # how long a decode slot stays taken
        self.controller.observe_finish(len(req.output_ids), req.sampling.max_tokens)

    def on_abort(self, rid: str) -> None:
        self.controller.forget(rid)

    def on_decode_step(self, batch: int, context_tokens: int, share: float, seconds: float) -> None:
        self.controller.observe_decode(batch, context_tokens, share, seconds)

    def on_prefill(self, timing: PrefillTiming) -> None:
        self.controller.observe_prefill(timing.new_tokens, timing.cached_tokens, timing.share, timing.elapsed_s)

    def on_split(self, split: tuple[float, float], switched: bool) -> None:
        if switched and split == self.controller.split:
            return  # the split it chose took effect
        self.controller.applied(split, time.monotonic())

    def after_step(self, scheduler: Scheduler, now: float) -> tuple[float, float] | None:
        running = scheduler.running
        self.controller.update_queue([r.seq_len - r.num_computed for r in scheduler.waiting], len(running),
                                     sum(r.seq_len for r in running),
                                     [max(0, r.sampling.max_tokens - len(r.output_ids)) for r in running])
        decision = self.controller.decide(now)
        return decision.split if decision is not None and decision.changed else None

    def fill_stats(self, stats: EngineStats) -> None:
        self.controller.fill_stats(stats)
