"""Closed-loop simulation of semi-PD serving on CPU, to try SLO-policy changes before spending GPU time.

Not a measurement: step times come from a synthetic latency model per shape, set by hand to roughly match the
H200 logs in benchmarks/results/2026-12-02c-h200 (8B: prefill ~0.14 s per 3k prompt on 76 SMs, decode 15-20 ms at
B=20-40 on 28-44 SMs; 3B: decode 16.8 ms at B=62 on 52 SMs, static split at ~91% attainment at 16 req/s).
A prefill worker (FCFS, up to 8192 tokens per step, admission capped at max_running_requests) and a decode
worker run on disjoint SM shares; the real
`SloPartitioner` sees the same observations the engine feeds it and moves the split (instantly). The workload
mirrors gpu_suite.sh's sweep: Poisson arrivals for `duration` s per rate, prompts 1536-4608, outputs 128-384,
rates run one after another on one "server", 60 s timeout.

    python benchmarks/sim_slo_policy.py --shape 8b --rates 6 8 10 12 --slo 2000 25 --seeds 3
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from semipd_runtime.latency_model import LatencyProfile, decode_sample, prefill_sample
from semipd_runtime.slo_partitioner import SloPartitioner, SloPartitionerConfig


@dataclass(frozen=True)
class StepTimes:
    """Prefill t = phi . p_alpha / share (compute bound); decode t = a.sum() + max(0, 1/share - 1/knee) * a . d_v
    with a = phi * d_alpha, phi = [1, batch, context tokens] (saturates past the knee share)."""

    p_alpha: tuple[float, float, float]
    d_alpha: tuple[float, float, float]
    d_knee: float = 0.5
    d_v: tuple[float, float, float] = (0.5, 1.0, 1.0)

    def prefill(self, new: Sequence[int], share: float) -> float:
        n = np.asarray(new, float)
        return float(np.array([1.0, n.sum(), (n * (n + 1) / 2).sum()]) @ self.p_alpha) / share

    def decode(self, batch: int, context: int, share: float) -> float:
        a = np.array([1.0, batch, context]) * self.d_alpha
        return float(a.sum() + max(0.0, 1 / share - 1 / self.d_knee) * (a @ np.asarray(self.d_v)))


SHAPES = {
    "8b": StepTimes((2e-3, 2.2e-5, 2e-9), (5e-3, 1e-5, 2.96e-8)),
    "3b": StepTimes((1.5e-3, 1.0e-5, 1e-9), (2.5e-3, 1e-5, 2.6e-8), 0.5, (0.5, 1.0, 2.6)),
}
TOTAL_SMS, MAX_PREFILL_TOKENS, TIMEOUT_S = 132, 8192, 60.0


@dataclass
class Req:
    arrival: float
    prompt: int
    out: int
    first: float = math.nan
    done: float = math.nan
    gen: int = 0
    ctx: int = 0


@dataclass
class Server:
    steps: StepTimes
    p: SloPartitioner
    rng: np.random.Generator
    max_batch: int = 64
    noise: float = 0.03  # lognormal sigma of each step's time
    t: float = 0.0
    queue: deque[Req] = field(default_factory=deque)
    prefilling: list[Req] = field(default_factory=list)
    ready: list[Req] = field(default_factory=list)  # prefilled, joining decode at its next step
    running: list[Req] = field(default_factory=list)
    prefill_end: float = math.inf
    decode_end: float = math.inf
    next_decide: float = 0.0
    splits: list[tuple[float, int]] = field(default_factory=list)  # (time, prefill SMs) at each decision
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
        secs = self.steps.prefill([r.prompt for r in taken], share) * self.rng.lognormal(0, self.noise)
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
            secs = self.steps.decode(b, ctx, share) * self.rng.lognormal(0, self.noise)
            self.decode_end = self.t + secs
            self._decode_obs = (b, ctx, share, secs)

    def _report_queue(self) -> None:
        self.p.update_queue([r.prompt for r in self.queue], len(self.running), sum(r.ctx for r in self.running))

    def serve(self, reqs: list[Req], until: float) -> None:
        """Run until every request finished or `until`; what is left then counts as timed out."""
        arrivals = deque(sorted(reqs, key=lambda r: r.arrival))
        while arrivals or self.queue or self.prefilling or self.ready or self.running:
            na = arrivals[0].arrival if arrivals else math.inf
            t = min(na, self.prefill_end, self.decode_end, self.next_decide)
            if t > until:
                break
            self.t = t
            if t == na:
                r = arrivals.popleft()
                self.queue.append(r)
                self.p.observe_arrival(t, r.prompt)
            elif t == self.prefill_end:
                self.p.observe_prefill(*self._prefill_obs)
                for r in self.prefilling:
                    r.first, r.ctx, r.gen = t, r.prompt, 1
                self.ready += self.prefilling
                self.prefilling, self.prefill_end = [], math.inf
            elif t == self.decode_end:
                self.p.observe_decode(*self._decode_obs)
                for r in self.running:
                    r.gen, r.ctx = r.gen + 1, r.ctx + 1
                    if r.gen >= r.out:
                        r.done = t
                        self.p.observe_finish(r.out)
                self.running = [r for r in self.running if math.isnan(r.done)]
                self.decode_end = math.inf
                self._report_queue()
            else:
                self._report_queue()
                d = self.p.decide(t)
                self.next_decide = t + self.p.config.repartition_interval_s
                self.splits.append((t, d.prefill_sms))
            self._start_prefill()
            self._start_decode()
        self.queue.clear(), self.ready.clear(), self.running.clear()  # timed out: the client gave up
        self.prefilling, self.prefill_end, self.decode_end = [], math.inf, math.inf


def startup_profile(steps: StepTimes, prefill_percents: Sequence[float]) -> LatencyProfile:
    """What the engine's startup pass measures: 6 prompts up to 4096 tokens and 16 decode steps of 1-6 sequences
    at each split."""
    prof = LatencyProfile()
    for pp in prefill_percents:
        ps, ds = pp / 100, 1 - pp / 100
        for k in range(1, 7):
            n = 4096 * k // 6
            prof.prefill.append(prefill_sample([n], [0], ps, steps.prefill([n], ps)))
        for b in range(1, 7):
            for i in range(16):
                ctx = b * (2000 + i)
                prof.decode.append(decode_sample(b, ctx, ds, steps.decode(b, ctx, ds)))
    return prof


def simulate(shape: str, policy: str, rates: Sequence[float], slo: tuple[float, float], seed: int,
             duration_s: float = 20.0, decode_percent: float = 40.0) -> list[tuple[float, float, int, int]]:
    """[(rate, attainment %, min prefill SMs, max prefill SMs)] for `policy` "static" or "slo"."""
    steps, rng = SHAPES[shape], np.random.default_rng(seed)
    initial = min(SloPartitionerConfig().candidates, key=lambda c: abs(c[1] - decode_percent))
    cfg = SloPartitionerConfig(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1], policy=policy, initial_split=initial,
                               total_sms=TOTAL_SMS, max_decode_batch=64, prefill_token_budget=MAX_PREFILL_TOKENS)
    server = Server(steps, SloPartitioner(cfg, startup_profile(steps, [30.3, 75.8, initial[0]])), rng)
    out = []
    for rate in rates:
        t0 = server.t + 1
        reqs = [Req(t0 + float(a), int(rng.integers(1536, 4609)), int(rng.integers(128, 385)))
                for a in np.sort(rng.uniform(0, duration_s, rng.poisson(rate * duration_s)))]
        server.serve(reqs, t0 + duration_s + TIMEOUT_S)
        ok = sum(1 for r in reqs if not math.isnan(r.done) and (r.first - r.arrival) * 1000 <= slo[0]
                 and (r.done - r.first) / max(1, r.out - 1) * 1000 <= slo[1])
        sms = [s for t, s in server.splits if t >= t0] or [round(TOTAL_SMS * initial[0] / 100)]
        out.append((float(rate), 100.0 * ok / max(1, len(reqs)), min(sms), max(sms)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 6, 8, 10, 12])
    ap.add_argument("--slo", type=float, nargs=2, default=[2000, 25], metavar=("TTFT_MS", "TPOT_MS"))
    ap.add_argument("--policies", nargs="+", choices=["static", "slo"], default=["static", "slo"])
    ap.add_argument("--seeds", type=int, default=3, help="runs per policy (seeds 0..N-1), attainment averaged")
    ap.add_argument("--duration-s", type=float, default=20.0)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.duration_s <= 0 or any(r <= 0 for r in args.rates):
        ap.error("--seeds must be >= 1, --duration-s and --rates > 0")
    print(f"simulated {args.shape}, SLO TTFT {args.slo[0]:g} ms / TPOT {args.slo[1]:g} ms, "
          f"{args.seeds} seed(s): attainment % (prefill SMs seen)")
    for policy in args.policies:
        runs = [simulate(args.shape, policy, args.rates, tuple(args.slo), s, args.duration_s)
                for s in range(args.seeds)]
        cells = []
        for i, rate in enumerate(args.rates):
            att = float(np.mean([run[i][1] for run in runs]))
            lo, hi = min(run[i][2] for run in runs), max(run[i][3] for run in runs)
            cells.append(f"{rate:g}: {att:5.1f} ({lo}-{hi})")
        print(f"  {policy:6s}  " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
