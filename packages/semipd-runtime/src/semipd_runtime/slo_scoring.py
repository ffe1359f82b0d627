"""How the SLO partitioner judges one split: the queue wait a request should expect before its prefill starts, and
the split's rank from its predicted SLO ratios (pure Python; imports nothing from semipd)."""

from __future__ import annotations

import math

__all__ = ["predict_queue_wait_s", "queue_wait_quantile", "rank_split"]


def rank_split(ttft_ratio: float, tpot_ratio: float, tpot_margin: float, best_tpot_ratio: float,
               tpot_tolerance: float) -> tuple[int, float]:
    """(tier, value inside the tier) of a split from its SLO / predicted ratios; see the partitioner's docstring.
    Tier 0 (TPOT not held with the margin): the splits within `tpot_tolerance` of the best TPOT any split
    reaches (`best_tpot_ratio`) rank above the rest, by TTFT; the rest by how close their TPOT comes."""
    if ttft_ratio >= 1 and tpot_ratio >= 1:
        return 2, min(ttft_ratio, tpot_ratio)
    if tpot_ratio >= 1 + tpot_margin:  # so TTFT is the one that fails
        return 1, ttft_ratio
    relative = tpot_ratio / best_tpot_ratio
    if relative >= tpot_tolerance * (1 - 1e-9):
        return 0, 1.0 + ttft_ratio
    return 0, relative


_RHO_KNEE = 0.95  # past this the M/D/1 wait continues as a straight line (finite, still steep)


def predict_queue_wait_s(per_request_s: float, backlog_s: float, arrival_rate: float, horizon_s: float,
                         backlog_z: float = 2.0) -> tuple[float, float]:
    """(mean wait before prefill starts for a request arriving within the next `horizon_s`, rho).

    `per_request_s`: amortized prefill time per request S; `backlog_s`: prefill time of what waits now.
    Stochastic part (Poisson arrivals, fixed service): the M/D/1 mean wait W = rho S / (2 (1 - rho)), continued
    past rho = 0.95 along its tangent so it stays finite and monotone (a steady state near rho = 1 is never a good
    plan: its wait is huge and hypersensitive to the rate). Fluid part: an M/D/1 queue swings by about W + S, so
    only backlog beyond W + backlog_z (W + S) counts as a real surplus (a burst); the surplus drains at (1 - rho)
    per second, or grows at (rho - 1) when overloaded, and a newcomer at time t waits what is left of it,
    averaged over [0, horizon].
    """
    rho = arrival_rate * per_request_s
    drain = 1.0 - rho
    if rho <= _RHO_KNEE:
        stochastic = rho * per_request_s / (2 * drain)
    else:
        at_knee = _RHO_KNEE * per_request_s / (2 * (1 - _RHO_KNEE))
        stochastic = at_knee + (rho - _RHO_KNEE) * per_request_s / (2 * (1 - _RHO_KNEE) ** 2)
    excess = max(0.0, backlog_s - stochastic - backlog_z * (stochastic + per_request_s))
    if drain > 0 and excess <= drain * horizon_s:
        fluid = excess * excess / (2 * drain * horizon_s)
    else:
        fluid = excess - drain * horizon_s / 2
    return stochastic + fluid, rho


def queue_wait_quantile(mean_wait_s: float, rho: float, quantile: float) -> float:
    """The `quantile` of the queue wait given its mean (M/D/1-like: a request waits at all with probability ~rho,
    and the waits of those that do are about exponential with mean W / rho). SLO attainment is judged per request,
    so "90% of requests within the TTFT SLO" needs the 0.9 quantile of the wait inside it, not the mean: at rho 0.8
    it is 2.6x the mean. Returns 0 when fewer than 1 - quantile of the requests wait."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if mean_wait_s <= 0 or rho <= 0:
        return 0.0
    p_wait = min(1.0, rho)
    tail = 1.0 - quantile
    if p_wait <= tail:
        return 0.0
    return mean_wait_s / p_wait * math.log(p_wait / tail)
