"""Open-loop serving benchmark against any OpenAI-compatible server (semipd, vLLM, SGLang).

Requests arrive as a Poisson (or gamma, `--burstiness`) process at each rate of a sweep, whether or not
earlier ones have finished; each is a streaming /v1/completions (or /v1/chat/completions) call timed on the
client: TTFT, TPOT, ITLs, E2E. Per rate: latency distributions, throughputs, SLO attainment and goodput.
Results are appended to a JSON file under a label so engines/modes can be compared (`--compare`), and plotted
(`--plot-dir`, needs the `semipd-server[bench]` extra for matplotlib).

    uv run semipd-bench-serving --base-url http://127.0.0.1:30000 --label semi-pd \\
        --dataset longtail --num-prompts 500 --request-rates 2 4 8 --out results.json --plot-dir plots
    uv run semipd-bench-serving --compare unified.json semipd.json --plot-dir plots
    uv run semipd-bench-serving --compare semipd.json --slo-ttft-ms 2000 --slo-tpot-ms 20  # re-scored

`python benchmarks/bench_serving.py ...` runs the same main (for machines without the console script).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from semipd_server.bench import serving_data as data
from semipd_server.bench import serving_oracle as oracle
from semipd_server.bench import serving_workload as wl
from semipd_server.bench.serving_client import Target, run_schedule, send_request
from semipd_server.bench.serving_data import SampleRequest
from semipd_server.bench.serving_plots import MISSING_MATPLOTLIB, have_matplotlib, write_plots
from semipd_server.help_format import HelpFormatter

# --- sweep, results file, CLI -------------------------------------------------------------------------------

async def discover(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """The first model listed by /v1/models (id and, when the server says, max_model_len)."""
    try:
        resp = await client.get(f"{base_url}/v1/models", timeout=30.0)
        resp.raise_for_status()
        return resp.json()["data"][0]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise SystemExit(f"error: cannot list models at {base_url}/v1/models ({e}); pass --model") from e


async def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up with one request, then run every rate in order; return the run's results entry."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False) as client:
        info = {} if args.model and args.max_model_len else await discover(client, args.base_url)
        model = args.model or info["id"]
        max_model_len = args.max_model_len or int(info.get("max_model_len") or 4096)
        make_schedule = schedule_maker(args, max_model_len)
        schedules = [make_schedule(rate, i) for i, rate in enumerate(args.request_rates)]
        target = Target(args.base_url, model, args.endpoint, not args.no_ignore_eos, args.temperature,
                        json.loads(args.extra_body) if args.extra_body else {})
        warm_up = SampleRequest(data.random_words(8, np.random.default_rng(args.seed)), 8, 2)
        warm = await send_request(client, target, warm_up, 0.0)
        if not warm.ok:
            raise SystemExit(f"error: warm-up request to {target.url} failed: {warm.error}")
        points = []
        for rate, schedule in zip(args.request_rates, schedules, strict=True):
            records, duration, samples = await run_schedule(
                client, target, schedule, args.max_concurrency, args.metrics_interval_s,
                f"rate {data.format_rate(rate)}/s", not args.no_progress)
            summary = data.summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            rows = [r.to_json() for r in records]
            phases = wl.phase_stats(rows, args.slo_ttft_ms, args.slo_tpot_ms)
            if phases:
                summary["phases"] = phases
            print_summary(args.label, rate, summary)
            points.append({"request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
                           "summary": summary, "requests": rows, "sm_split": samples})
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "api_key", "out", "plot_dir")}
    config["request_rates"] = [data.format_rate(r) for r in args.request_rates]
    return {"label": args.label, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "server": {"base_url": args.base_url, "model": model, "endpoint": args.endpoint,
                       "max_model_len": max_model_len}, "config": config, "rates": points}


MakeRequests = Callable[[int, np.random.Generator], list[SampleRequest]]


def request_maker(args: argparse.Namespace, max_model_len: int) -> MakeRequests:
    """`n` requests of the --dataset's length distribution."""
    if args.dataset == "sharegpt":
        if args.dataset_path is None:
            raise SystemExit("error: --dataset sharegpt needs --dataset-path FILE")
        pool = data.load_sharegpt(Path(args.dataset_path), max_model_len, args.tokenizer,
                                  args.sharegpt_output_len)
        return lambda n, rng: data.sample_requests(pool, n, rng)
    return lambda n, rng: data.synthetic_requests(
        args.dataset, n, args.input_len, args.output_len, args.range_ratio, args.long_fraction,
        args.long_input_len, args.long_output_len or args.output_len, max_model_len, rng)


