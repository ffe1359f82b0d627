"""Non-stationary workloads of semipd-bench-serving (`semipd_server.bench.serving_workload`): the arrival processes'
statistics with fixed seeds, trace parsing (every bad line named), per-phase attainment, and the CLI end to end
against the scripted SSE server of test_bench_serving."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from semipd_server.bench import serving as bench_serving
from semipd_server.bench import serving_oracle as oracle
from semipd_server.bench import serving_workload as wl

sys.path.insert(0, str(Path(__file__).parent))  # importlib import mode: the scripted server's module beside this
from test_bench_serving import ScriptedServer, scripted  # noqa: F401 - the fixture

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_arrivals_keep_the_rate_and_the_burstiness(burstiness: float) -> None:
    offsets = wl.gamma_offsets(8.0, burstiness, 5000.0, np.random.default_rng(2))
    assert offsets.min() >= 0 and offsets.max() < 5000.0 and np.all(np.diff(offsets) >= 0)
    assert len(offsets) / 5000.0 == pytest.approx(8.0, rel=0.04)
    gaps = np.diff(offsets)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_phased_schedule_runs_each_phase_at_its_rate_and_lengths() -> None:
    phases = wl.parse_phases("long:60:6.5:3072:256, short:60:4:1024:1024")
    assert phases == [wl.PhaseSpec("long", 60.0, 6.5, 3072, 256), wl.PhaseSpec("short", 60.0, 4.0, 1024, 1024)]
    sched = wl.phased_schedule(phases, 2, 1.5, 1.0, wl.uniform_lengths(0.5, 8192), np.random.default_rng(0))
    windows = [("long", 0, 60), ("short", 60, 120), ("long", 120, 180), ("short", 180, 240)]
    for name, t0, t1 in windows:
        mine = [a for a in sched if t0 <= a.offset < t1]
        assert {a.phase for a in mine} == {name}
        spec = phases[0] if name == "long" else phases[1]
        expected = spec.rate * 1.5 * 60
        assert abs(len(mine) - expected) < 4 * math.sqrt(expected)  # Poisson count, 4 standard deviations
        ins = [a.request.prompt_len for a in mine]
        outs = [a.request.output_len for a in mine]
        assert min(ins) >= spec.input_len // 2 and max(ins) <= spec.input_len * 3 // 2
        assert min(outs) >= spec.output_len // 2 and max(outs) <= spec.output_len * 3 // 2
        assert abs(np.mean(ins) - spec.input_len) < 0.1 * spec.input_len
    for bad, needle in (("long:60:6.5:3072", "expected NAME"), ("a:x:1:1:1", "must be numbers"),
                        ("a:60:0:10:10", "must be > 0"), ("a:60:1:10:0", "lengths >= 1"), (":60:1:1:1", "NAME")):
        with pytest.raises(ValueError, match=needle):
            wl.parse_phases(bad)


def test_diurnal_rate_follows_the_cosine() -> None:
    offsets, labels = wl.diurnal_offsets(5.0, 100.0, 0.6, 4000.0, np.random.default_rng(3))
    assert len(offsets) / 4000.0 == pytest.approx(5.0, rel=0.05)
    high = sum(1 for x in labels if x == "high")
    # the half-periods above and below the mean hold (1 +- 2A/pi) of the arrivals
    assert high / len(labels) == pytest.approx((1 + 2 * 0.6 / math.pi) / 2, abs=0.02)
    early = np.sum((offsets % 100.0) < 10.0) / np.sum(((offsets % 100.0) >= 45.0) & ((offsets % 100.0) < 55.0))
    assert early < 0.35  # the trough (t = 0 mod period) is ~4x quieter than the peak (t = 50)
    with pytest.raises(ValueError, match="amplitude"):
        wl.diurnal_offsets(5.0, 100.0, 1.0, 10.0, np.random.default_rng(0))


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_trace_parses_sorts_and_scales(tmp_path: Path) -> None:
    path = write(tmp_path / "t.jsonl", [
        '{"arrival_s": 2.0, "prompt_tokens": 100, "output_tokens": 10, "phase": "b"}',
        "",
        '{"arrival_s": 0.5, "prompt_tokens": 9000, "output_tokens": 20}',
    ])
    rows = wl.load_trace(path)
    assert rows == [wl.TraceRow(0.5, 9000, 20, ""), wl.TraceRow(2.0, 100, 10, "b")]
    sched = wl.trace_schedule(rows, 2.0, 4096, np.random.default_rng(0))
    assert [a.offset for a in sched] == [0.25, 1.0] and [a.phase for a in sched] == ["", "b"]
    assert sched[0].request.prompt_len == 4096 - 20 and sched[0].request.output_len == 20  # cut to fit


@pytest.mark.parametrize(("line", "needle"), [
    ("not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: expected an object"),
    ('{"arrival_s": 1.0, "prompt_tokens": 5}', "line 2: missing output_tokens"),
    ('{"arrival_s": -1, "prompt_tokens": 5, "output_tokens": 5}', "line 2: arrival_s must be"),
    ('{"arrival_s": NaN, "prompt_tokens": 5, "output_tokens": 5}', "line 2: arrival_s must be"),
    ('{"arrival_s": 1, "prompt_tokens": 5.5, "output_tokens": 5}', "line 2: prompt_tokens must be"),
    ('{"arrival_s": 1, "prompt_tokens": true, "output_tokens": 5}', "line 2: prompt_tokens must be"),
    ('{"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 0}', "line 2: output_tokens must be"),
    ('{"arrival_s": 1, "prompt_tokens": 5, "output_tokens": 5, "phase": 3}', "line 2: phase must be"),
])
def test_trace_bad_lines_are_named(tmp_path: Path, line: str, needle: str) -> None:
    path = write(tmp_path / "bad.jsonl", ['{"arrival_s": 0, "prompt_tokens": 5, "output_tokens": 5}', line])
    with pytest.raises(ValueError, match=f"trace bad.jsonl {needle}"):
        wl.load_trace(path)


def test_trace_empty_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no requests"):
        wl.load_trace(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ValueError, match="is not a file"):
        wl.load_trace(tmp_path / "nope.jsonl")


def test_phase_stats_per_phase_attainment() -> None:
    def row(t: float, phase: str, ttft: float, tpot: float | None, ok: bool = True) -> dict:
        return {"send_time": t, "phase": phase, "ok": ok, "ttft": ttft if ok else None, "tpot": tpot}

    rows = [row(0, "a", 0.1, 0.01), row(1, "a", 3.0, 0.01), row(2, "b", 0.1, 0.05), row(3, "b", 0.1, None),
            row(4, "b", 0, None, ok=False)]
    stats = wl.phase_stats(rows, 2000.0, 20.0)
    assert list(stats) == ["a", "b"]
    assert stats["a"]["num_requests"] == 2 and stats["a"]["slo_attainment"] == 0.5
    assert stats["b"]["num_requests"] == 3 and stats["b"]["slo_attainment"] == pytest.approx(1 / 3)
    assert stats["a"]["ttft_p50_ms"] == pytest.approx(1550.0)
    assert wl.phase_stats([{**r, "phase": ""} for r in rows], 2000.0, 20.0) == {}


def test_cli_phases_and_trace_report_each_phase(scripted: ScriptedServer, tmp_path: Path,  # noqa: F811
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    base = ["--base-url", scripted.url, "--metrics-interval-s", "0.2", "--slo-ttft-ms", "5000",
            "--slo-tpot-ms", "1000", "--no-progress", "--out", str(out)]
    assert bench_serving.main(base + ["--label", "phased", "--phases", "a:0.6:10:6:3,b:0.6:10:8:4",
                                      "--phase-repeats", "2", "--request-rates", "1"]) == 0
    trace = write(tmp_path / "t.jsonl", [json.dumps({"arrival_s": 0.1 * i, "prompt_tokens": 5,
                                                     "output_tokens": 3, "phase": "x" if i < 3 else "y"})
                                         for i in range(6)])
    assert bench_serving.main(base + ["--label", "trace", "--trace", str(trace), "--request-rates", "2"]) == 0
    assert bench_serving.main(base + ["--label", "diurnal", "--diurnal", "1:0.5", "--duration-s", "1",
                                      "--request-rates", "10", "--input-len", "6", "--output-len", "3"]) == 0
    text = capsys.readouterr().out
    assert "phase a:" in text and "phase b:" in text and "phase y:" in text
    phased, replay, diurnal = json.loads(out.read_text())["runs"]
    rows = diurnal["rates"][0]["requests"]
    assert rows and {r["phase"] for r in rows} <= {"high", "low"} and max(r["send_time"] for r in rows) < 1.5
    summary = phased["rates"][0]["summary"]
    assert list(summary["phases"]) == ["a", "b"] and summary["phases"]["a"]["slo_attainment"] == 1.0
    assert sum(p["num_requests"] for p in summary["phases"].values()) == summary["num_requests"]
    sends = {r["phase"]: [] for r in phased["rates"][0]["requests"]}
    for r in phased["rates"][0]["requests"]:
        sends[r["phase"]].append(r["send_time"])
    assert max(sends["a"]) < 1.8 and min(sends["b"]) > 0.5  # a, b, a, b: each 0.6 s
    rows = replay["rates"][0]["requests"]
    assert len(rows) == 6 and max(r["send_time"] for r in rows) < 0.5  # 0.5 s of trace at twice its load
    assert list(replay["rates"][0]["summary"]["phases"]) == ["x", "y"]
    # re-scored under a TTFT SLO nobody meets: per-phase attainment follows
    assert bench_serving.main(["--compare", str(out), "--slo-ttft-ms", "1", "--slo-tpot-ms", "1000"]) == 0
    if HAVE_MATPLOTLIB:
        plots = tmp_path / "plots"
        assert bench_serving.main(["--compare", str(out), "--plot-dir", str(plots)]) == 0
        png = (plots / "timeline_phased_1.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_cli_rejects_bad_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in ((["--phases", "a:1:1:1"], "--phases: phase 1"),
                         (["--phases", "a:1:1:1:1", "--trace", "x.jsonl"], "different workloads"),
                         (["--diurnal", "60:0.5"], "--diurnal needs"),
                         (["--diurnal", "60", "--duration-s", "10"], "PERIOD_S:AMPLITUDE"),
                         (["--phase-repeats", "0"], "--phase-repeats must be >= 1"),
                         (["--oracle", "static-d"], "--oracle judges saved runs"),
                         (["--compare", "x.json", "--oracle-slos", "zz"], "--oracle-slos: SLO 'zz'")):
        with pytest.raises(SystemExit):
            bench_serving.main(argv)
        assert needle in capsys.readouterr().err


def fake_run(label: str, points: dict[float, list[tuple[float, float]]]) -> dict:
    """A saved run: per rate, requests as (TTFT s, TPOT s), 11 output tokens each, phase "p" for the first half."""
    rates = []
    for rate, reqs in points.items():
        rows = [{"ok": True, "send_time": float(i), "ttft": ttft, "tpot": tpot, "e2e": ttft + 10 * tpot,
                 "output_tokens": 11, "phase": "p" if i < len(reqs) / 2 else "q"}
                for i, (ttft, tpot) in enumerate(reqs)]
        rates.append({"request_rate": rate, "requests": rows,
                      "summary": {"num_requests": len(rows), "duration_s": 10.0, "phases": {"p": {}, "q": {}}}})
    return {"label": label, "rates": rates}


def test_static_oracle_judges_every_run_against_the_best_static_split() -> None:
    good, slow_tpot, slow_ttft = (0.5, 0.010), (0.5, 0.020), (3.0, 0.010)
    runs = [fake_run("static-d30", {4.0: [good] * 10, 8.0: [good] * 5 + [slow_ttft] * 5}),
            fake_run("static-d40", {4.0: [good] * 10, 8.0: [good] * 8 + [slow_tpot] * 2}),
            fake_run("slo", {4.0: [good] * 10, 8.0: [good] * 10})]
    text = oracle.oracle_report(runs, "static-d", [(2000.0, 15.0), (2000.0, 25.0)])
    tight, loose = text.split("== static oracle")[1:]
    # TPOT 15 ms: d40 reaches 90% at 4 + 4 x (1 - 0.9) / (1 - 0.8) = 6 req/s, d30 at 4 + 4 x 0.1 / 0.5 = 4.8
    assert "static-d40: 6 req/s at 90%  <- best static" in tight and "static-d30: 4.8 req/s" in tight
    assert "slo: >= 8 req/s at 90% (1.33x best static)" in tight
    assert "static-d40: >= 8 req/s at 90%  <- best static" in loose  # at 25 ms the slow TPOT holds
    one = [fake_run("static-d20", {1.0: [good] * 6 + [slow_ttft] * 4}), fake_run("slo", {1.0: [good] * 10})]
    single = oracle.oracle_report(one, "static-d", [(2000.0, 25.0)])
    assert "static-d20: 60.0% attained (p 100.0%, q 20.0%)  <- best static" in single
    assert "slo: 100.0% attained (p 100.0%, q 100.0%) (1.67x best static)" in single
    assert oracle.parse_slos(["2000:15"]) == [(2000.0, 15.0)]
    for bad in ("2000", "a:b", "0:15"):
        with pytest.raises(ValueError, match="SLO"):
            oracle.parse_slos([bad])
