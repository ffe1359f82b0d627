"""Configuration of the SLO partitioner: its knobs and the candidate SM splits (pure Python; imports nothing from
semipd)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

POLICIES = ("static", "slo")
SLOW_MOVE_DWELL_S = 60.0  # least time a split is held where a move costs seconds (MPS: ~12 s measured)


def sm_split_candidates(total_sms: int = 132, sm_step: int = 8) -> tuple[tuple[float, float], ...]:
    """(prefill %, decode %) with decode on a multiple of `sm_step` SMs and prefill on the rest, both >= sm_step:
    9.1/90.9 (12/120 SMs) ... 93.9/6.1 (124/8) for 132 SMs, in rising prefill order. This is what a green split
    grants: decode's group is carved first, rounded up to a multiple of 8 SMs on Hopper, and prefill takes the rest
    (132 is not a multiple of 8, so prefill on the grid would run 4 SMs short of what the policy judged). Percents
    are exact (x 100 / total), so `round(percent * total_sms / 100)` gives the SM counts back."""
    if isinstance(total_sms, bool) or not isinstance(total_sms, int) or total_sms < 2:
        raise ValueError(f"total_sms must be an int >= 2, got {total_sms!r}")
    if isinstance(sm_step, bool) or not isinstance(sm_step, int) or not 1 <= sm_step <= total_sms // 2:
        raise ValueError(f"sm_step must be an int in [1, total_sms // 2], got {sm_step!r}")
    splits = []
    for decode_sms in range(total_sms - sm_step, sm_step - 1, -1):
        if decode_sms % sm_step == 0:
            splits.append((100.0 * (total_sms - decode_sms) / total_sms, 100.0 * decode_sms / total_sms))
    return tuple(splits)


def nearest_split(candidates: Sequence[tuple[float, float]], split: tuple[float, float]) -> tuple[float, float]:
    """The candidate a split asked for runs as: the least decode share at or above the one asked (a green split
    rounds decode's SMs up: `--decode-sm-percent 50` runs 72 of 132), then the nearest prefill share; where every
    candidate has one decode share (MPS keeps its cap), the nearest prefill share."""
    grid = len({c[1] for c in candidates}) > 1
    up = [c for c in candidates if c[1] >= split[1] - 1e-9] if grid else []
    return min(up or candidates, key=lambda c: (abs(c[1] - split[1]), abs(c[0] - split[0])))


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
    # a move must gain over `tie` in attainment or served share, or (cheap moves) lower the mean TTFT by over
    # `hysteresis`, and rank no worse with the load moved +-load_confidence_z standard errors
    tie: float = 0.02
    hysteresis: float = 0.25  # adjacent splits (8 SMs) differ by ~10% in TTFT: no back and forth between them
    load_confidence_z: float = 2.0
    tpot_sigma: float = 0.1  # lognormal error of a TPOT prediction (sets how much TPOT a split keeps to spare)
    horizon_s: float = 20.0  # a split is judged by the requests arriving over this long
    # green contexts move the split in 3-8 ms: the policy may follow the load closely, and ranks the splits that
    # tie on attainment by mean TTFT (at light load prefill takes what decode does not need). MPS moves take ~12 s
    # (a standby process starts): False keeps the split unless attainment or served share gain, and holds a split
    # at least SLOW_MOVE_DWELL_S
    cheap_moves: bool = True
    # the engine's cap on running requests (None: unknown). Past it requests wait for a decode slot, which frees
    # every output_tokens x TPOT / cap seconds: with a full batch a slower decode split also slows admission
    max_decode_batch: int | None = None
    candidates: tuple[tuple[float, float], ...] | None = None
    total_sms: int = 132
    sm_step: int = 8
    initial_split: tuple[float, float] | None = None
    prefill_token_budget: int = 8192  # most new tokens one prefill step batches
    # arrival rate and prompt lengths look back at most this far, or less when rate_target_arrivals came in a
    # shorter time (100 Poisson arrivals: ~10% error)
    rate_window_s: float = 30.0
    rate_target_arrivals: int = 100
    window: int = 256  # samples kept per SM share in each latency model
    forgetting: float = 0.99  # per-sample weight decay inside each share's window
    min_samples: int = 8  # per latency model before the first non-static decision

    @property
    def dwell_s(self) -> float:
        return self.min_dwell_s if self.cheap_moves else max(self.min_dwell_s, SLOW_MOVE_DWELL_S)

    def __post_init__(self) -> None:
        positive = ("slo_ttft_ms", "slo_tpot_ms", "repartition_interval_s", "rate_window_s", "horizon_s")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("min_dwell_s", "hysteresis", "load_confidence_z", "tpot_sigma", "tie"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.cheap_moves, bool):
            raise ValueError(f"cheap_moves must be a bool, got {self.cheap_moves!r}")
        if self.max_decode_batch is not None and (isinstance(self.max_decode_batch, bool) or not isinstance(
                self.max_decode_batch, int) or self.max_decode_batch < 1):
            raise ValueError(f"max_decode_batch must be None or an int >= 1, got {self.max_decode_batch!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("prefill_token_budget", "window", "min_samples", "rate_target_arrivals"):
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
