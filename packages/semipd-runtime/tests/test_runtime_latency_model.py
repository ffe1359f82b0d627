"""The SLO partitioner's step-latency models (`latency_model.py`) on synthetic step timings from a known ground
truth (CPU, fast)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slo_fixtures import Truth, profile_for, truths

from semipd_runtime.latency_model import DecodeLatencyModel, PrefillLatencyModel, nnls

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.integers(1, 10), st.integers(1, 6), st.integers(0, 2**32 - 1), st.booleans())
def test_nnls_matches_active_set_enumeration(m: int, n: int, seed: int, collinear: bool) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, n)) * 10 ** rng.uniform(-3, 3, size=n)
    if collinear and n > 1:
        a[:, 1] = 2 * a[:, 0]
    b = rng.normal(size=m)
    x = nnls(a, b)
    assert (x >= 0).all()
    best = math.inf
    for k in range(n + 1):  # the optimum is an unconstrained fit on some subset that lands in x >= 0
        for subset in itertools.combinations(range(n), k):
            z = np.zeros(n)
            if subset:
                z[list(subset)] = np.linalg.lstsq(a[:, list(subset)], b, rcond=None)[0]
            if (z >= 0).all():
                best = min(best, float(np.sum((a @ z - b) ** 2)))
    assert np.sum((a @ x - b) ** 2) <= best + 1e-8 * float(b @ b) + 1e-12


@FAST
@given(truths())
def test_models_recover_ground_truth_without_noise(truth: Truth) -> None:
    prof = profile_for(truth, np.random.default_rng(0), noise=0.0)
    pm, dm = PrefillLatencyModel(), DecodeLatencyModel()
    for s in prof.prefill:
        pm.add_sample(s)
    for s in prof.decode:
        dm.add_sample(s)
    for share in (0.1, 0.27, 0.5, 0.77, 0.95):
        for n, c in ((100, 0), (3000, 500), (6000, 0)):
            assert pm.predict(n, c, share) == pytest.approx(truth.prefill([n], [c], share), rel=1e-6)
        for b, ctx in ((3, 1000), (100, 150_000)):
            assert dm.predict(b, ctx, share) == pytest.approx(truth.decode(b, ctx, share), rel=1e-6)
    assert dm.knee == truth.d_knee and dm.rms_relative_error < 1e-6


def test_batched_prefill_features_count_attention_per_request() -> None:
    truth = Truth()
    pm = PrefillLatencyModel()
    for s in profile_for(truth, np.random.default_rng(0), 0.0).prefill:
        pm.add_sample(s)
    new, cached = [300, 1200, 50], [0, 700, 4000]
    assert pm.predict(new, cached, 0.5) == pytest.approx(truth.prefill(new, cached, 0.5), rel=1e-6)
    assert pm.predict(new, 100, 0.5) == pytest.approx(truth.prefill(new, [100] * 3, 0.5), rel=1e-6)


def test_window_per_share_keeps_other_shares() -> None:
    dm = DecodeLatencyModel(window=4, forgetting=0.5)
    for share in (0.25, 0.5):
        for _ in range(10):
            dm.observe(8, 800, share, 0.01 / share)
    assert dm.num_samples == 8 and dm.shares == (0.25, 0.5)
    for _ in range(100):  # many steps at one share do not push the other share's samples out
        dm.observe(8, 800, 0.5, 0.02)
    assert dm.num_samples == 8 and dm.predict(8, 800, 0.25) == pytest.approx(0.04, rel=1e-6)
