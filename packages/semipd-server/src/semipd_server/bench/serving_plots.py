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
    for run in runs:
        for point in run["rates"]:
            if (point["summary"].get("phases") or point.get("sm_split")) and point.get("requests"):
                name = f"timeline_{_slug(run['label'])}_{format_rate(float(point['request_rate']))}.png"
                written.append(_plot_timeline(plt, run["label"], point, plot_dir / name))
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _plot_timeline(plt: Any, label: str, point: Mapping[str, Any], path: Path, bin_s: float = 5.0) -> Path:
    """One rate's run over time, three panels on one time axis: arrivals per second (phases shaded), each
    request's TTFT and TPOT at its send time against the SLOs, and the SM split the server reported."""
    rows = sorted(point["requests"], key=lambda r: r["send_time"])
    summary = point["summary"]
    end = max(float(summary["duration_s"]), max(r["send_time"] for r in rows) + bin_s)
    fig, (ax_rate, ax_lat, ax_sm) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    edges = np.arange(0.0, end + bin_s, bin_s)
    counts, _ = np.histogram([r["send_time"] for r in rows], edges)
    ax_rate.step(edges[:-1], counts / bin_s, where="post", color="C0")
    ax_rate.set_ylabel(f"arrivals / s ({bin_s:g} s bins)")
    starts = [(r["send_time"], r.get("phase") or "") for i, r in enumerate(rows)
              if i == 0 or (r.get("phase") or "") != (rows[i - 1].get("phase") or "")]
    for i, (t0, name) in enumerate(starts):
        t1 = starts[i + 1][0] if i + 1 < len(starts) else end
        for ax in (ax_rate, ax_lat, ax_sm):
            ax.axvspan(t0, t1, color=f"C{i % 2 + 7}", alpha=0.08, linewidth=0)
        if name:
            ax_rate.text(t0, 1.0, f" {name}", transform=ax_rate.get_xaxis_transform(), va="top", fontsize="small")
    ok = [r for r in rows if r["ok"]]
    ax_lat.scatter([r["send_time"] for r in ok], [1000 * r["ttft"] for r in ok], s=6, label="TTFT", color="C1")
    tpot = [r for r in ok if r.get("tpot") is not None]
    ax_lat.scatter([r["send_time"] for r in tpot], [1000 * r["tpot"] for r in tpot], s=6, label="TPOT", color="C2")
    for key, color in (("slo_ttft_ms", "C1"), ("slo_tpot_ms", "C2")):
        if summary.get(key):
            ax_lat.axhline(summary[key], color=color, linestyle="--", linewidth=1)
    failed = [r["send_time"] for r in rows if not r["ok"]]
    if failed:
        ax_lat.scatter(failed, [summary.get("slo_ttft_ms") or 1000.0] * len(failed), marker="x", color="red",
                       s=12, label="failed")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("ms (dashed: SLOs)")
    ax_lat.legend(loc="upper right", fontsize="small")
    samples = point.get("sm_split") or []
    if samples:
        ts = [s[0] for s in samples] + [end]
        ax_sm.step(ts, [s[1] for s in samples] + [samples[-1][1]], where="post", label="prefill SMs")
        ax_sm.step(ts, [s[2] for s in samples] + [samples[-1][2]], where="post", label="decode SMs")
        ax_sm.legend(loc="lower right", fontsize="small")
    ax_sm.set_ylabel("SMs")
    ax_sm.set_ylim(bottom=0)
    ax_sm.set_xlabel("time since the first send (s)")
    att = summary.get("slo_attainment")
    fig.suptitle(f"{label} @ {format_rate(float(point['request_rate']))}: attainment "
                 f"{'-' if att is None else f'{100 * att:.1f}%'}")
    for ax in (ax_rate, ax_lat, ax_sm):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