def schedule_maker(args: argparse.Namespace, max_model_len: int) -> Callable[[float, int], list[wl.Arrival]]:
    """(rate or load scale, index in the sweep) -> arrivals. Each rate gets its own prompts (the same per rate
    whatever the engine), so a server's prefix cache cannot reuse one rate's prompts in the next."""
    if args.trace:
        try:
            rows = wl.load_trace(Path(args.trace))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from e
        return lambda scale, i: wl.trace_schedule(rows, scale, max_model_len, np.random.default_rng([args.seed, i]))
    if args.phases:
        phases, lengths = wl.parse_phases(args.phases), wl.uniform_lengths(args.range_ratio, max_model_len)
        return lambda scale, i: cut(wl.phased_schedule(phases, args.phase_repeats, scale, args.burstiness, lengths,
                                                       np.random.default_rng([args.seed, i])), args.duration_s)
    make_requests = request_maker(args, max_model_len)

    def stationary(rate: float, i: int) -> list[wl.Arrival]:
        if args.diurnal:
            period, amplitude = args.diurnal
            offsets, labels = wl.diurnal_offsets(rate, period, amplitude, args.duration_s,
                                                 np.random.default_rng([args.seed, i, 1]))
        else:
            offsets = data.arrival_offsets(args.num_prompts, rate, args.burstiness,
                                           np.random.default_rng([args.seed, i, 1]))
            labels = [""] * len(offsets)
        reqs = make_requests(len(offsets), np.random.default_rng([args.seed, i]))
        return cut([wl.Arrival(float(t), r, ph) for t, r, ph in zip(offsets, reqs, labels, strict=True)],
                   args.duration_s)
    return stationary


def cut(schedule: list[wl.Arrival], duration_s: float | None) -> list[wl.Arrival]:
    """No new sends after `duration_s` (None: all)."""
    return schedule if duration_s is None else [a for a in schedule if a.offset <= duration_s]


def print_summary(label: str, rate: float, s: dict[str, Any]) -> None:
    def dist(name: str, key: str) -> str:
        d = s[key]
        cells = "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in d.items())
        return f"{name:<5} {cells} ms"

    att = s["slo_attainment"]
    print(f"\n== {label} @ {data.format_rate(rate)} req/s: {s['completed']}/{s['num_requests']} ok in "
          f"{s['duration_s']:.1f} s; {s['request_throughput']:.2f} req/s, "
          f"in {s['input_throughput']:.0f} tok/s, out {s['output_throughput']:.0f} tok/s")
    print(f"SLO (TTFT <= {s['slo_ttft_ms']:g} ms, TPOT <= {s['slo_tpot_ms']:g} ms): attainment "
          f"{'-' if att is None else f'{100 * att:.1f}%'}, goodput {s['goodput']:.2f} req/s")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms")):
        print(dist(name, key))
    for name, ph in (s.get("phases") or {}).items():
        p50, p90 = ph["ttft_p50_ms"], ph["tpot_p90_ms"]
        print(f"  phase {name}: {ph['num_requests']} requests, attainment {100 * ph['slo_attainment']:.1f}%, "
              f"TTFT p50 {'-' if p50 is None else f'{p50:.0f}'} ms, TPOT p90 {'-' if p90 is None else f'{p90:.1f}'} ms")
    if s["errors"]:
        print(f"errors: {s['errors']}")


def load_runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SystemExit(f"error: results file {str(path)!r} does not exist")
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict) or not isinstance(content.get("runs"), list):
        raise SystemExit(f"error: {str(path)!r} is not a bench_serving results file (no 'runs' list)")
    return content["runs"]


