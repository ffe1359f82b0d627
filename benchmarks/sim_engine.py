"""A simulated semi-PD engine on CPU (discrete events), to try SLO-policy changes before spending GPU time.

Not a measurement: step times come from a synthetic latency model per shape, fitted by hand to the H200 server
logs in benchmarks/results/2026-12-02{c,d}-h200 (8B, long prompts, decode measured *while prefill runs*: decode
step 14.6 ms at B=27 on 52 SMs, 20 ms at B=35 on 44, 22 ms at B=26 on 28, 8.7 ms at B=18 on 108; prefill ~0.3 s
per 8k-token step on 80 SMs). Decode under a running prefill does not saturate with SMs the way it does alone
(HBM and L2 are shared), hence the knee of 1. `8b-h100` is least-squares fitted to the H100 slo run's decode
steps in benchmarks/results/2026-12-07c-h100.

A prefill worker (FCFS, up to 8192 tokens per step, admission capped at `max_batch` running requests) and a
decode worker run on disjoint SM shares; the real `SloPartitioner` sees the observations the engine feeds it and
moves the split instantly (green contexts: 3-8 ms). Requests that have not finished `timeout_s` after the last
arrival of a workload count as missed (the benchmark's client gives up).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from semipd_runtime.latency_model import LatencyProfile, decode_sample, prefill_sample
from semipd_runtime.slo_partitioner import Decision, SloPartitioner

TOTAL_SMS, MAX_PREFILL_TOKENS = 132, 8192


@dataclass(frozen=True)
class StepTimes:
    """Prefill t = phi . p_alpha / share (compute bound); decode t = a.sum() + max(0, 1/share - 1/knee) * a . d_v
    with a = phi * d_alpha, phi = [1, batch, context tokens]."""

    p_alpha: tuple[float, float, float]
    d_alpha: tuple[float, float, float]
    d_knee: float = 0.5
    d_v: tuple[float, float, float] = (0.5, 1.0, 1.0)

    def prefill(self, new: Sequence[int], share: float, contention: float = 0.0) -> float:
        """`contention`: prefill runs (1 + contention) times slower beside the decode batch running then (HBM and
        L2 are shared); the server passes its factor x the batch's fill of max_batch, the start-up profile 0."""
        n = np.asarray(new, float)
        return float(np.array([1.0, n.sum(), (n * (n + 1) / 2).sum()]) @ self.p_alpha) / share * (1 + contention)

    def decode(self, batch: int, context: int, share: float) -> float:
        a = np.array([1.0, batch, context]) * self.d_alpha
        return float(a.sum() + max(0.0, 1 / share - 1 / self.d_knee) * (a @ np.asarray(self.d_v)))


SHAPES = {
    # decode per sequence of 3k context: 0.21 ms + 0.089 ms x (1/share - 1); per step 3.7 ms + 1 ms x (...)
    "8b": StepTimes((2e-3, 2.2e-5, 2e-9), (3.66e-3, 1.6e-5, 5e-8), 1.0, (0.27, 0.42, 0.42)),
    # H100 (3.35 TB/s): the same prefill (compute-bound: 8k tokens in 0.24 s on both); decode least-squares fitted
    # to the 52 decode steps the slo run logged beside a running prefill (benchmarks/results/2026-12-07c-h100, 5%
    # median error): a larger fixed part than the H200's (7.5 vs 3.7 ms), a smaller per-token one
    "8b-h100": StepTimes((2e-3, 2.2e-5, 2e-9), (7.5e-3, 1e-6, 4.2e-8), 1.0, (0.27, 0.42, 0.42)),
    "3b": StepTimes((1.5e-3, 1.0e-5, 1e-9), (2.5e-3, 1e-5, 2.6e-8), 0.5, (0.5, 1.0, 2.6)),
}


@dataclass(frozen=True)
class Phase:
    """`duration_s` of arrivals at `rate` req/s, prompt and output lengths uniform in [lo, hi]."""

    name: str
    duration_s: float
    rate: float
    prompt: tuple[int, int]
    output: tuple[int, int]


def stationary(rate: float, duration_s: float = 20.0, prompt: tuple[int, int] = (1536, 4608),
               output: tuple[int, int] = (128, 384)) -> Phase:
    """gpu_suite.sh's sweep workload: 3k +- 50% prompts, 256 +- 50% outputs."""
    return Phase(f"{rate:g}/s", duration_s, rate, prompt, output)


