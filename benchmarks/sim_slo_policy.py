"""Closed-loop simulation of the SLO policy against static splits on CPU (the engine: `sim_engine.py`).

Stationary workload (gpu_suite.sh's sweep: 3k +- 50% prompts, 256 +- 50% outputs, `--duration-s` of Poisson
arrivals per rate, rates one after another on one server) or the phased one (`--workload phased`: long prompts,
then short prompts with long outputs, 60 s each, twice; `--rates` scale its phase rates). `--oracle` adds the
static splits at decode 20..80%, and the best of them per column; `--ablate TERM` re-runs the slo policy with one
of its terms switched off (see `slo_partitioner`'s docstring), to show what each term changes.

    python benchmarks/sim_slo_policy.py --shape 8b --rates 6 8 10 12 --slo 2000 25 --seeds 3
    python benchmarks/sim_slo_policy.py --workload phased --rates 1 --slo 2000 15 --oracle --ablate served
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sim_engine beside this file, however it is run
from sim_engine import (
    SHAPES,
    TOTAL_SMS,
    Phase,
    Server,
    make_requests,
    phased,
    startup_profile,
    stationary,
)

from semipd_runtime import slo_config
from semipd_runtime.slo_partitioner import LoadState, SloPartitioner, SloPartitionerConfig
from semipd_runtime.slo_profile import profile_splits

TIMEOUT_S = 60.0


def _running_batch(self: SloPartitioner, load: LoadState, d_share: float, rate: float) -> tuple[float, float]:
    if load.decode_batch < 1:
        return 1.0, load.mean_prompt_tokens
    return load.decode_batch, load.decode_context_tokens


def _no_max_tokens(self: SloPartitioner, t: float, prompt_tokens: int, max_output_tokens: int = 0) -> None:
    SloPartitioner.observe_arrival(self, t, prompt_tokens)


# each term of the policy (slo_partitioner's docstring) -> (config overrides, partitioner methods) that drop it
ABLATIONS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "steady_batch": ({}, {"steady_batch": _running_batch}),  # TPOT at the running batch, as before
    "max_tokens": ({}, {"observe_arrival": _no_max_tokens}),  # L from finished requests only
    "swing": ({}, {"batch_swing": staticmethod(lambda batch: 1.0)}),
    "served": ({}, {"served_share": staticmethod(lambda offered, admit, p_tpot, kept: 1.0)}),
    "kept": ({}, {"served_share": staticmethod(  # G as before the H100 phased run: admitted counts as served
        lambda offered, admit, p_tpot, kept: SloPartitioner.served_share(offered, admit, p_tpot, 1.0))}),
    "light_load": ({}, {"by_ttft": property(lambda self: False)}),
    "backlog": ({}, {"queued_s": lambda self, load, p_share, slot_s: 0.0}),
    "slots": ({"max_decode_batch": None}, {}),
    "slot_frees": ({}, {"slot_wait_s": lambda self, load, past, slot_s: max(0.0, past) * slot_s}),
    "change": ({}, {"_no_change": True}),  # the tracker never reads a change from the latest arrivals
    "load_band": ({"load_confidence_z": 0.0}, {}),
    "rescue": ({}, {"rescues": staticmethod(lambda best, current, load: False)}),
    "dwell": ({"min_dwell_s": 0.0}, {}),
    "reversal": ({}, {"reverses": lambda self, best, current, load: False}),
}


@dataclass
class Column:
    """One rate (stationary) or phase (phased) of a run: requests, attainment %, TTFT p50, prefill SMs seen."""

    name: str
    requests: int
    attainment: float
    ttft_p50_ms: float
    sms: tuple[int, int]


@dataclass
class SimRun:
    columns: list[Column]
    overall: float  # attainment % over every request
    per_load: list[float]  # attainment % of each workload (rate or phase scale), in order
    moves: int
    moves_back: int  # moves that reverse the direction of the previous one
    server: Server


def nearest_split(decode_percent: float) -> tuple[float, float]:
    """The candidate split `--decode-sm-percent` runs as on the GPU (decode's SMs rounded up to a multiple of 8)."""
    return slo_config.nearest_split(SloPartitionerConfig().candidates or (), (100 - decode_percent, decode_percent))


# decode 20..80% in steps of 5, each kept only where it runs a different split than the step before (30 runs as 25)
ORACLE_DECODE_PERCENTS = tuple(d for d in range(20, 85, 5) if d == 20 or nearest_split(d) != nearest_split(d - 5))


def make_server(shape: str, policy: str, slo: tuple[float, float], seed: int, decode_percent: float = 40.0,
                ablate: Sequence[str] = (), grain: int = 0, contention: float = 0.0, **cfg_kwargs: object) -> Server:
    steps, rng = SHAPES[shape], np.random.default_rng(seed)
    initial = nearest_split(decode_percent)
    overrides: dict[str, object] = {"max_decode_batch": 64, **cfg_kwargs}
    methods: dict[str, object] = {}
    for term in ablate:
        overrides.update(ABLATIONS[term][0])
        methods.update(ABLATIONS[term][1])
    cfg = SloPartitionerConfig(slo_ttft_ms=slo[0], slo_tpot_ms=slo[1], policy=policy, initial_split=initial,
                               total_sms=TOTAL_SMS, **overrides)  # type: ignore[arg-type]
    no_change = bool(methods.pop("_no_change", False))
    kind = type("AblatedPartitioner", (SloPartitioner,), methods) if methods else SloPartitioner
    p = kind(cfg, startup_profile(steps, [s[0] for s in profile_splits(cfg.candidates or (), initial, 3)], grain))
    if no_change:
        p.tracker.change_arrivals = 10**9
    return Server(steps, p, rng, grain=grain, contention=contention)


def run(shape: str, policy: str, workloads: Sequence[Sequence[Phase]], slo: tuple[float, float], seed: int,
        decode_percent: float = 40.0, ablate: Sequence[str] = (), phase_decode: dict[str, float] | None = None,
        grain: int = 0, contention: float = 0.0, **cfg_kwargs: object) -> SimRun:
    """Serve each workload (a list of phases back to back) after the previous one on one server; one column per
    phase name in order of first appearance (repeats of a phase pool their requests). `phase_decode` (phase name
    -> decode %) forces that split at each such phase's start: a static split that knows the phases."""
    server = make_server(shape, policy, slo, seed, decode_percent, ablate, grain, contention, **cfg_kwargs)
    by_name: dict[str, list] = {}
    per_load: list[float] = []
    for i, phases in enumerate(workloads):
        t0 = server.t + 1
        start = t0
        for ph in phases:
            if phase_decode is not None:
                server.schedule.append((start, nearest_split(phase_decode[ph.name])))
            start += ph.duration_s
        # the same requests whatever the policy (the server's own rng draws step noise, as many as it runs steps)
        reqs = make_requests(phases, np.random.default_rng([seed, i]), t0)
        end = t0 + sum(ph.duration_s for ph in phases)
        server.serve(reqs, end + TIMEOUT_S)
        per_load.append(100.0 * sum(r.meets(slo) for r in reqs) / max(1, len(reqs)))
        start = t0
        for ph in phases:
            mine = [r for r in reqs if start <= r.arrival < start + ph.duration_s]
            entry = by_name.setdefault(ph.name, [[], []])
            entry[0] += mine
            entry[1] += server.sms_between(start, start + ph.duration_s)
            start += ph.duration_s
    columns, everyone = [], []
    default_sms = round(TOTAL_SMS * server.p.config.initial_split[0] / 100) if server.p.config.initial_split else 0
    for name, (reqs, sms) in by_name.items():
        ok = sum(r.meets(slo) for r in reqs)
        ttft = [1000 * (r.first - r.arrival) for r in reqs if r.first == r.first]
        sms = sms or [default_sms]
        columns.append(Column(name, len(reqs), 100.0 * ok / max(1, len(reqs)),
                              float(np.median(ttft)) if ttft else float("nan"), (min(sms), max(sms))))
        everyone += reqs
    path = [d.prefill_sms for d in server.decisions if d.changed]
    start_sms = [default_sms, *path]
    steps = [b - a for a, b in itertools.pairwise(start_sms)]
    back = sum(1 for a, b in itertools.pairwise(steps) if a * b < 0)
    overall = 100.0 * sum(r.meets(slo) for r in everyone) / max(1, len(everyone))
    return SimRun(columns, overall, per_load, len(path), back, server)


def simulate(shape: str, policy: str, rates: Sequence[float], slo: tuple[float, float], seed: int,
             duration_s: float = 20.0, decode_percent: float = 40.0) -> list[tuple[float, float, int, int]]:
    """Stationary workload: [(rate, attainment %, min prefill SMs, max prefill SMs)] for "static" or "slo"."""
    out = run(shape, policy, [[stationary(r, duration_s)] for r in rates], slo, seed, decode_percent)
    return [(float(r), c.attainment, *c.sms) for r, c in zip(rates, out.columns, strict=True)]


def bench_phases(spec: str, scale: float = 1.0, repeats: int = 2) -> list[Phase]:
    """The bench client's `--phases` (NAME:SECONDS:REQ_PER_S:IN:OUT,...) with its lengths +-50% (gpu_suite.sh's
    --range-ratio 0.5), rates times `scale`, the sequence `repeats` times: a workload tried here runs unchanged
    as the GPU stage's SLO_PHASES."""
    from semipd_server.bench.serving_workload import parse_phases

    def spread(x: int) -> tuple[int, int]:
        return max(1, int(x * 0.5)), max(1, int(x * 1.5))

    return [Phase(p.name, p.duration_s, p.rate * scale, spread(p.input_len), spread(p.output_len))
            for p in parse_phases(spec)] * repeats


def workloads_for(kind: str, rates: Sequence[float], duration_s: float, phase_s: float = 60.0,
                  phases: str | None = None) -> list[list[Phase]]:
    if kind == "phased":  # one run per scale; each column name says the scale and the phase
        return [[dataclasses.replace(ph, name=f"x{r:g} {ph.name}")
                 for ph in (bench_phases(phases, r) if phases else phased(r, duration_s=phase_s))] for r in rates]
    return [[stationary(r, duration_s)] for r in rates]


def rate_at(rates: Sequence[float], attainment: Sequence[float], goal: float = 90.0) -> float:
    """The highest rate (or scale) at which attainment is still >= goal, interpolated linearly to the first rate
    past it that misses (rates ascending); nan if the lowest rate misses already, the highest if none does."""
    if not attainment or attainment[0] < goal:
        return math.nan
    for (r0, a0), (r1, a1) in itertools.pairwise(zip(rates, attainment, strict=True)):
        if a1 < goal:
            return r0 + (r1 - r0) * (a0 - goal) / (a0 - a1)
    return float(rates[-1])


def phase_oracle(shape: str, loads: Sequence[Sequence[Phase]], slo: tuple[float, float], seeds: int,
                 start: dict[str, float], contention: float = 0.0) -> tuple[dict[str, float], float]:
    """A static split per phase that knows the phases (switched at each phase's start): coordinate ascent on overall
    attainment from `start` (each phase's best static split), one phase at a time over the oracle's grid, until no
    phase's split improves it. Not an upper bound for a dynamic policy (one split per phase, backlog included),
    but what knowing the phases alone buys."""
    def score(per_phase: dict[str, float]) -> float:
        return float(np.mean([run(shape, "static", loads, slo, s, phase_decode=per_phase, contention=contention).overall
                              for s in range(seeds)]))

    best, best_score = dict(start), score(start)
    improved = True
    while improved:
        improved = False
        for name in best:
            for d in ORACLE_DECODE_PERCENTS:
                if nearest_split(d) == nearest_split(best[name]):
                    continue
                trial = {**best, name: float(d)}
                if (sc := score(trial)) > best_score + 1e-9:
                    best, best_score, improved = trial, sc, True
    return best, best_score


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--workload", choices=["stationary", "phased"], default="stationary")
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 6, 8, 10, 12],
                    help="req/s (stationary) or load scales of the phases (phased)")
    ap.add_argument("--slo", type=float, nargs=2, default=[2000, 25], metavar=("TTFT_MS", "TPOT_MS"))
    ap.add_argument("--policies", nargs="+", choices=["static", "slo"], default=["static", "slo"])
    ap.add_argument("--oracle", action="store_true", help="also static at decode 20..80%% and their best")
    ap.add_argument("--phase-oracle", action="store_true",
                    help="with --oracle on the phased workload: also the best static split per phase (slow)")
    ap.add_argument("--ablate", nargs="+", default=[], choices=sorted(ABLATIONS) or None,
                    help="also the slo policy without each of these terms")
    ap.add_argument("--seeds", type=int, default=3, help="runs per policy (seeds 0..N-1), attainment averaged")
    ap.add_argument("--duration-s", type=float, default=20.0, help="arrival window per rate (stationary)")
    ap.add_argument("--phase-s", type=float, default=60.0, help="seconds per phase (phased; the GPU stage: 25)")
    ap.add_argument("--grain", type=int, default=0, metavar="SMS",
                    help="run each split on the SMs green contexts grant (decode rounded up to a multiple of SMS; "
                         "8 on Hopper) while the policy sees the split asked (default 0: as asked). The policy's "
                         "candidates are granted splits already: this matters only for other candidate sets")
    ap.add_argument("--contention", type=float, default=0.0, metavar="C",
                    help="prefill runs 1 + C x (decode batch / 64) times slower beside decode, while the start-up "
                         "profile runs without it, as on the GPU (default 0)")
    ap.add_argument("--phases", default=None, metavar="NAME:S:REQ_PER_S:IN:OUT,...",
                    help="phased: these phases (the bench client's syntax, lengths +-50%%, twice) instead of the "
                         "built-in long/short pair")
    args = ap.parse_args(argv)
    if args.contention < 0:
        ap.error("--contention must be >= 0")
    if args.seeds < 1 or args.duration_s <= 0 or args.phase_s <= 0 or any(r <= 0 for r in args.rates):
        ap.error("--seeds must be >= 1, --duration-s, --phase-s and --rates > 0")
    if list(args.rates) != sorted(args.rates):
        ap.error("--rates must be ascending")
    slo = (float(args.slo[0]), float(args.slo[1]))
    if args.phases is not None and args.workload != "phased":
        ap.error("--phases needs --workload phased")
    try:
        loads = workloads_for(args.workload, args.rates, args.duration_s, args.phase_s, args.phases)
    except ValueError as e:
        ap.error(f"--phases: {e}")
    rows: list[tuple[str, str, list[str], dict]] = [(p, p, [], {}) for p in args.policies]
    if args.oracle:
        rows += [(f"static-d{d}", "static", [], {"decode_percent": float(d)}) for d in ORACLE_DECODE_PERCENTS]
    rows += [(f"slo-{t}", "slo", [t], {}) for t in args.ablate]
    print(f"simulated {args.shape}, {args.workload}, SLO TTFT {slo[0]:g} ms / TPOT {slo[1]:g} ms, "
          f"{args.seeds} seed(s): attainment % (prefill SMs seen) [TTFT p50 ms]; moves (back)")
    table: dict[str, list[float]] = {}
    rates, at90 = list(args.rates), dict[str, float]()
    for label, policy, ablate, kw in rows:
        runs = [run(args.shape, policy, loads, slo, s, ablate=ablate, grain=args.grain, contention=args.contention,
                    **kw)
                for s in range(args.seeds)]
        cells = []
        for i, col in enumerate(runs[0].columns):
            att = float(np.mean([r.columns[i].attainment for r in runs]))
            p50 = float(np.mean([r.columns[i].ttft_p50_ms for r in runs]))
            lo, hi = min(r.columns[i].sms[0] for r in runs), max(r.columns[i].sms[1] for r in runs)
            table.setdefault(label, []).append(att)
            cells.append(f"{col.name}: {att:5.1f} ({lo}-{hi}) [{p50:.0f}]")
        overall = float(np.mean([r.overall for r in runs]))
        moves, back = sum(r.moves for r in runs) / len(runs), sum(r.moves_back for r in runs) / len(runs)
        per_load = np.mean([r.per_load for r in runs], axis=0)
        at90[label] = rate_at(rates, list(per_load))
        print(f"  {label:14s}  " + "   ".join(cells) + f"   | all {overall:5.1f}; moves {moves:g} ({back:g})"
              + (f"; 90% up to {at90[label]:.3g}" if len(rates) > 1 else ""))
    statics = [k for k in table if k.startswith("static-d")]
    if statics:
        best = [max(statics, key=lambda k: table[k][i]) for i in range(len(next(iter(table.values()))))]
        print("  best static     " + "   ".join(f"{b} {table[b][i]:5.1f}" for i, b in enumerate(best)))
        if len(rates) > 1:
            top = max(statics, key=lambda k: -1.0 if math.isnan(at90[k]) else at90[k])
            print(f"  90% attainment up to: best static {top} {at90[top]:.3g}; "
                  + ", ".join(f"{k} {at90[k]:.3g} ({at90[k] / at90[top]:.2f}x)" for k in at90 if k not in statics))
        if args.workload == "phased" and args.phase_oracle:
            names = [c.name for c in runs[0].columns]
            start = {n: float(b.removeprefix("static-d")) for n, b in zip(names, best, strict=True)}
            per_phase, overall = phase_oracle(args.shape, loads, slo, args.seeds, start, args.contention)
            print(f"  {'phase oracle':14s}  " + "   ".join(f"{n}: d{d:g}" for n, d in per_phase.items())
                  + f"   | all {overall:5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
