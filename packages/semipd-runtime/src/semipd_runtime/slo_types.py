"""What the SLO partitioner decides from and returns: the load it saw, its per-split predictions and the decision,
plus how a split's rank counts when moving (pure Python; imports nothing from semipd)."""

from __future__ import annotations

import dataclasses
import math
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
    # tokens to the end of each running request, ascending (max_tokens left x the share used): the k-th frees
    # the k-th decode slot after that many steps (empty: not known)
    slot_free_tokens: tuple[float, ...] = ()

    def shifted(self, z: float) -> LoadState:
        """The arrival statistics moved by z standard errors (z < 0: lighter load), clipped at 0."""
        return dataclasses.replace(
            self, arrival_rate=max(0.0, self.arrival_rate + z * self.arrival_rate_stderr),
            mean_prompt_tokens=max(0.0, self.mean_prompt_tokens + z * self.prompt_tokens_stderr),
            mean_prompt_attn=max(0.0, self.mean_prompt_attn + z * self.prompt_attn_stderr))


@dataclass(frozen=True, slots=True)
class SplitPrediction:
    """What one candidate split is predicted to do under the load (the terms: `slo_partitioner`'s docstring)."""

    prefill_percent: float
    decode_percent: float
    ttft_ms: float  # mean TTFT of the next arrivals (T)
    tpot_ms: float  # one decode step of the steady batch
    attainment: float  # A = P(TTFT within SLO) x P(TPOT within SLO)
    ttft_attainment: float
    tpot_attainment: float
    served: float  # G = share of the offered load prefilled, then decoded within TPOT, while the queue holds TTFT
    prefill_utilization: float  # rho: arrival rate x amortized prefill time per request
    decode_batch: float  # the steady decode batch B the TPOT is predicted at
    # where the TTFT comes from (for the log): the request's own prefill, the prefill time of what waits now, and
    # the decode slots' utilization (arrival rate x slot time per request; > 1: admission cannot keep up)
    own_prefill_ms: float = 0.0
    backlog_ms: float = 0.0
    slot_utilization: float = 0.0


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

    @property
    def split(self) -> tuple[float, float]:
        return (self.prefill_percent, self.decode_percent)

    def as_dict(self) -> dict[str, object]:
        """Flat values for a log line or metrics (no per-candidate detail)."""
        keys = ("time", "prefill_percent", "decode_percent", "prefill_sms", "decode_sms", "changed", "reason")
        out: dict[str, object] = {k: getattr(self, k) for k in keys}
        out.update(arrival_rate=self.load.arrival_rate, waiting_requests=self.load.waiting_requests,
                   decode_batch=self.load.decode_batch)
        if self.predicted is not None:
            p = self.predicted
            out.update(predicted_attainment=p.attainment, predicted_ttft_ms=p.ttft_ms, predicted_tpot_ms=p.tpot_ms,
                       predicted_served=p.served, predicted_decode_batch=p.decode_batch,
                       prefill_utilization=p.prefill_utilization, predicted_own_prefill_ms=p.own_prefill_ms,
                       predicted_backlog_ms=p.backlog_ms, slot_utilization=p.slot_utilization)
        if self.best is not None:
            out.update(best_prefill_percent=self.best.prefill_percent, best_attainment=self.best.attainment)
        return out


def beats(x: SplitPrediction, y: SplitPrediction, tie: float, hysteresis: float, by_ttft: bool) -> bool:
    """x is clearly better than y: more attainment A (by over `tie`), else as much and a served share G higher by
    over `hysteresis` (relative: near the best G the trade of prefill throughput against TPOT is flat, and an
    absolute margin let noise move 72 <-> 80 SMs under overload in simulation) and by over `tie` (absolute: where
    every split fails, G 3e-10 "beat" G 0 and the split moved to 91% prefill, then back: hypothesis found it), else
    (`by_ttft`: cheap moves) as much of both and a mean TTFT lower by over `hysteresis` (relative)."""
    if abs(x.attainment - y.attainment) > tie:
        return x.attainment > y.attainment
    if abs(x.served - y.served) > tie and (x.served > y.served * (1 + hysteresis)
                                           or y.served > x.served * (1 + hysteresis)):
        return x.served > y.served
    return by_ttft and x.ttft_ms < y.ttft_ms * (1 - hysteresis)


def load_moved(then: LoadState, now: LoadState, z: float, out_rel: float) -> bool:
    """The arrival rate or mean prompt length moved by over z standard errors (of both estimates), or the output
    length by over `out_rel` of the larger (it has no standard error: it comes from max_tokens)."""
    def moved(a: float, b: float, se_a: float, se_b: float) -> bool:
        return abs(a - b) > z * math.hypot(se_a, se_b)

    out = max(now.mean_output_tokens, then.mean_output_tokens)
    return (moved(now.arrival_rate, then.arrival_rate, now.arrival_rate_stderr, then.arrival_rate_stderr)
            or moved(now.mean_prompt_tokens, then.mean_prompt_tokens, now.prompt_tokens_stderr,
                     then.prompt_tokens_stderr)
            or abs(now.mean_output_tokens - then.mean_output_tokens) > out_rel * out)


def fmt(p: SplitPrediction) -> str:
    return (f"{p.prefill_percent:.1f}% A {p.attainment:.3f} G {p.served:.3f} TTFT {p.ttft_ms:.0f} ms "
            f"TPOT {p.tpot_ms:.1f} ms")