def phased(scale: float = 1.0, repeats: int = 2, duration_s: float = 60.0) -> list[Phase]:
    """The phased workload of gpu_suite.sh's slo_phased stage (there 25 s per phase): long prompts at a moderate
    rate (prefill-bound), then short prompts with long outputs (decode-bound), repeated. (The GPU client draws
    the short phase's outputs from 512-1536; here 768-1280, the range the H200-tuned tests were written for.)"""
    one = [Phase("long", duration_s, 6.5 * scale, (1536, 4608), (128, 384)),
           Phase("short", duration_s, 4.0 * scale, (512, 1536), (768, 1280))]
    return one * repeats


@dataclass
class Req:
    arrival: float
    prompt: int
    out: int
    phase: str
    first: float = math.nan
    done: float = math.nan
    gen: int = 0
    ctx: int = 0

    def meets(self, slo: tuple[float, float]) -> bool:
        return (not math.isnan(self.done) and (self.first - self.arrival) * 1000 <= slo[0]
                and (self.done - self.first) / max(1, self.out - 1) * 1000 <= slo[1])


def make_requests(phases: Sequence[Phase], rng: np.random.Generator, t0: float = 0.0) -> list[Req]:
    reqs, start = [], t0
    for ph in phases:
        for a in np.sort(rng.uniform(0, ph.duration_s, rng.poisson(ph.rate * ph.duration_s))):
            reqs.append(Req(start + float(a), int(rng.integers(ph.prompt[0], ph.prompt[1] + 1)),
                            int(rng.integers(ph.output[0], ph.output[1] + 1)), ph.name))
        start += ph.duration_s
    return reqs


