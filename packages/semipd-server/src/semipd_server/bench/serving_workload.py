"""Non-stationary workloads for semipd-bench-serving, where the load changes during a run (the case for moving the
SM split at all): phases of their own rate and lengths, a diurnal ramp, and replay of a JSONL trace. Each one is
a schedule: arrivals (send offset, request, phase name), and the per-phase SLO attainment of what came back.

    --phases long:60:6.5:3072:256,short:60:4:1024:1024 --phase-repeats 2   # NAME:SECONDS:REQ/S:IN:OUT,...
    --diurnal 120:0.6 --request-rates 5 --duration-s 240     # mean 5 req/s, +-60%, 120 s period, from the trough
    --trace trace.jsonl          # {"arrival_s": 0.12, "prompt_tokens": 812, "output_tokens": 64} per line

With --phases or --trace, each --request-rates value scales the load (1 = as given: phase rates, or trace arrival
times divided by it). Nothing here talks to a server."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semipd_server.bench.serving_data import SampleRequest, distribution, random_words

MakeLengths = Callable[[int, int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True, slots=True)
class Arrival:
    offset: float  # seconds from the start of the rate's run
    request: SampleRequest
    phase: str = ""


@dataclass(frozen=True, slots=True)
class PhaseSpec:
    name: str
    duration_s: float
    rate: float
    input_len: int
    output_len: int


def parse_phases(text: str) -> list[PhaseSpec]:
    """`NAME:SECONDS:REQ_PER_S:INPUT_LEN:OUTPUT_LEN`, comma-separated: `long:60:6.5:3072:256,short:60:4:1024:1024`."""
    phases = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        fields = part.split(":")
        if len(fields) != 5 or not fields[0]:
            raise ValueError(f"phase {i + 1} {part!r}: expected NAME:SECONDS:REQ_PER_S:INPUT_LEN:OUTPUT_LEN")
        try:
            spec = PhaseSpec(fields[0], float(fields[1]), float(fields[2]), int(fields[3]), int(fields[4]))
        except ValueError:
            raise ValueError(f"phase {i + 1} {part!r}: SECONDS and REQ_PER_S must be numbers, the lengths "
                             "integers") from None
        if not (spec.duration_s > 0 and math.isfinite(spec.duration_s)) or not (
                spec.rate > 0 and math.isfinite(spec.rate)) or spec.input_len < 1 or spec.output_len < 1:
            raise ValueError(f"phase {i + 1} {part!r}: seconds and rate must be > 0, lengths >= 1")
        phases.append(spec)
    return phases


def uniform_lengths(range_ratio: float, max_model_len: int) -> MakeLengths:
    """Prompt and output lengths uniform in len x (1 +- range_ratio), cut so that both fit max_model_len."""
    def make(n: int, input_len: int, output_len: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        def spread(x: int) -> np.ndarray:
            lo, hi = max(1, int(x * (1 - range_ratio))), max(1, int(x * (1 + range_ratio)))
            return rng.integers(lo, hi + 1, size=n)
        ins, outs = spread(input_len), spread(output_len)
        outs = np.minimum(outs, max_model_len - 1)
        return np.maximum(1, np.minimum(ins, max_model_len - outs)), outs
    return make


def gamma_offsets(rate: float, burstiness: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets in [0, duration_s) of a gamma renewal process: gaps of mean 1/rate and shape `burstiness`
    (1 = Poisson; < 1 burstier: the gaps' coefficient of variation is 1/sqrt(burstiness))."""
    n = int(rate * duration_s * 1.5 + 10 * math.sqrt(rate * duration_s) + 10)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    offsets = np.cumsum(gaps) - gaps[0] * rng.random()  # a random phase: the first send is not always at 0
    return offsets[(offsets >= 0) & (offsets < duration_s)]


def phased_schedule(phases: Sequence[PhaseSpec], repeats: int, scale: float, burstiness: float,
                    lengths: MakeLengths, rng: np.random.Generator) -> list[Arrival]:
    """Each phase in turn (all of them `repeats` times): gamma arrivals at scale x its rate for its duration,
    prompt and output lengths from `lengths(n, input_len, output_len, rng)`."""
    out, start = [], 0.0
    for _ in range(repeats):
        for ph in phases:
            offsets = gamma_offsets(ph.rate * scale, burstiness, ph.duration_s, rng)
            ins, outs = lengths(len(offsets), ph.input_len, ph.output_len, rng)
            out += [Arrival(start + float(t), SampleRequest(random_words(int(i), rng), int(i), int(o)), ph.name)
                    for t, i, o in zip(offsets, ins, outs, strict=True)]
            start += ph.duration_s
    return out


