"""semipd-bench-serving (semipd_server.bench): statistics and arrivals on synthetic data, the streaming
client against a scripted SSE server with known delays, the installed console script, and the whole benchmark
(through the benchmarks/bench_serving.py wrapper) end to end against the real semipd server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from semipd_server.bench import serving as bench_serving
from semipd_server.bench import serving_client as client
from semipd_server.bench import serving_data as data
from semipd_server.bench.serving_data import RequestRecord

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"  # the thin script wrapper lives there

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _rec(ok: bool = True, ttft: float = 0.1, e2e: float = 1.0, out: int = 10, prompt: int = 20,
         error: str = "") -> RequestRecord:
    return RequestRecord(ok=ok, send_time=0.0, prompt_tokens=prompt, output_tokens=out, ttft=ttft, e2e=e2e,
                         itls=[(e2e - ttft) / max(1, out - 1)] * max(0, out - 1), error=error)


# --- statistics ---------------------------------------------------------------------------------------------

def test_distribution_matches_linear_percentiles() -> None:
    d = data.distribution([float(x) for x in range(1, 11)], data.ITL_PERCENTILES)
    # order statistics 1..10: pNN = 1 + 9 * NN/100 (seconds), reported in ms
    assert d == pytest.approx({"mean": 5500.0, "p50": 5500.0, "p90": 9100.0, "p95": 9550.0, "p99": 9910.0,
                               "p99.8": 9982.0})
    assert data.distribution([math.nan]) == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}


def test_summarize_attainment_goodput_throughput() -> None:
    records = [
        _rec(ttft=0.1, e2e=1.1, out=11, prompt=30),  # TPOT 100 ms: within both SLOs
        _rec(ttft=0.5, e2e=0.9, out=5, prompt=40),  # TPOT 100 ms but TTFT 500 ms > 300: misses
        _rec(ttft=0.2, e2e=0.2, out=1, prompt=10),  # one token: no TPOT, TTFT ok: within
        _rec(ttft=0.1, e2e=2.1, out=11, prompt=10),  # TPOT 200 ms > 150: misses
        RequestRecord(ok=False, send_time=0.0, prompt_tokens=50, output_tokens=0, error="HTTP 500: boom"),
    ]
    assert records[0].tpot == pytest.approx(0.1)
    assert math.isnan(records[2].tpot) and math.isnan(records[4].tpot)
    s = data.summarize(records, duration_s=2.0, slo_ttft_ms=300.0, slo_tpot_ms=150.0)
    assert (s["num_requests"], s["completed"], s["failed"]) == (5, 4, 1)
    assert s["errors"] == {"HTTP 500": 1}
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert s["goodput"] == pytest.approx(2 / 2.0)
    assert s["request_throughput"] == pytest.approx(4 / 2.0)
    assert s["total_input_tokens"] == 90 and s["input_throughput"] == pytest.approx(45.0)
    assert s["total_output_tokens"] == 28 and s["output_throughput"] == pytest.approx(14.0)
    assert s["ttft_ms"]["mean"] == pytest.approx((100 + 500 + 200 + 100) / 4)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["tpot_ms"]["mean"] == pytest.approx(400 / 3)
    assert s["e2e_ms"]["p50"] == pytest.approx(1000.0)
    assert s["itl_ms"]["p99.8"] == pytest.approx(200.0)  # global over 10 + 4 + 10 gaps
    json.dumps(s, allow_nan=False)  # results stay strict JSON
    with pytest.raises(ValueError, match="duration_s"):
        data.summarize(records, 0.0, 300.0, 150.0)


def test_rate_at_attainment_interpolates_first_crossing() -> None:
    f = data.rate_at_attainment
    assert f([1, 2, 4, 8], [1.0, 0.95, 0.85, 0.3]) == (pytest.approx(3.0), "interpolated")
    assert f([8, 1, 4, 2], [0.3, 1.0, 0.85, 0.95]) == (pytest.approx(3.0), "interpolated")  # any order
    assert f([1, 2, 4], [0.9, 0.95, 0.5]) == (pytest.approx(2 + 0.05 / 0.45 * 2), "interpolated")
    # the first dip below the target counts, even if attainment recovers later
    assert f([1, 2, 4, 8], [1.0, 0.8, 0.95, 0.2]) == (pytest.approx(1 + 0.1 / 0.2), "interpolated")
    assert f([1, 2, 4], [1.0, 0.99, 0.92]) == (4, "lower_bound")
    assert f([1, 2, math.inf], [1.0, 0.99, 0.1]) == (2, "lower_bound")
    assert f([1, 2], [0.5, 0.4]) == (None, "not_reached")
    assert f([1, 2], [None, None]) == (None, "no_data")
    with pytest.raises(ValueError, match="length"):
        f([1, 2], [1.0])


def _run(label: str, attainments: dict[float, float]) -> dict[str, Any]:
    rates = []
    for rate, att in attainments.items():
        s = data.summarize([_rec()], 1.0, 1000.0, 1000.0)
        s["slo_attainment"] = att
        rates.append({"request_rate": rate, "summary": s, "requests": [_rec().to_json()], "sm_split": []})
    return {"label": label, "rates": rates}


def test_comparison_table_lists_labels_and_rate_at_90() -> None:
    text = data.comparison_table([_run("unified", {1.0: 1.0, 2.0: 0.8, 4.0: 0.2}),
                                  _run("semi-pd", {1.0: 1.0, 2.0: 0.95, 4.0: 0.85}),
                                  _run("overloaded", {math.inf: 0.1}),
                                  _run("idle", {1.0: 1.0, math.inf: 1.0})])
    assert "unified" in text and "semi-pd" in text and "== TTFT p99 ms" in text
    assert "unified: 1.5 req/s\n" in text  # 1 + (1.0 - 0.9) / (1.0 - 0.8)
    assert "semi-pd: 3 req/s  (2.00x unified)\n" in text  # 2 + 0.05 / 0.1 * 2
    assert "overloaded: below target at every rate\n" in text
    assert text.endswith("idle: >= inf req/s (never fell below)")
    inf_row = next(line for line in text.splitlines() if line.strip().startswith("inf"))
    assert inf_row.split() == ["inf", "-", "-", "10.00", "100.00"]  # first block: attainment %


# --- workload -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrivals_mean_rate_and_burstiness(burstiness: float) -> None:
    offsets = data.arrival_offsets(40000, 8.0, burstiness, np.random.default_rng(1))
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert (len(offsets) - 1) / offsets[-1] == pytest.approx(8.0, rel=0.04)
    # gamma gaps: coefficient of variation 1/sqrt(shape) (Poisson: 1)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)


def test_arrivals_edge_cases_and_bad_args() -> None:
    rng = np.random.default_rng(0)
    assert np.array_equal(data.arrival_offsets(5, math.inf, 1.0, rng), np.zeros(5))
    assert data.arrival_offsets(0, 2.0, 1.0, rng).shape == (0,)
    for kwargs, name in (({"num_requests": -1}, "num_requests"), ({"request_rate": 0.0}, "request_rate"),
                         ({"burstiness": 0.0}, "burstiness"), ({"request_rate": math.nan}, "request_rate")):
        args = {"num_requests": 3, "request_rate": 1.0, "burstiness": 1.0, "rng": rng} | kwargs
        with pytest.raises(ValueError, match=name):
            data.arrival_offsets(**args)


def test_synthetic_datasets() -> None:
    rng = np.random.default_rng(0)
    common = dict(range_ratio=0.5, long_fraction=0.25, long_input_len=2000, long_output_len=50,
                  max_model_len=4096, rng=rng)
    fixed = data.synthetic_requests("fixed", 8, 32, 16, **common)
    assert [(r.prompt_len, r.output_len) for r in fixed] == [(32, 16)] * 8
    assert all(len(r.prompt.split()) == 32 and set(r.prompt.split()) <= set(data.WORDS) for r in fixed)
    assert len({r.prompt for r in fixed}) == 8  # distinct prompts: no accidental prefix-cache hits
    uni = data.synthetic_requests("uniform", 500, 100, 40, **common)
    assert all(50 <= r.prompt_len <= 150 and 20 <= r.output_len <= 60 for r in uni)
    assert np.std([r.prompt_len for r in uni]) > 20
    tail = data.synthetic_requests("longtail", 2000, 64, 32, **common)
    long_share = np.mean([r.prompt_len >= 1000 for r in tail])
    assert long_share == pytest.approx(0.25, abs=0.04)
    assert np.median([r.prompt_len for r in tail if r.prompt_len < 1000]) == pytest.approx(64, rel=0.15)
    clipped = data.synthetic_requests("fixed", 2, 300, 100, **(common | {"max_model_len": 256}))
    assert [(r.prompt_len, r.output_len) for r in clipped] == [(156, 100)] * 2
    with pytest.raises(ValueError, match="dataset"):
        data.synthetic_requests("zipf", 2, 8, 8, **common)
    with pytest.raises(ValueError, match="input_len"):
        data.synthetic_requests("fixed", 2, 0, 8, **common)


def test_sharegpt_dataset(tmp_path: Path) -> None:
    def conv(*turns: tuple[str, str]) -> dict[str, Any]:
        return {"conversations": [{"from": who, "value": text} for who, text in turns]}

    convs = [
        conv(("human", "a" * 40), ("gpt", "b" * 80)),  # ~4 chars/token: 10 + 20 tokens
        conv(("human", "c" * 400), ("gpt", "d" * 400)),  # too long for max_model_len 128
        conv(("human", "hi"), ("gpt", "e" * 80)),  # prompt too short
        conv(("gpt", "f" * 40), ("human", "g" * 40)),  # wrong order
        conv(("human", "h" * 40)),  # no reply
        {"id": "no conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    pool = data.load_sharegpt(path, max_model_len=128)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in pool] == [("a" * 40, 10, 20)]
    reqs = data.sample_requests(pool, 3, np.random.default_rng(0))  # fewer pairs than asked: repeats
    assert [r.prompt for r in reqs] == ["a" * 40] * 3
    assert data.load_sharegpt(path, 128, fixed_output_len=7)[0].output_len == 7
    with pytest.raises(ValueError, match="dataset_path"):
        data.load_sharegpt(path, max_model_len=16)
    with pytest.raises(ValueError, match="dataset_path"):
        data.load_sharegpt(tmp_path / "missing.json", 128)
    big_pool = data.synthetic_requests("fixed", 50, 4, 4, 0.0, 0.0, 4, 4, 64, np.random.default_rng(0))
    drawn = data.sample_requests(big_pool, 50, np.random.default_rng(1))
    assert len({r.prompt for r in drawn}) == 50  # a large enough pool: no repetition


def test_sm_split_from_prometheus_text() -> None:
    text = ('# HELP semipd:sm_split SMs\n# TYPE semipd:sm_split gauge\n'
            'semipd:sm_split{model_name="m",role="prefill"} 88.0\n'
            'semipd:sm_split{model_name="m",role="decode"} 44.0\n'
            'semipd:num_requests_running{model_name="m"} 3.0\n')
    assert client.sm_split_from_metrics(text) == (88.0, 44.0)
    assert client.sm_split_from_metrics("engine_prefill_sm_count 10\nengine_decode_sm_count 20\n") == (
        10.0, 20.0)
    assert client.sm_split_from_metrics('vllm:num_requests_running{model_name="m"} 1.0\n') is None


# --- client against a scripted SSE server -------------------------------------------------------------------

TOY_TTFT_S, TOY_ITL_S = 0.08, 0.03


class ScriptedServer:
    """A tiny OpenAI-shaped HTTP server on its own thread: streams `max_tokens` one-word chunks, the first
    after TOY_TTFT_S and the rest TOY_ITL_S apart, then a usage chunk; answers 500 to prompts containing FAIL;
    serves /v1/models and a /metrics page with an SM split. Records every request body it got."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop).result()
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        method, path = head.split(" ")[:2]
        headers = dict(line.lower().split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        raw = await reader.readexactly(int(headers.get("content-length", 0)))

        def send(status: str, ctype: str, payload: bytes) -> None:
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
                         "Connection: close\r\n\r\n".encode() + payload)

        if path == "/v1/models":
            models = {"data": [{"id": "toy", "max_model_len": 512}]}
            send("200 OK", "application/json", json.dumps(models).encode())
        elif path == "/metrics":
            send("200 OK", "text/plain",
                 b'semipd:sm_split{role="prefill"} 40.0\nsemipd:sm_split{role="decode"} 92.0\n')
        elif method == "POST" and path == "/v1/completions":
            body = json.loads(raw)
            self.bodies.append(body)
            if "FAIL" in body["prompt"]:
                send("500 Internal Server Error", "application/json", b'{"error": {"message": "boom"}}')
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Connection: close\r\n\r\n")
                await asyncio.sleep(TOY_TTFT_S)
                for i in range(body["max_tokens"]):
                    if i:
                        await asyncio.sleep(TOY_ITL_S)
                    chunk = {"choices": [{"index": 0, "text": " tok", "finish_reason": None}]}
                    writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    await writer.drain()
                end = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
                usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"].split()) + 1,
                                                  "completion_tokens": body["max_tokens"]}}
                for event in (json.dumps(end), json.dumps(usage), "[DONE]"):
                    writer.write(f"data: {event}\n\n".encode())
        else:
            send("404 Not Found", "text/plain", b"no")
        await writer.drain()
        writer.close()

    def close(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.close()


def test_client_times_stream_and_reports_errors(scripted: ScriptedServer) -> None:
    target = client.Target(scripted.url, "toy", "completions", True, 0.0, {})

    async def go() -> list[RequestRecord]:
        async with httpx.AsyncClient(trust_env=False) as http:
            return [await client.send_request(http, target, data.SampleRequest(p, 3, 5), 0.0)
                    for p in ("one two three", "please FAIL")]

    ok, failed = asyncio.run(go())
    assert ok.ok and (ok.prompt_tokens, ok.output_tokens) == (4, 5)  # counts from the usage chunk
    assert TOY_TTFT_S <= ok.ttft < TOY_TTFT_S + 0.5
    assert len(ok.itls) == 4 and all(TOY_ITL_S * 0.8 <= x < TOY_ITL_S + 0.3 for x in ok.itls)
    assert ok.tpot == pytest.approx((ok.e2e - ok.ttft) / 4) and ok.tpot >= TOY_ITL_S * 0.8
    assert not failed.ok and failed.error.startswith("HTTP 500") and "boom" in failed.error
    body = scripted.bodies[0]
    assert body == {"model": "toy", "max_tokens": 5, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}, "prompt": "one two three", "ignore_eos": True}


