"""The static oracle: among saved runs of the static policy at several decode shares, the best one per SLO, and every
other run judged against it (a dynamic policy has to beat the best static split, not the default one).

    semipd-bench-serving --compare sweep.json --oracle static-d --oracle-slos 2000:15 2000:25

A run's score is its request rate at 90% attainment when it swept several rates, else its attainment at its one
rate (or load scale), with the per-phase attainment beside it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from semipd_server.bench import serving_data as data
from semipd_server.bench.serving_workload import phase_stats


def parse_slos(texts: Sequence[str]) -> list[tuple[float, float]]:
    """["2000:15", ...] -> [(TTFT ms, TPOT ms), ...]."""
    out = []
    for text in texts:
        try:
            ttft, tpot = (float(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"SLO {text!r}: expected TTFT_MS:TPOT_MS") from None
        if not (ttft > 0 and tpot > 0):
            raise ValueError(f"SLO {text!r}: both must be > 0")
        out.append((ttft, tpot))
    return out


def score(run: Mapping[str, Any], target: float = 0.9) -> tuple[float, str]:
    """(value, text): the rate at `target` attainment over a sweep, or the attainment (%) at a single rate."""
    points = [p for p in run["rates"] if math.isfinite(float(p["request_rate"]))]
    if len(points) == 1:
        att = points[0]["summary"]["slo_attainment"]
        value = 0.0 if att is None else 100.0 * att
        phases = points[0]["summary"].get("phases") or {}
        detail = ", ".join(f"{k} {100 * v['slo_attainment']:.1f}%" for k, v in phases.items())
        return value, f"{value:.1f}% attained" + (f" ({detail})" if detail else "")
    rate, kind = data.rate_at_attainment([float(p["request_rate"]) for p in points],
                                         [p["summary"]["slo_attainment"] for p in points], target)
    if rate is None:
        return 0.0, f"under {100 * target:g}% at every rate"
    return rate, (f"{rate:.3g} req/s" if kind == "interpolated" else f">= {rate:g} req/s") + \
        f" at {100 * target:g}%"


def oracle_report(runs: Sequence[Mapping[str, Any]], prefix: str, slos: Sequence[tuple[float, float]],
                  source: str = "results") -> str:
    """Per SLO: each static run (label starting with `prefix`), the best of them, and the other runs' ratio to it."""
    lines = []
    for ttft, tpot in slos:
        rescored = []
        for run in runs:
            run = data.rescore_run(run, ttft, tpot, source)
            for point in run["rates"]:
                if point["summary"].get("phases"):
                    point["summary"]["phases"] = phase_stats(point["requests"], ttft, tpot)
            rescored.append(run)
        statics = [r for r in rescored if r["label"].startswith(prefix)]
        lines.append(f"== static oracle at TTFT <= {ttft:g} ms, TPOT <= {tpot:g} ms")
        if not statics:
            lines.append(f"  no run labelled {prefix}*")
            continue
        scored = {r["label"]: score(r) for r in rescored}
        best = max(statics, key=lambda r: scored[r["label"]][0])["label"]
        for label, (value, text) in scored.items():
            if label == best:
                lines.append(f"  {label}: {text}  <- best static")
            else:
                base = scored[best][0]
                ratio = f" ({value / base:.2f}x best static)" if base > 0 else ""
                lines.append(f"  {label}: {text}{ratio}")
    return "\n".join(lines)
