"""semipd-bench-serving --compare re-scoring: saved runs (written through the real summarize / save_run path)
scored again under other SLOs from their stored per-request rows, checked against attainments computed here
from the same rows; plain --compare keeps the stored numbers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from semipd_server.bench import serving as bench_serving
from semipd_server.bench import serving_data as data
from semipd_server.bench.serving_data import RequestRecord

STORED_SLO = (5000.0, 1000.0)  # loose: every completed request is within
NEW_SLO = (300.0, 50.0)
DURATION_S = 2.0
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _records(spec: list[tuple[float, float, int] | None]) -> list[RequestRecord]:
    """(TTFT s, TPOT s, output tokens) per request; None = a failed request."""
    out = []
    for item in spec:
        if item is None:
            out.append(RequestRecord(ok=False, send_time=0.0, prompt_tokens=8, output_tokens=0,
                                     error="HTTP 500"))
            continue
        ttft, tpot, n = item
        out.append(RequestRecord(ok=True, send_time=0.0, prompt_tokens=8, output_tokens=n, ttft=ttft,
                                 e2e=ttft + tpot * (n - 1)))
    return out


GOOD, ONE_TOKEN = (0.1, 0.02, 10), (0.2, 0.0, 1)  # within the new SLOs (one token: only TTFT counts)
SLOW_TTFT, SLOW_TPOT = (0.4, 0.02, 10), (0.1, 0.07, 10)  # miss one new SLO each, within the stored ones
SPECS: dict[str, dict[float, list[Any]]] = {
    # new attainment 1.0, 0.8, 0.3 -> 90% at 1 + 0.1 / 0.2 = 1.5 req/s; stored 1.0, 1.0, 0.9
    "a": {1.0: [GOOD] * 9 + [ONE_TOKEN], 2.0: [GOOD] * 8 + [SLOW_TTFT, SLOW_TPOT],
          4.0: [GOOD] * 3 + [SLOW_TPOT] * 4 + [SLOW_TTFT] * 2 + [None]},
    # new 1.0, 1.0, 0.8 -> 2 + 0.1 / 0.2 * 2 = 3 req/s; stored 1.0 everywhere
    "b": {1.0: [GOOD] * 10, 2.0: [GOOD] * 10, 4.0: [GOOD] * 8 + [SLOW_TPOT] * 2},
}


def _write_results(path: Path) -> None:
    for label, per_rate in SPECS.items():
        points = []
        for rate, spec in per_rate.items():
            records = _records(spec)
            points.append({"request_rate": rate, "burstiness": 1.0, "sm_split": [],
                           "summary": data.summarize(records, DURATION_S, *STORED_SLO),
                           "requests": [r.to_json() for r in records]})
        bench_serving.save_run(path, {"label": label, "config": {}, "rates": points})


def _within(row: dict[str, Any], ttft_ms: float, tpot_ms: float) -> bool:
    """The SLO rule, restated from the saved row (its stored tpot, not the re-scoring's recomputation)."""
    tpot_ok = row["tpot"] is None or row["tpot"] * 1000 <= tpot_ms
    return bool(row["ok"]) and row["ttft"] * 1000 <= ttft_ms and tpot_ok


def _block(text: str, title: str) -> dict[float, list[float]]:
    """The rows of one table block: rate -> one value per label."""
    lines = text.splitlines()
    start = lines.index(f"== {title}") + 2  # title, then the label header
    rows = {}
    for line in lines[start:]:
        if line.startswith("=="):
            break
        rate, *cells = line.split()
        rows[float(rate)] = [float(c) for c in cells]
    return rows


def _rounded(table: dict[float, list[float]]) -> dict[float, list[float]]:
    return {rate: [round(v, 2) for v in values] for rate, values in table.items()}  # the table prints .2f


def test_compare_rescores_saved_runs_under_new_slos(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    _write_results(path)
    saved = json.loads(path.read_text())["runs"]
    expected_att, expected_goodput = {}, {}
    for rate in (1.0, 2.0, 4.0):
        rows = [next(p for p in run["rates"] if p["request_rate"] == rate)["requests"] for run in saved]
        within = [sum(_within(r, *NEW_SLO) for r in rows_of_label) for rows_of_label in rows]
        expected_att[rate] = [100.0 * w / len(r) for w, r in zip(within, rows)]
        expected_goodput[rate] = [w / DURATION_S for w in within]
    assert expected_att == {1.0: [100.0, 100.0], 2.0: [80.0, 100.0], 4.0: [30.0, 80.0]}  # the spec's design

    capsys.readouterr()
    plot_dir = tmp_path / "plots"
    argv = ["--compare", str(path), "--slo-ttft-ms", f"{NEW_SLO[0]:g}", "--slo-tpot-ms", f"{NEW_SLO[1]:g}"]
    assert bench_serving.main(argv + (["--plot-dir", str(plot_dir)] if HAVE_MATPLOTLIB else [])) == 0
    text = capsys.readouterr().out
    note = "TTFT <= 300 ms, TPOT <= 50 ms; re-scored from saved requests"
    assert _block(text, f"SLO attainment % ({note})") == _rounded(expected_att)
    assert _block(text, f"goodput req/s ({note})") == _rounded(expected_goodput)
    assert f"== request rate at 90% SLO attainment (interpolated; {note})\n" in text
    assert "  a: 1.5 req/s\n" in text and "  b: 3 req/s  (2.00x a)\n" in text
    # latency blocks are not SLO-dependent: the stored summaries' values
    assert _block(text, "TTFT p99 ms")[4.0] == [round(run["rates"][2]["summary"]["ttft_ms"]["p99"], 2)
                                                for run in saved]
    if HAVE_MATPLOTLIB:
        assert (plot_dir / "slo_attainment_vs_rate.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(path.read_text())["runs"] == saved  # the file itself is left as it was

    # plain --compare: the stored numbers, headers as before
    assert bench_serving.main(["--compare", str(path)]) == 0
    text = capsys.readouterr().out
    stored = {rate: [100.0 * run["rates"][i]["summary"]["slo_attainment"] for run in saved]
              for i, rate in enumerate((1.0, 2.0, 4.0))}
    assert stored == {1.0: [100.0, 100.0], 2.0: [100.0, 100.0], 4.0: [90.0, 100.0]}
    assert _block(text, "SLO attainment %") == _rounded(stored)
    assert "re-scored" not in text and "== request rate at 90% SLO attainment (interpolated)\n" in text
    assert "  a: >= 4 req/s (never fell below)\n" in text

    # re-scoring under the stored SLOs gives back the stored attainments exactly
    argv = ["--compare", str(path), "--slo-ttft-ms", f"{STORED_SLO[0]:g}",
            "--slo-tpot-ms", f"{STORED_SLO[1]:g}"]
    assert bench_serving.main(argv) == 0
    assert _block(capsys.readouterr().out, "SLO attainment % (TTFT <= 5000 ms, TPOT <= 1000 ms; re-scored "
                                            "from saved requests)") == _rounded(stored)


def test_rescore_errors_name_the_file_and_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.json"
    _write_results(path)
    content = json.loads(path.read_text())
    del content["runs"][1]["rates"][2]["requests"][3]["e2e"]
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as info:
        bench_serving.main(["--compare", str(path), "--slo-ttft-ms", "300", "--slo-tpot-ms", "50"])
    message = str(info.value)
    assert str(path) in message and "run 'b' @ 4.0 req/s" in message
    assert "saved request 3 has no e2e field" in message
    assert bench_serving.main(["--compare", str(path)]) == 0  # without re-scoring the stored values still do
    assert math.isclose(data.rescore_run(content["runs"][0], *NEW_SLO, "x")["rates"][1]["summary"]
                        ["slo_attainment"], 0.8)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bench_serving.main(["--compare", str(path), "--slo-tpot-ms", "20"])
    assert "both --slo-ttft-ms and --slo-tpot-ms" in capsys.readouterr().err
