"""Configuration of the SLO partitioner: its knobs and the candidate SM splits (pure Python; imports nothing from
semipd)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

POLICIES = ("static", "slo")


def sm_split_candidates(total_sms: int = 132, sm_step: int = 8) -> tuple[tuple[float, float], ...]:
    """(prefill %, decode %) with prefill on a multiple of `sm_step` SMs (the green-context split granularity) and
    decode on the rest, both >= sm_step: 8/124, 16/116, ..., 120/12 for 132 SMs. Percents are exact (x 100 / total),
    so `round(percent * total_sms / 100)` gives the SM counts back."""
    if isinstance(total_sms, bool) or not isinstance(total_sms, int) or total_sms < 2:
        raise ValueError(f"total_sms must be an int >= 2, got {total_sms!r}")
    if isinstance(sm_step, bool) or not isinstance(sm_step, int) or not 1 <= sm_step <= total_sms // 2:
        raise ValueError(f"sm_step must be an int in [1, total_sms // 2], got {sm_step!r}")
    splits = []
    for prefill_sms in range(sm_step, total_sms - sm_step + 1, sm_step):
        splits.append((100.0 * prefill_sms / total_sms, 100.0 * (total_sms - prefill_sms) / total_sms))
    return tuple(splits)


@dataclass(frozen=True, slots=True)
class SloPartitionerConfig:
    """Knobs of the SLO partitioner; `candidates` None -> `sm_split_candidates(total_sms, sm_step)`.

    Each candidate is (prefill %, decode %) of the SMs; they may sum to more than 100 for MPS caps.
    `initial_split` None -> the candidate closest to an even split; under policy "static" it never moves.
    """

    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 50.0
    policy: str = "slo"
    repartition_interval_s: float = 2.0
    min_dwell_s: float = 6.0
    hysteresis: float = 0.1  # move only for a relative score gain above this ...
    load_confidence_z: float = 2.0  # ... and only when it ranks no worse with the load moved +-z standard errors
    score_cap: float = 2.0  # headroom beyond this (x the SLOs) is not worth a move
    # 0 disables (the default): see observe_ttft. At 0.3 on the H200 it swung between its clips (0.5 and 4) within
    # a minute: the TTFTs measured in a window belong to requests that arrived a queue earlier
    ttft_feedback_gain: float = 0.0
    ttft_feedback_min_samples: int = 4  # measured TTFTs in a window before the correction moves
    overload_tpot_margin: float = 0.1  # when TTFT cannot be met, TPOT must hold with this much to spare
    ttft_quantile: float = 0.9  # TTFT is judged at this quantile of its predicted distribution
    max_batch_growth: float = 4.0  # most a slower decode split is predicted to grow the running batch
    # when no split holds TPOT: splits within this fraction of the best TPOT count as equal (best TTFT wins)
    overload_tpot_tolerance: float = 0.9
    # the engine's cap on running requests (None: unknown). Past it requests wait for a decode slot, which frees
    # every output_tokens x TPOT / cap seconds: with a full batch a slower decode split also slows admission
    max_decode_batch: int | None = None
    candidates: tuple[tuple[float, float], ...] | None = None
    total_sms: int = 132
    sm_step: int = 8
    initial_split: tuple[float, float] | None = None
    prefill_token_budget: int = 8192  # most new tokens one prefill step batches
    planning_horizon_s: float = 60.0  # a backlog surplus (burst) is predicted to drain over this long
    # arrival rate and prompt lengths look back at most this far, or less when rate_target_arrivals came in a
    # shorter time (100 Poisson arrivals: ~10% error). 60 s / 200 lagged a rising load on the H200: it read
    # 3.5-4.3 req/s while 5.3 arrived, and the split stayed put while TTFT failed
    rate_window_s: float = 30.0
    rate_target_arrivals: int = 100
    window: int = 256  # samples kept per SM share in each latency model
    forgetting: float = 0.99  # per-sample weight decay inside each share's window
    min_samples: int = 8  # per latency model before the first non-static decision

    def __post_init__(self) -> None:
        positive = ("slo_ttft_ms", "slo_tpot_ms", "repartition_interval_s", "rate_window_s", "planning_horizon_s")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if isinstance(self.ttft_feedback_gain, bool) or not 0 <= self.ttft_feedback_gain <= 1:
            raise ValueError(f"ttft_feedback_gain must be in [0, 1], got {self.ttft_feedback_gain!r}")
        for name in ("min_dwell_s", "hysteresis", "load_confidence_z", "overload_tpot_margin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if isinstance(self.ttft_quantile, bool) or not isinstance(self.ttft_quantile, (int, float)) or not (
                0 < self.ttft_quantile < 1):
            raise ValueError(f"ttft_quantile must be in (0, 1), got {self.ttft_quantile!r}")
        if isinstance(self.max_batch_growth, bool) or not isinstance(self.max_batch_growth, (int, float)) or not (
                1 <= self.max_batch_growth < math.inf):
            raise ValueError(f"max_batch_growth must be a finite number >= 1, got {self.max_batch_growth!r}")
        if isinstance(self.overload_tpot_tolerance, bool) or not isinstance(
                self.overload_tpot_tolerance, (int, float)) or not 0 < self.overload_tpot_tolerance <= 1:
            raise ValueError(f"overload_tpot_tolerance must be in (0, 1], got {self.overload_tpot_tolerance!r}")
        if self.max_decode_batch is not None and (isinstance(self.max_decode_batch, bool) or not isinstance(
                self.max_decode_batch, int) or self.max_decode_batch < 1):
            raise ValueError(f"max_decode_batch must be None or an int >= 1, got {self.max_decode_batch!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if isinstance(self.score_cap, bool) or not isinstance(self.score_cap, (int, float)) or not (
                self.score_cap >= 1 and math.isfinite(self.score_cap)):
            raise ValueError(f"score_cap must be a finite number >= 1, got {self.score_cap!r}")
        for name in ("prefill_token_budget", "window", "min_samples", "rate_target_arrivals",
                     "ttft_feedback_min_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "window" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'window' else 1}, got {v!r}")
        if isinstance(self.forgetting, bool) or not 0 < self.forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {self.forgetting!r}")
        candidates = sm_split_candidates(self.total_sms, self.sm_step) if self.candidates is None \
            else tuple(check_split(c, "candidates") for c in self.candidates)
        if not candidates:
            raise ValueError("candidates must hold at least one (prefill %, decode %) split")
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"candidates must not repeat a split, got {candidates}")
        object.__setattr__(self, "candidates", candidates)
        if self.initial_split is None:
            initial = min(candidates, key=lambda c: (abs(c[0] - c[1]), -c[1]))
        else:
            initial = check_split(self.initial_split, "initial_split")
            if initial not in candidates:
                raise ValueError(f"initial_split {initial} must be one of the candidates {candidates}")
        object.__setattr__(self, "initial_split", initial)


def check_split(split: object, name: str) -> tuple[float, float]:
    try:
        raw_p, raw_d = cast(Any, split)  # anything that unpacks into two numbers
        p, d = float(raw_p), float(raw_d)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: each split must be a pair (prefill %, decode %), got {split!r}") from None
    if not (0 < p <= 100 and 0 < d <= 100):
        raise ValueError(f"{name}: percents must be in (0, 100], got {split!r}")
    return (p, d)
