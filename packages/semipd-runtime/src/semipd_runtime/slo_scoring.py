"""The SLO partitioner's queueing arithmetic for one split: what share of the next arrivals meet the TTFT SLO, their
mean wait, and the chance TPOT holds (pure Python; imports nothing from semipd). The terms and why they are there:
`slo_partitioner`'s docstring."""

from __future__ import annotations

import math

__all__ = ["md1_wait_s", "queue_kept_share", "tpot_attainment", "ttft_attainment"]

_RHO_KNEE = 0.95  # past this the M/D/1 wait continues as a straight line (finite, still steep)
_POINTS = 16  # arrival times sampled over the horizon


def md1_wait_s(per_request_s: float, rho: float) -> float:
    """Mean M/D/1 wait rho S / (2 (1 - rho)), continued past rho = 0.95 along its tangent so it stays finite and
    monotone (a steady state near rho = 1 is never a good plan: its wait is huge and hypersensitive to the rate)."""
    if rho <= _RHO_KNEE:
        return rho * per_request_s / (2 * (1 - rho))
    at_knee = _RHO_KNEE * per_request_s / (2 * (1 - _RHO_KNEE))
    return at_knee + (rho - _RHO_KNEE) * per_request_s / (2 * (1 - _RHO_KNEE) ** 2)


def _backlog_at(t: float, backlog_s: float, rho: float) -> float:
    """Prefill seconds queued at time t: the backlog drains at (1 - rho) per second, or grows when rho > 1."""
    return max(0.0, backlog_s + (rho - 1.0) * t)


def ttft_attainment(own_s: float, slo_s: float, per_request_s: float, arrival_rate: float, backlog_s: float,
                    horizon_s: float, admit_s: float = 0.0) -> tuple[float, float]:
    """(share of the requests arriving over the next `horizon_s` whose TTFT meets `slo_s`, their mean TTFT).

    A request arriving at t waits max(backlog(t), w): the work queued ahead of it (FCFS; `backlog_s` now, draining
    or growing with rho = rate x max(`per_request_s`, `admit_s`): prefill, or decode slots freeing every
    `admit_s` when the batch is full), or the M/D/1 prefill wait w of Poisson arrivals, whichever is longer (no
    double count: a backlog is part of what the stationary queue holds). w is 0 with probability 1 - rho, else
    about exponential with mean W / rho: P(w > x) = rho exp(-x rho / W). Decode slots are many servers: below
    their capacity they add no stochastic wait (as one server they over-predicted TTFT near full batches). The
    request then prefills for `own_s`."""
    rho = arrival_rate * per_request_s
    fluid_rho = arrival_rate * max(per_request_s, admit_s)
    p_wait = min(1.0, rho)
    mean_w = md1_wait_s(per_request_s, rho) if rho > 0 else 0.0
    slack = slo_s - own_s
    met = total_wait = 0.0
    for i in range(_POINTS):
        queued = _backlog_at((i + 0.5) * horizon_s / _POINTS, backlog_s, fluid_rho)
        total_wait += max(queued, mean_w)
        if queued > slack or slack < 0:
            continue
        met += 1.0 if mean_w <= 0 else 1.0 - p_wait * math.exp(-slack * p_wait / mean_w)
    return met / _POINTS, own_s + total_wait / _POINTS


def queue_kept_share(own_s: float, slo_s: float, backlog_s: float, rho: float, horizon_s: float) -> float:
    """Share of the next `horizon_s` over which the work queued ahead of a newcomer (`backlog_s` now, draining or
    growing with `rho`) stays within what the TTFT SLO leaves after its own prefill: the fluid queue alone,
    without the stochastic wait. A split whose queue outgrows the SLO fails every later request, this phase's and
    the next one's, even where its prefill throughput looks like a share of the load served."""
    slack = slo_s - own_s
    if slack < 0:
        return 0.0
    kept = sum(_backlog_at((i + 0.5) * horizon_s / _POINTS, backlog_s, rho) <= slack for i in range(_POINTS))
    return kept / _POINTS


def tpot_attainment(tpot_s: float, slo_s: float, sigma: float) -> float:
    """P(TPOT <= SLO) for a predicted TPOT with a lognormal model error of `sigma`: Phi(ln(SLO / TPOT) / sigma).
    At sigma 0.1 a split needs 23% to spare for 0.98; this replaces a hand-set margin."""
    if sigma <= 0:
        return 1.0 if tpot_s <= slo_s else 0.0
    return 0.5 * math.erfc(-math.log(slo_s / tpot_s) / (sigma * math.sqrt(2)))
