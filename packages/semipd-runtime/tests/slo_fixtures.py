"""Synthetic ground truth for the SLO partitioner's tests: a step-latency model of the fitted family, profiles drawn
from it, and a small closed-loop engine that feeds a partitioner as the real one does (CPU, fast)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from semipd_runtime.latency_model import LatencyProfile, decode_sample, prefill_sample
from semipd_runtime.slo_partitioner import SloPartitioner


@dataclass(frozen=True)
class Truth:
    """t = phi . alpha + max(0, 1/share - 1/knee) * phi . beta, for prefill and decode (the model family)."""

    p_alpha: tuple[float, float, float] = (2e-3, 6e-5, 1e-8)
    p_beta: tuple[float, float, float] = (2e-3, 6e-5, 1e-8)
    p_knee: float = 1.0
    d_alpha: tuple[float, float, float] = (5e-3, 2e-5, 5e-8)
    d_beta: tuple[float, float, float] = (2e-3, 8e-6, 2e-8)
    d_knee: float = 0.4

    def prefill(self, new: list[int], cached: list[int], share: float) -> float:
        n, c = np.asarray(new, float), np.asarray(cached, float)
        phi = np.array([1.0, n.sum(), (n * (c + (n + 1) / 2)).sum()])
        return float(phi @ self.p_alpha + max(0.0, 1 / share - 1 / self.p_knee) * (phi @ self.p_beta))

    def decode(self, batch: float, context: float, share: float) -> float:
        phi = np.array([1.0, batch, context])
        return float(phi @ self.d_alpha + max(0.0, 1 / share - 1 / self.d_knee) * (phi @ self.d_beta))


@st.composite
def truths(draw: st.DrawFn) -> Truth:
    def vec(lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(draw(st.floats(a, b)) for a, b in zip(lo, hi, strict=True))

    p_alpha = vec((5e-4, 2e-5, 0.0), (3e-3, 1e-4, 2e-8))
    u = draw(st.floats(0.6, 1.2))  # compute-bound prefill: t ~ alpha * (1 + u (1/share - 1))
    d_alpha = vec((3e-3, 1e-5, 2e-8), (8e-3, 5e-5, 1e-7))
    knee = draw(st.sampled_from([0.3, 0.4, 0.5, 0.6]))
    v = draw(st.floats(0.7, 1.3))  # memory-bound decode: t ~ alpha * max(1, knee / share)
    return Truth(p_alpha, tuple(u * a for a in p_alpha), 1.0, d_alpha, tuple(v * knee * a for a in d_alpha), knee)


def profile_for(truth: Truth, rng: np.random.Generator, noise: float, total_sms: int = 132) -> LatencyProfile:
    prof = LatencyProfile(key={"model": "synthetic", "gpu": "none"})
    for sms in range(8, total_sms + 1, 8):
        s = sms / total_sms
        for n in (64, 512, 2048, 8192):
            for c in (0, 1024):
                prof.prefill.append(prefill_sample(n, c, s, truth.prefill([n], [c], s) * rng.lognormal(0, noise)))
        for b in (1, 16, 64, 256):
            for ctx in (256, 4096):
                prof.decode.append(decode_sample(b, b * ctx, s, truth.decode(b, b * ctx, s) * rng.lognormal(0, noise)))
    return prof


def feed_window(p: SloPartitioner, truth: Truth, rng: np.random.Generator, start: float, end: float, rate: float,
                prompt: tuple[int, int], batch: int, ctx_per_seq: int, noise: float, waiting_mean: float) -> None:
    """One window of an engine's life: arrivals, prefill/decode steps at the current split, queue snapshots."""
    for t in np.sort(rng.uniform(start, end, rng.poisson(rate * (end - start)))):
        p.observe_arrival(float(t), int(rng.integers(*prompt)))
    ps, ds = p.current_split[0] / 100, p.current_split[1] / 100
    for _ in range(4):
        new = [int(x) for x in rng.integers(*prompt, size=int(rng.integers(1, 4)))]
        p.observe_prefill(new, 0, ps, truth.prefill(new, [0] * len(new), ps) * rng.lognormal(0, noise))
    for _ in range(20):
        b = max(1, int(batch * rng.uniform(0.9, 1.1)))
        ctx = b * int(ctx_per_seq * rng.uniform(0.8, 1.2))
        p.observe_decode(b, ctx, ds, truth.decode(b, ctx, ds) * rng.lognormal(0, noise))
    for _ in range(10):
        waiting = [int(x) for x in rng.integers(*prompt, size=rng.poisson(waiting_mean))]
        p.update_queue(waiting, batch, batch * ctx_per_seq)


class EngineSim:
    """A small discrete-event engine around the partitioner: Poisson arrivals, one prefill server that batches
    what waits (up to the token budget) at the current prefill share with ground-truth step times x noise, and a
    steady decode batch. It feeds the partitioner as an engine would, so queue state reacts to the split."""

    def __init__(self, p: SloPartitioner, truth: Truth, rng: np.random.Generator, rate: float,
                 prompt: tuple[int, int], batch: int, ctx_per_seq: int, noise: float, t0: float = 0.0) -> None:
        self.p, self.truth, self.rng, self.noise = p, truth, rng, noise
        self.set_load(rate, prompt, batch, ctx_per_seq)
        self.queue: deque[tuple[float, int]] = deque()
        self.busy_until = t0
        self.next_arrival = t0 + rng.exponential(1 / rate)
        self.next_snapshot = t0
        self.ttft: list[float] = []

    def set_load(self, rate: float, prompt: tuple[int, int], batch: int, ctx_per_seq: int) -> None:
        self.rate, self.prompt, self.batch, self.ctx_per_seq = rate, prompt, batch, ctx_per_seq

    def run(self, until: float) -> None:
        p, rng = self.p, self.rng
        while True:
            start = max(self.busy_until, self.queue[0][0]) if self.queue else math.inf
            t = min(self.next_arrival, start, self.next_snapshot)
            if t > until:
                break
            if t == self.next_snapshot:
                waiting = [n for _, n in self.queue if _ <= t]
                p.update_queue(waiting, self.batch, self.batch * self.ctx_per_seq)
                self.next_snapshot += 0.1
            elif t == self.next_arrival:
                n = int(rng.integers(*self.prompt))
                p.observe_arrival(t, n)
                self.queue.append((t, n))
                self.next_arrival += rng.exponential(1 / self.rate)
            else:  # a prefill step starts: take what waits, up to the token budget (at least one request)
                taken: list[tuple[float, int]] = []
                while self.queue and (not taken or sum(n for _, n in taken) + self.queue[0][1]
                                      <= p.config.prefill_token_budget):
                    taken.append(self.queue.popleft())
                share = p.current_split[0] / 100
                new = [n for _, n in taken]
                seconds = self.truth.prefill(new, [0] * len(new), share) * rng.lognormal(0, self.noise)
                p.observe_prefill(new, 0, share, seconds)
                self.busy_until = start + seconds
                self.ttft += [self.busy_until - arrived for arrived, _ in taken]
        share = p.current_split[1] / 100
        for _ in range(20):  # decode steps of the steady batch
            b = max(1, int(self.batch * rng.uniform(0.9, 1.1)))
            ctx = b * int(self.ctx_per_seq * rng.uniform(0.8, 1.2))
            p.observe_decode(b, ctx, share, self.truth.decode(b, ctx, share) * rng.lognormal(0, self.noise))
