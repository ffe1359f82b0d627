"""PNG plots of semipd-bench-serving results: SLO attainment vs rate, TTFT/TPOT CDFs, the SM split over time.

matplotlib is an optional dependency (`semipd-server[bench]`), imported only when plots are asked for."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semipd_server.bench.serving_data import format_rate

MISSING_MATPLOTLIB = ("--plot-dir needs matplotlib, an optional dependency: install the extra "
                      "`semipd-server[bench]` (pip install 'semipd-server[bench]'; in this repository "
                      "`uv sync` installs it with the dev group)")


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(MISSING_MATPLOTLIB) from e
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def write_plots(runs: Sequence[Mapping[str, Any]], plot_dir: Path, target: float = 0.9,
                rescored: bool = False) -> list[Path]:
    """Write the comparison PNGs into `plot_dir` and return their paths: SLO attainment vs rate (one line
    per label; `rescored`: the runs were re-scored under other SLOs), TTFT and TPOT CDFs (one line per label
    and rate), and the SM split over time when any run recorded a non-zero split from /metrics."""
    plt = _pyplot()
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_attainment(plt, runs, plot_dir / "slo_attainment_vs_rate.png", target, rescored),
               _plot_cdfs(plt, runs, plot_dir / "latency_cdf.png")]
    sm_path = _plot_sm_split(plt, runs, plot_dir / "sm_split_over_time.png")
    if sm_path is not None:
        written.append(sm_path)
    return written


def _finite_rates(run: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return sorted((p for p in run["rates"] if math.isfinite(float(p["request_rate"]))),
                  key=lambda p: float(p["request_rate"]))


def _plot_attainment(plt: Any, runs: Sequence[Mapping[str, Any]], path: Path, target: float,
                     rescored: bool) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        points = _finite_rates(run)
        ax.plot([float(p["request_rate"]) for p in points],
                [100.0 * (p["summary"]["slo_attainment"] or 0.0) for p in points], marker="o",
                label=run["label"])
    ax.axhline(100.0 * target, color="grey", linestyle="--", linewidth=1)
    first = runs[0]["rates"][0]["summary"] if runs and runs[0]["rates"] else {}
    note = "\nre-scored from saved requests" if rescored else ""
    ax.set_title(f"SLO attainment (TTFT <= {first.get('slo_ttft_ms', '?')} ms and "
                 f"TPOT <= {first.get('slo_tpot_ms', '?')} ms){note}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("requests within SLO (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cdf(ax: Any, values: Sequence[float | None], label: str, style: str) -> None:
    arr = np.sort(np.asarray([v for v in values if v is not None], dtype=np.float64))
    if arr.size:
        ax.plot(arr * 1000.0, np.arange(1, arr.size + 1) / arr.size, style, label=label,
                drawstyle="steps-post")


def _plot_cdfs(plt: Any, runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    fig, (ax_ttft, ax_tpot) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        for j, point in enumerate(sorted(run["rates"], key=lambda p: float(p["request_rate"]))):
            rows = [r for r in point["requests"] if r["ok"]]
            name = f"{run['label']} @ {format_rate(float(point['request_rate']))}/s"
            style = f"C{i % 10}{styles[j % len(styles)]}"
            _cdf(ax_ttft, [r["ttft"] for r in rows], name, style)
            _cdf(ax_tpot, [r["tpot"] for r in rows], name, style)
    for ax, title in ((ax_ttft, "TTFT"), (ax_tpot, "TPOT")):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sm_split(plt: Any, runs: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One panel per label: prefill/decode SMs on a timeline that runs through its rates one after another."""
    with_split = [run for run in runs
                  if any(any(s[1] or s[2] for s in p.get("sm_split") or []) for p in run["rates"])]
    if not with_split:
        return None
    fig, axes = plt.subplots(len(with_split), 1, figsize=(10, 3.2 * len(with_split)), squeeze=False)
    for ax, run in zip(axes[:, 0], with_split):
        t0, ts, prefill, decode = 0.0, [], [], []
        for point in sorted(run["rates"], key=lambda p: float(p["request_rate"])):
            samples = point.get("sm_split") or []
            if samples:  # hold the last value to the end of this rate's run
                samples = [*samples, [float(point["summary"]["duration_s"]), *samples[-1][1:]]]
            ts += [t0 + s[0] for s in samples]
            prefill += [s[1] for s in samples]
            decode += [s[2] for s in samples]
            ax.axvline(t0, color="grey", linewidth=0.8, linestyle=":")
            ax.text(t0, 1.0, f" {format_rate(float(point['request_rate']))}/s",
                    transform=ax.get_xaxis_transform(), va="top", fontsize="small")
            t0 += float(point["summary"]["duration_s"])
        ax.step(ts, prefill, where="post", label="prefill SMs")
        ax.step(ts, decode, where="post", label="decode SMs")
        ax.set_title(f"SM split over time: {run['label']}")
        ax.set_xlabel("time (s, rates run one after another)")
        ax.set_ylabel("SMs")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