def diurnal_offsets(mean_rate: float, period_s: float, amplitude: float, duration_s: float,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """A Poisson process of rate mean_rate x (1 - amplitude cos(2 pi t / period)) (from the trough up), by
    thinning; each arrival labelled "high" or "low" by whether the rate was above the mean then."""
    if not 0 <= amplitude < 1 or not period_s > 0 or not mean_rate > 0:
        raise ValueError(f"diurnal needs a rate > 0, a period > 0 and an amplitude in [0, 1), got {mean_rate}, "
                         f"{period_s}, {amplitude}")
    peak = mean_rate * (1 + amplitude)
    candidates = np.sort(rng.uniform(0, duration_s, rng.poisson(peak * duration_s)))
    factor = 1 - amplitude * np.cos(2 * math.pi * candidates / period_s)
    kept = candidates[rng.random(len(candidates)) < mean_rate * factor / peak]
    above = np.cos(2 * math.pi * kept / period_s) < 0
    return kept, ["high" if a else "low" for a in above]


@dataclass(frozen=True, slots=True)
class TraceRow:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    phase: str = ""


def load_trace(path: Path) -> list[TraceRow]:
    """One JSON object per line: arrival_s (seconds from the trace's start, >= 0), prompt_tokens and output_tokens
    (ints >= 1), optional phase (a string). Blank lines are skipped; anything else wrong names the line. Rows
    come back sorted by arrival."""
    if not path.is_file():
        raise ValueError(f"trace {str(path)!r} is not a file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"trace {path.name} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object with arrival_s, prompt_tokens, output_tokens")
        missing = [k for k in ("arrival_s", "prompt_tokens", "output_tokens") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        t, p, o = obj["arrival_s"], obj["prompt_tokens"], obj["output_tokens"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"{where}: arrival_s must be a finite number >= 0, got {t!r}")
        for key, v in (("prompt_tokens", p), ("output_tokens", o)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{where}: {key} must be an int >= 1, got {v!r}")
        phase = obj.get("phase", "")
        if not isinstance(phase, str):
            raise ValueError(f"{where}: phase must be a string, got {phase!r}")
        rows.append(TraceRow(float(t), p, o, phase))
    if not rows:
        raise ValueError(f"trace {str(path)!r} has no requests")
    return sorted(rows, key=lambda r: r.arrival_s)


def trace_schedule(rows: Sequence[TraceRow], scale: float, max_model_len: int,
                   rng: np.random.Generator) -> list[Arrival]:
    """The trace at `scale` x its load (arrival times divided by it); prompts cut to fit max_model_len."""
    out = []
    for r in rows:
        output = min(r.output_tokens, max_model_len - 1)
        prompt = max(1, min(r.prompt_tokens, max_model_len - output))
        out.append(Arrival(r.arrival_s / scale, SampleRequest(random_words(prompt, rng), prompt, output), r.phase))
    return out


def phase_stats(rows: Sequence[Mapping[str, Any]], slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    """Per phase (in order of first send) from saved request rows: requests, SLO attainment, offered rate over
    the phase's sends, TTFT p50/p90 and TPOT p90 (ms). Empty when no row has a phase."""
    by_phase: dict[str, list[Mapping[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["send_time"]):
        if row.get("phase"):
            by_phase.setdefault(row["phase"], []).append(row)
    out = {}
    for name, mine in by_phase.items():
        ok = [r for r in mine if r["ok"]]
        within = sum(1 for r in ok if r["ttft"] * 1000 <= slo_ttft_ms
                     and (r.get("tpot") is None or r["tpot"] * 1000 <= slo_tpot_ms))
        ttft = distribution([r["ttft"] for r in ok])
        tpot = distribution([r["tpot"] for r in ok if r.get("tpot") is not None])
        out[name] = {"num_requests": len(mine), "slo_attainment": within / len(mine),
                     "ttft_p50_ms": ttft["p50"], "ttft_p90_ms": ttft["p90"], "tpot_p90_ms": tpot["p90"]}
    return out
