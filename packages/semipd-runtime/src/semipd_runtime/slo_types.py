"""What the SLO partitioner decides from and returns: the load it saw, its per-split predictions and the decision,
plus how a split's rank counts when moving (pure Python; imports nothing from semipd)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoadState:
    """The load a decision was made for: recent arrivals (with the standard errors of their estimates),
    queue and decode batch averaged over the queue updates since the previous decision."""

    arrival_rate: float  # requests/s
    mean_prompt_tokens: float
    mean_prompt_attn: float  # mean of n (n + 1) / 2: causal attention work of one prompt
    waiting_requests: float
    waiting_tokens: float
    waiting_attn: float
    decode_batch: float
    decode_context_tokens: float
    mean_output_tokens: float = 0.0  # of recently finished requests (0: none seen)
    arrival_rate_stderr: float = 0.0  # Poisson: sqrt(count) / span
    prompt_tokens_stderr: float = 0.0
    prompt_attn_stderr: float = 0.0

    def shifted(self, z: float) -> LoadState:
        """The arrival statistics moved by z standard errors (z < 0: lighter load), clipped at 0."""
        return dataclasses.replace(
            self, arrival_rate=max(0.0, self.arrival_rate + z * self.arrival_rate_stderr),
            mean_prompt_tokens=max(0.0, self.mean_prompt_tokens + z * self.prompt_tokens_stderr),
            mean_prompt_attn=max(0.0, self.mean_prompt_attn + z * self.prompt_attn_stderr))


@dataclass(frozen=True, slots=True)
class SplitPrediction:
    """Predicted latencies of one candidate split; score >= 1 means both SLOs are predicted to hold."""

    prefill_percent: float
    decode_percent: float
    ttft_ms: float
    tpot_ms: float
    queue_wait_ms: float
    prefill_utilization: float  # rho: arrival rate x amortized prefill time per request
    score: float
    tier: int = 0  # 2: both SLOs hold, 1: only TPOT (with margin), 0: TPOT not held (see the module docstring)
    tier_value: float = 0.0  # what ranks inside the tier: score; TTFT ratio; 1 + TTFT ratio near the best TPOT
    ttft_mean_ms: float = 0.0  # mean TTFT (ttft_ms is its ttft_quantile); the TTFT feedback compares means
    # where the TTFT comes from (for the log): the request's own prefill, the prefill time of what waits now, and
    # the decode slots' utilization (arrival rate x slot time per request; > 1: admission cannot keep up)
    own_prefill_ms: float = 0.0
    backlog_ms: float = 0.0
    slot_utilization: float = 0.0

    @property
    def meets_slo(self) -> bool:
        return self.score >= 1.0

    @property
    def rank(self) -> tuple[int, float]:
        return (self.tier, self.tier_value)


@dataclass(frozen=True, slots=True)
class Decision:
    """The split to run (percent of the SMs and SM counts), why, and the predictions behind it."""

    time: float
    prefill_percent: float
    decode_percent: float
    prefill_sms: int
    decode_sms: int
    changed: bool  # True once, at the decide() call that moved the split
    reason: str
    predicted: SplitPrediction | None  # at the chosen split (None while warming up)
    best: SplitPrediction | None  # the best-scoring candidate (may differ: hysteresis / dwell)
    candidates: tuple[SplitPrediction, ...]
    load: LoadState
    ttft_correction: float = 1.0  # measured / modelled TTFT factor the predictions carry (observe_ttft)

    @property
    def split(self) -> tuple[float, float]:
        return (self.prefill_percent, self.decode_percent)

    def as_dict(self) -> dict[str, object]:
        """Flat values for a log line or metrics (no per-candidate detail)."""
        keys = ("time", "prefill_percent", "decode_percent", "prefill_sms", "decode_sms", "changed", "reason")
        out: dict[str, object] = {k: getattr(self, k) for k in keys}
        out.update(arrival_rate=self.load.arrival_rate, waiting_requests=self.load.waiting_requests,
                   decode_batch=self.load.decode_batch, ttft_correction=self.ttft_correction)
        if self.predicted is not None:
            out.update(predicted_ttft_ms=self.predicted.ttft_ms, predicted_tpot_ms=self.predicted.tpot_ms,
                       predicted_score=self.predicted.score, prefill_utilization=self.predicted.prefill_utilization,
                       predicted_queue_wait_ms=self.predicted.queue_wait_ms,
                       predicted_own_prefill_ms=self.predicted.own_prefill_ms,
                       predicted_backlog_ms=self.predicted.backlog_ms,
                       slot_utilization=self.predicted.slot_utilization)
        if self.best is not None:
            out.update(best_prefill_percent=self.best.prefill_percent, best_score=self.best.score)
        return out


def worth(p: SplitPrediction, score_cap: float) -> tuple[int, float]:
    """A split's rank as far as moving is concerned: headroom past score_cap counts as score_cap."""
    return (p.tier, min(p.tier_value, score_cap) if p.tier == 2 else p.tier_value)


def clear_gain(best: SplitPrediction, current: SplitPrediction, hysteresis: float, score_cap: float) -> bool:
    (bt, bv), (ct, cv) = worth(best, score_cap), worth(current, score_cap)
    return bt > ct or (bt == ct and bv > cv * (1 + hysteresis))


def fmt_rank(p: SplitPrediction) -> str:
    return f"tier {p.tier} {p.tier_value:.3f} (score {p.score:.3f})"