def test_cli_sweep_results_file_compare_and_plots(scripted: ScriptedServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    base = ["--base-url", scripted.url + "/v1", "--dataset", "fixed", "--input-len", "6", "--output-len", "4",
            "--num-prompts", "6", "--metrics-interval-s", "0.2", "--slo-ttft-ms", "5000",
            "--slo-tpot-ms", "1000", "--no-progress", "--out", str(out)]
    assert bench_serving.main(base + ["--label", "a", "--request-rates", "20", "inf"]) == 0
    assert bench_serving.main(base + ["--label", "b", "--request-rates", "30", "--no-ignore-eos"]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["a", "b"]
    assert [p["request_rate"] for p in runs[0]["rates"]] == [20.0, "inf"]
    assert runs[0]["server"]["model"] == "toy" and runs[0]["server"]["max_model_len"] == 512
    for point in runs[0]["rates"]:
        s = point["summary"]
        assert s["completed"] == 6 and s["failed"] == 0 and s["slo_attainment"] == 1.0
        assert s["total_output_tokens"] == 24 and s["total_input_tokens"] == 6 * 7
        assert [r["output_tokens"] for r in point["requests"]] == [4] * 6
        assert all(r["ttft"] >= TOY_TTFT_S for r in point["requests"])
    inf_sends = [r["send_time"] for r in runs[0]["rates"][1]["requests"]]
    assert max(inf_sends) < 0.5  # rate inf: all at once
    sm_samples = runs[0]["rates"][0]["sm_split"]
    assert sm_samples and all(x[1:] == [40.0, 92.0] for x in sm_samples)
    # 6 warm-up + sweep bodies of run b, none with ignore_eos
    assert all("ignore_eos" not in b for b in scripted.bodies[-7:]) and scripted.bodies[0]["ignore_eos"]
    capsys.readouterr()
    plot_dir = tmp_path / "plots"
    if HAVE_MATPLOTLIB:
        assert bench_serving.main(["--compare", str(out), str(out), "--plot-dir", str(plot_dir)]) == 0
        text = capsys.readouterr().out
        assert "b (results)" in text and "== request rate at 90% SLO attainment" in text
        for name in ("slo_attainment_vs_rate.png", "latency_cdf.png", "sm_split_over_time.png"):
            png = (plot_dir / name).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    else:
        with pytest.raises(SystemExit):
            bench_serving.main(["--compare", str(out), "--plot-dir", str(plot_dir)])
        err = capsys.readouterr().err
        assert "--plot-dir needs matplotlib" in err and "semipd-server[bench]" in err


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in ((["--request-rates", "0"], "request rate must be > 0"),
                         (["--num-prompts", "0"], "--num-prompts must be >= 1"),
                         (["--burstiness", "-1"], "--burstiness must be > 0"),
                         (["--extra-body", "[1]"], "--extra-body must be a JSON object")):
        with pytest.raises(SystemExit):
            bench_serving.main(argv)
        assert needle in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    """`semipd-bench-serving` is an entry point of semipd-server: installed beside the interpreter."""
    script = Path(sys.executable).parent / "semipd-bench-serving"
    assert script.is_file(), f"{script} missing: is semipd-server installed in this environment?"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: semipd-bench-serving") and "--request-rates" in done.stdout


# --- end to end against the real server ---------------------------------------------------------------------

def _server_available() -> bool:
    try:
        import semipd_server.cli  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means there is no server to run against
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m semipd_server.cli` with the default model on a free port; waits for /health."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed after the process
    cmd = [sys.executable, "-m", "semipd_server.cli", "--host", "127.0.0.1", "--port", str(port),
           "--num-pages", "128", "--max-running-requests", "8", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"semipd-server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"semipd-server not healthy after 240 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.slow  # a real server process on the default model
@pytest.mark.skipif(not _server_available(), reason="semipd_server.cli is not importable")
def test_end_to_end_against_real_server(real_server: str, tmp_path: Path) -> None:
    out, plot_dir = tmp_path / "results.json", tmp_path / "plots"
    cmd = [sys.executable, str(BENCH_DIR / "bench_serving.py"), "--base-url", real_server,
           "--dataset", "uniform", "--input-len", "12", "--output-len", "5", "--range-ratio", "0.2",
           "--num-prompts", "6", "--request-rates", "4", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "10000",
           "--label", "semipd-cpu", "--out", str(out), "--no-progress"]
    cmd += ["--plot-dir", str(plot_dir)] if HAVE_MATPLOTLIB else []
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "== semipd-cpu @ 4 req/s: 6/6 ok" in done.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["server"]["model"] and run["server"]["max_model_len"] > 0
    (point,) = run["rates"]
    s = point["summary"]
    assert (s["num_requests"], s["completed"], s["failed"], s["errors"]) == (6, 6, 0, {})
    assert s["slo_attainment"] == 1.0 and s["goodput"] == pytest.approx(6 / s["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert set(s[key]) == {"mean", "p50", "p90", "p95", "p99"} and 0 < s[key]["p50"] <= s[key]["p99"]
    assert s["itl_ms"]["p99.8"] >= s["itl_ms"]["p50"] > 0
    rows = point["requests"]
    # ignore_eos + max_tokens: exactly the planned output length; prompt length as the server counted it
    assert [r["output_tokens"] for r in rows] == [r["planned_output_tokens"] for r in rows]
    assert all(r["ok"] and r["prompt_tokens"] >= r["planned_prompt_tokens"] // 2 for r in rows)
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in rows)
    # semipd exposes semipd:sm_split (0/0 when not partitioned): the poller must have read it
    assert point["sm_split"] and all(len(x) == 3 for x in point["sm_split"])
    if HAVE_MATPLOTLIB:
        for name in ("slo_attainment_vs_rate.png", "latency_cdf.png"):
            assert (plot_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