@dataclass
class Server:
    steps: StepTimes
    p: SloPartitioner
    rng: np.random.Generator
    max_batch: int = 64
    grain: int = 0  # green-context SM granularity the shares are granted at (0: as asked; the H100/H200: 8)
    contention: float = 0.0  # prefill slowdown beside a full decode batch (scaled by the batch's fill)
    noise: float = 0.03  # lognormal sigma of each step's time
    t: float = 0.0
    queue: deque[Req] = field(default_factory=deque)
    prefilling: list[Req] = field(default_factory=list)
    ready: list[Req] = field(default_factory=list)  # prefilled, joining decode at its next step
    running: list[Req] = field(default_factory=list)
    prefill_end: float = math.inf
    decode_end: float = math.inf
    next_decide: float = 0.0
    decisions: list[Decision] = field(default_factory=list)
    decode_log: list[tuple[float, int, float]] = field(default_factory=list)  # (t, batch, seconds) per step
    # (time, (prefill %, decode %)) the split is forced to, in time order: a phase oracle's schedule
    schedule: deque[tuple[float, tuple[float, float]]] = field(default_factory=deque)
    _prefill_obs: tuple = ()
    _decode_obs: tuple = ()

    def _start_prefill(self) -> None:
        slots = self.max_batch - len(self.running) - len(self.ready)
        if self.prefilling or not self.queue or slots <= 0:
            return
        taken: list[Req] = []
        while self.queue and len(taken) < slots and (
                not taken or sum(r.prompt for r in taken) + self.queue[0].prompt <= MAX_PREFILL_TOKENS):
            taken.append(self.queue.popleft())
        share = self.p.current_split[0] / 100
        granted = granted_shares(self.p.current_split, self.grain)[0]
        fill = len(self.running) / self.max_batch
        secs = self.steps.prefill([r.prompt for r in taken], granted, self.contention * fill) \
            * self.rng.lognormal(0, self.noise)
        self.prefilling, self.prefill_end = taken, self.t + secs
        self._prefill_obs = ([r.prompt for r in taken], 0, share, secs)

    def _start_decode(self) -> None:
        if self.decode_end < math.inf:
            return
        self.running += self.ready
        self.ready = []
        if self.running:
            share = self.p.current_split[1] / 100
            b, ctx = len(self.running), sum(r.ctx for r in self.running)
            granted = granted_shares(self.p.current_split, self.grain)[1]
            secs = self.steps.decode(b, ctx, granted) * self.rng.lognormal(0, self.noise)
            self.decode_end = self.t + secs
            self._decode_obs = (b, ctx, share, secs)

    def _report_queue(self) -> None:
        self.p.update_queue([r.prompt for r in self.queue], len(self.running), sum(r.ctx for r in self.running),
                            [r.out - r.gen for r in self.running])

    def serve(self, reqs: list[Req], until: float) -> None:
        """Run until every request finished or `until`; what is left then counts as timed out."""
        arrivals = deque(sorted(reqs, key=lambda r: r.arrival))
        while arrivals or self.queue or self.prefilling or self.ready or self.running:
            na = arrivals[0].arrival if arrivals else math.inf
            ns = self.schedule[0][0] if self.schedule else math.inf
            t = min(na, self.prefill_end, self.decode_end, self.next_decide, ns)
            if t > until:
                break
            self.t = t
            if t == ns:  # steps already running keep their share, as a green-context move does
                self.p.force_split(*self.schedule.popleft()[1], now=t)
            elif t == na:
                r = arrivals.popleft()
                self.queue.append(r)
                self.p.observe_arrival(t, r.prompt, r.out)  # ignore_eos: max_tokens is the output
            elif t == self.prefill_end:
                self.p.observe_prefill(*self._prefill_obs)
                for r in self.prefilling:
                    r.first, r.ctx, r.gen = t, r.prompt, 1
                self.ready += self.prefilling
                self.prefilling, self.prefill_end = [], math.inf
            elif t == self.decode_end:
                self.p.observe_decode(*self._decode_obs)
                self.decode_log.append((t, self._decode_obs[0], self._decode_obs[3]))
                for r in self.running:
                    r.gen, r.ctx = r.gen + 1, r.ctx + 1
                    if r.gen >= r.out:
                        r.done = t
                        self.p.observe_finish(r.out, r.out)  # ignore_eos: max_tokens is the output
                self.running = [r for r in self.running if math.isnan(r.done)]
                self.decode_end = math.inf
                self._report_queue()
            else:
                self._report_queue()
                self.decisions.append(self.p.decide(t))
                self.next_decide = t + self.p.config.repartition_interval_s
            self._start_prefill()
            self._start_decode()
        self.queue.clear(), self.ready.clear(), self.running.clear()  # timed out: the client gave up
        self.prefilling, self.prefill_end, self.decode_end = [], math.inf, math.inf

    def sms_between(self, start: float, end: float) -> list[int]:
        """Prefill SMs of the decisions in [start, end)."""
        return [d.prefill_sms for d in self.decisions if start <= d.time < end]

    def decode_step_mean(self, start: float, end: float) -> float | None:
        """Mean decode step seconds in [start, end) (None: no step)."""
        s = [secs for t, _, secs in self.decode_log if start <= t < end]
        return sum(s) / len(s) if s else None


def granted_shares(split: tuple[float, float], grain: int) -> tuple[float, float]:
    """The SM shares a split asked in percent runs on: with green contexts (`grain` 8 on Hopper) decode's SMs are
    rounded up to a multiple of `grain` and prefill gets the rest (d40: 56 + 76 SMs; d50: 72 + 60); `grain` 0 runs
    the shares asked. The engine reports the asked percent to the policy, and so does this simulator."""
    if grain <= 0:
        return split[0] / 100, split[1] / 100
    decode = min(TOTAL_SMS - grain, grain * math.ceil(round(TOTAL_SMS * split[1] / 100) / grain))
    return (TOTAL_SMS - decode) / TOTAL_SMS, decode / TOTAL_SMS


def startup_profile(steps: StepTimes, prefill_percents: Sequence[float], grain: int = 0) -> LatencyProfile:
    """What the engine's startup pass measures: 6 prompts up to 4096 tokens and 16 decode steps of 1-6 sequences
    at each split."""
    prof = LatencyProfile()
    for pp in prefill_percents:
        ps, ds = pp / 100, 1 - pp / 100
        gp, gd = granted_shares((pp, 100 - pp), grain)  # run on the SMs granted, labelled with the split asked
        for k in range(1, 7):
            n = 4096 * k // 6
            prof.prefill.append(prefill_sample([n], [0], ps, steps.prefill([n], gp)))
        for b in range(1, 7):
            for i in range(16):
                ctx = b * (2000 + i)
                prof.decode.append(decode_sample(b, ctx, ds, steps.decode(b, ctx, gd)))
    return prof
