"""The SLO partitioner's queueing arithmetic (`slo_scoring.py`) against simulated queues (CPU, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from semipd_runtime.slo_scoring import md1_wait_s, queue_kept_share, tpot_attainment, ttft_attainment


def simulated_md1_waits(rate: float, service_s: float, n: int, seed: int) -> np.ndarray:
    """Waits before service of an M/D/1 queue (Lindley: w' = max(0, w + S - gap))."""
    gaps = np.random.default_rng(seed).exponential(1 / rate, n)
    waits = np.zeros(n)
    for i in range(1, n):
        waits[i] = max(0.0, waits[i - 1] + service_s - gaps[i])
    return waits[n // 10:]  # past the start-up transient


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.85])
def test_ttft_attainment_matches_a_simulated_md1_queue(rho: float) -> None:
    service, own = 0.1, 0.05
    waits = simulated_md1_waits(rho / service, service, 40_000, seed=1)
    assert md1_wait_s(service, rho) == pytest.approx(float(waits.mean()), rel=0.12)
    for slack in (0.5 * service, 2 * service, 6 * service):
        simulated = float((waits + own <= own + slack).mean())
        predicted, _ = ttft_attainment(own, own + slack, service, rho / service, 0.0, 20.0)
        # the exponential tail is a little optimistic within one service time (0.60 vs 0.54 at rho 0.6)
        assert predicted == pytest.approx(simulated, abs=0.07), (rho, slack)


def test_a_backlog_drains_when_the_split_keeps_up_and_grows_when_it_does_not() -> None:
    own, slo, service = 0.2, 2.0, 0.1
    idle, mean_idle = ttft_attainment(own, slo, service, 0.0, 0.0, 20.0)
    assert idle == 1.0 and mean_idle == pytest.approx(own)
    assert ttft_attainment(2.5, slo, service, 0.0, 0.0, 20.0)[0] == 0.0  # its own prefill alone misses
    # 10 s of queued prefill, arrivals at rho 0.5: it drains in 20 s, and arrivals after t = 16.4 s meet the SLO
    share, mean = ttft_attainment(own, slo, service, 5.0, 10.0, 20.0)
    assert 0.1 < share < 0.3 and mean > 5.0
    faster, _ = ttft_attainment(own, slo, service / 2, 5.0, 5.0, 20.0)  # a split twice as fast: half the backlog
    assert faster > 0.7
    over, _ = ttft_attainment(own, slo, service, 12.0, 1.0, 20.0)  # rho 1.2 and a backlog: it only grows
    assert over < 0.05
    # decode slots freeing every 0.2 s for 8 req/s: admission, not prefill, is the bottleneck and the queue grows
    slots, _ = ttft_attainment(own, slo, service, 8.0, 1.0, 20.0, admit_s=0.2)
    assert slots < ttft_attainment(own, slo, service, 8.0, 1.0, 20.0)[0] - 0.5


def test_tpot_attainment_is_the_chance_a_lognormal_error_keeps_tpot() -> None:
    assert tpot_attainment(0.015, 0.015, 0.1) == pytest.approx(0.5)
    assert tpot_attainment(0.015 / math.exp(0.2054), 0.015, 0.1) == pytest.approx(0.98, abs=1e-3)
    assert tpot_attainment(0.02, 0.015, 0.1) < 0.01
    assert tpot_attainment(0.0149, 0.015, 0.0) == 1.0 and tpot_attainment(0.0151, 0.015, 0.0) == 0.0
    ratios = np.linspace(0.5, 2.0, 31)
    values = [tpot_attainment(0.015 / r, 0.015, 0.1) for r in ratios]
    assert all(b >= a for a, b in itertools.pairwise(values))  # more headroom, more attainment


def test_queue_kept_share_is_how_long_the_queue_stays_within_the_ttft_slo() -> None:
    """A draining or stable queue keeps the whole horizon; one that grows keeps the time until it passes the SLO's
    slack (here 1.5 s of slack, growing 0.5 s per second from 0: the first 3 s of a 12 s horizon); a prefill
    longer than the SLO keeps nothing."""
    assert queue_kept_share(0.5, 2.0, backlog_s=1.0, rho=0.8, horizon_s=40.0) == 1.0
    assert queue_kept_share(0.5, 2.0, backlog_s=0.0, rho=1.0, horizon_s=40.0) == 1.0
    assert queue_kept_share(0.5, 2.0, backlog_s=0.0, rho=1.5, horizon_s=12.0) == pytest.approx(0.25)
    # 5 s queued draining 0.1 s/s: within the slack from 35 s on, the last 2 of 16 points of a 40 s horizon
    assert queue_kept_share(0.5, 2.0, backlog_s=5.0, rho=0.9, horizon_s=40.0) == pytest.approx(2 / 16)
    assert queue_kept_share(2.5, 2.0, backlog_s=0.0, rho=0.1, horizon_s=40.0) == 0.0