def save_run(path: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Append `run` to the results file (a run with the same label is replaced); return all runs."""
    runs = [r for r in load_runs(path) if r["label"] != run["label"]] if path.exists() else []
    runs.append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1), encoding="utf-8")
    tmp.replace(path)
    return runs


def _rate(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 (or inf), got {text}")
    return v


SLO_DEFAULTS = (1000.0, 100.0)  # --slo-ttft-ms, --slo-tpot-ms of a sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semipd-bench-serving", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON",
                   help="only compare saved results files (no requests are sent)")
    p.add_argument("--oracle", default=None, metavar="LABEL_PREFIX",
                   help="with --compare: judge every run against the best of the runs labelled LABEL_PREFIX*")
    p.add_argument("--oracle-slos", nargs="+", default=None, metavar="TTFT_MS:TPOT_MS",
                   help="SLOs the oracle judges at (default: the saved ones of the first run)")
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:30000",
                   help="the server to load (its OpenAI API is under /v1)")
    s.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    s.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="/v1/completions or /v1/chat/completions")
    s.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer <key>' (default: none)")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt+output limit for the workload (default: /v1/models max_model_len, else 4096)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["fixed", "uniform", "longtail", "sharegpt"], default="fixed",
                   help="fixed: every request --input-len/--output-len; uniform: around them; longtail: chat plus "
                   "a share of long summarisation; sharegpt: conversations from --dataset-path")
    w.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (--dataset sharegpt)")
    w.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or its folder) for ShareGPT lengths (default: ~4 chars/token)")
    w.add_argument("--sharegpt-output-len", type=int, default=None, help="override ShareGPT output lengths")
    w.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    w.add_argument("--input-len", type=int, default=256, help="prompt tokens (chat part for longtail)")
    w.add_argument("--output-len", type=int, default=128, help="output tokens (chat part for longtail)")
    w.add_argument("--range-ratio", type=float, default=0.5, help="uniform: lengths in len*(1 +- ratio)")
    w.add_argument("--long-fraction", type=float, default=0.2, help="longtail: share of summarisation")
    w.add_argument("--long-input-len", type=int, default=4096, help="longtail: longest summarisation prompt")
    w.add_argument("--long-output-len", type=int, default=None,
                   help="longtail: summarisation output (default --output-len)")
    w.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (no ignore_eos)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    w.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    w.add_argument("--seed", type=int, default=0, help="seeds the workload (prompts, lengths, arrival times)")
    n = p.add_argument_group("non-stationary load (serving_workload: attainment per phase too)")
    n.add_argument("--phases", default=None, metavar="NAME:S:REQ_PER_S:IN:OUT,...",
                   help="phases in turn, lengths uniform with --range-ratio; --request-rates scale their rates")
    n.add_argument("--phase-repeats", type=int, default=1, help="times the --phases sequence runs")
    n.add_argument("--diurnal", default=None, metavar="PERIOD_S:AMPLITUDE",
                   help="rate = each --request-rates x (1 - AMPLITUDE cos(2 pi t / PERIOD_S)); needs --duration-s")
    n.add_argument("--trace", default=None, metavar="JSONL",
                   help="replay arrival_s/prompt_tokens/output_tokens per line; --request-rates scale its load")
    a = p.add_argument_group("load")
    a.add_argument("--request-rates", type=_rate, nargs="+", default=[1.0],
                   help="req/s, one run each (inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    a.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    a.add_argument("--duration-s", type=float, default=None, help="stop sending new requests after this long")
    a.add_argument("--request-timeout-s", type=float, default=600.0, help="a request taking longer counts as failed")
    for what, default in zip(("TTFT", "TPOT"), SLO_DEFAULTS):
        a.add_argument(f"--slo-{what.lower()}-ms", type=float, default=argparse.SUPPRESS,
                       help=f"{what} SLO for attainment and goodput (default: {default:g}); with --compare, "
                            "both re-score the saved runs from their stored requests (default: saved values)")
    a.add_argument("--metrics-interval-s", type=float, default=1.0, help="/metrics polling for the SM split")
    o = p.add_argument_group("output")
    o.add_argument("--label", default="run", help="name of this run in the results file and plots")
    o.add_argument("--out", default=None, help="results JSON to append this run to")
    o.add_argument("--plot-dir", default=None, help="PNG plots of all runs in --out (or --compare) go here")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_parses(p: argparse.ArgumentParser, flag: str, parse: Callable[[Any], object], value: object) -> None:
    """p.error naming `flag` when its own parser rejects `value` (the parsed form is built again where used)."""
    try:
        parse(value)
    except ValueError as e:
        p.error(f"{flag}: {e}")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate; fill in the SLO defaults (None with --compare when neither flag is given: no re-scoring)."""
    given = [hasattr(args, name) for name in ("slo_ttft_ms", "slo_tpot_ms")]
    if args.compare and given.count(True) == 1:
        p.error("--compare re-scores saved runs only with both --slo-ttft-ms and --slo-tpot-ms")
    for name, default in zip(("slo_ttft_ms", "slo_tpot_ms"), SLO_DEFAULTS):
        if not hasattr(args, name):
            setattr(args, name, None if args.compare else default)
    for name in ("num_prompts", "input_len", "output_len", "long_input_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_concurrency", "max_model_len", "long_output_len", "sharegpt_output_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("burstiness", "request_timeout_s", "slo_ttft_ms", "slo_tpot_ms", "metrics_interval_s"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.duration_s is not None and not args.duration_s > 0:
        p.error("--duration-s must be > 0")
    if sum(x is not None for x in (args.phases, args.diurnal, args.trace)) > 1:
        p.error("--phases, --diurnal and --trace are different workloads: give one")
    if args.phase_repeats < 1:
        p.error("--phase-repeats must be >= 1")
    if args.phases is not None:
        _check_parses(p, "--phases", wl.parse_phases, args.phases)
    if args.diurnal is not None:
        try:
            period, amplitude = (float(x) for x in args.diurnal.split(":"))
        except ValueError:
            p.error(f"--diurnal must be PERIOD_S:AMPLITUDE, got {args.diurnal!r}")
        if not period > 0 or not 0 <= amplitude < 1 or args.duration_s is None:
            p.error("--diurnal needs PERIOD_S > 0, AMPLITUDE in [0, 1) and --duration-s")
        args.diurnal = (period, amplitude)
    if args.extra_body is not None:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                raise ValueError("not an object")
        except ValueError as e:
            p.error(f"--extra-body must be a JSON object ({e})")
    if args.oracle is not None and not args.compare:
        p.error("--oracle judges saved runs: use it with --compare")
    if args.oracle_slos is not None:
        _check_parses(p, "--oracle-slos", oracle.parse_slos, args.oracle_slos)
    if args.plot_dir is not None and not have_matplotlib():
        p.error(MISSING_MATPLOTLIB)
    args.base_url = args.base_url.rstrip("/")
    args.base_url = args.base_url.removesuffix("/v1")


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    rescore = bool(args.compare) and args.slo_ttft_ms is not None
    slo_note = data.rescored_note(args.slo_ttft_ms, args.slo_tpot_ms) if rescore else None
    if args.compare:
        runs: list[dict[str, Any]] = []
        for path in args.compare:
            for run in load_runs(Path(path)):
                if rescore:
                    try:
                        run = data.rescore_run(run, args.slo_ttft_ms, args.slo_tpot_ms, path)
                    except ValueError as e:
                        raise SystemExit(f"error: {e}") from e
                    for point in run["rates"]:  # the per-phase attainment too, under the new SLOs
                        if point["summary"].get("phases"):
                            point["summary"]["phases"] = wl.phase_stats(point["requests"], args.slo_ttft_ms,
                                                                        args.slo_tpot_ms)
                if any(r["label"] == run["label"] for r in runs):
                    run = {**run, "label": f"{run['label']} ({Path(path).stem})"}
                runs.append(run)
    else:
        run = asyncio.run(run_sweep(args))
        runs = save_run(Path(args.out), run) if args.out else [run]
        if args.out:
            print(f"\nresults: {args.out} (label {args.label!r}; {len(runs)} runs in file)")
    if len(runs) > 1 or args.compare:
        print("\n" + data.comparison_table(runs, slo_note=slo_note))
    if args.oracle is not None:
        first = runs[0]["rates"][0]["summary"] if runs and runs[0]["rates"] else {}
        slos = oracle.parse_slos(args.oracle_slos) if args.oracle_slos else [
            (float(first.get("slo_ttft_ms") or SLO_DEFAULTS[0]), float(first.get("slo_tpot_ms") or SLO_DEFAULTS[1]))]
        print("\n" + oracle.oracle_report(runs, args.oracle, slos))
    if args.plot_dir:
        for path in write_plots(runs, Path(args.plot_dir), rescored=rescore):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
