"""Open-loop serving benchmark against any OpenAI-compatible server (semipd, vLLM, SGLang).

Requests arrive as a Poisson (or gamma, `--burstiness`) process at each rate of a sweep, whether or not
earlier ones have finished; each is a streaming /v1/completions (or /v1/chat/completions) call timed on the
client: TTFT, TPOT, ITLs, E2E. Per rate: latency distributions, throughputs, SLO attainment and goodput.
Results are appended to a JSON file under a label so engines/modes can be compared (`--compare`), and plotted.

    uv run python benchmarks/bench_serving.py --base-url http://127.0.0.1:30000 --label semi-pd \\
        --dataset longtail --num-prompts 500 --request-rates 2 4 8 --out results.json --plot-dir plots
    uv run python benchmarks/bench_serving.py --compare unified.json semipd.json --plot-dir plots
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper beside us, however we were loaded
import serving_data as data  # noqa: E402
from serving_data import RequestRecord, SampleRequest  # noqa: E402

# --- client -------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Target:
    base_url: str
    model: str
    endpoint: str  # "completions" or "chat"
    ignore_eos: bool
    temperature: float
    extra_body: dict[str, Any]

    def payload(self, req: SampleRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": req.output_len,
                                "temperature": self.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": req.prompt}]
        else:
            body["prompt"] = req.prompt
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | self.extra_body

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/{'chat/completions' if self.endpoint == 'chat' else 'completions'}"


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    c = choices[0]
    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
    return text or "", c.get("finish_reason")


async def send_request(client: httpx.AsyncClient, target: Target, req: SampleRequest,
                       send_time: float) -> RequestRecord:
    """Stream one request; a token event is an SSE chunk carrying text (a chunk holding several tokens counts
    as one gap). Output/prompt token counts come from the final usage chunk when the server sends one."""
    rec = RequestRecord(ok=False, send_time=send_time, prompt_tokens=req.prompt_len, output_tokens=0,
                        planned_prompt_tokens=req.prompt_len, planned_output_tokens=req.output_len)
    start = time.perf_counter()
    last = start
    chunks, finish, usage = 0, None, None
    try:
        async with client.stream("POST", target.url, json=target.payload(req)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return rec
                usage = chunk.get("usage") or usage
                text, reason = _chunk_text(chunk)
                finish = reason or finish
                if text:
                    now = time.perf_counter()
                    if chunks == 0:
                        rec.ttft = now - start
                    else:
                        rec.itls.append(now - last)
                    last, chunks = now, chunks + 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.e2e = time.perf_counter() - start
    if usage:
        rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))
        rec.output_tokens = int(usage.get("completion_tokens", chunks))
    else:
        rec.output_tokens = chunks
    if chunks == 0:
        rec.error = "empty: no token streamed"
    elif finish == "abort":
        rec.error = "abort: finish_reason abort"
    else:
        rec.ok = True
    return rec


_PROM_LINE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)")


def sm_split_from_metrics(text: str) -> tuple[float, float] | None:
    """(prefill SMs, decode SMs) from Prometheus text: `semipd:sm_split{role=...}` or gauges named like
    `*prefill*sm*` / `*decode*sm*`; None when the server exposes neither."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = _PROM_LINE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        role = re.search(r'role="(\w+)"', labels)
        if name.endswith("sm_split") and role:
            found[role.group(1)] = float(value)
        elif "sm" in name.lower():
            for r in ("prefill", "decode"):
                if r in name.lower():
                    found.setdefault(r, float(value))
    if "prefill" in found and "decode" in found:
        return found["prefill"], found["decode"]
    return None


async def poll_sm_split(client: httpx.AsyncClient, base_url: str, interval_s: float, start: float,
                        samples: list[list[float]], stop: asyncio.Event) -> None:
    """Append [t, prefill SMs, decode SMs] every interval until `stop`; give up quietly on the first miss."""
    while not stop.is_set():
        try:
            resp = await client.get(f"{base_url}/metrics", timeout=5.0)
            split = sm_split_from_metrics(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            split = None
        if split is None:
            return
        samples.append([time.perf_counter() - start, *split])
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


async def run_at_rate(client: httpx.AsyncClient, target: Target, requests: Sequence[SampleRequest],
                      rate: float, burstiness: float, max_concurrency: int | None, duration_s: float | None,
                      metrics_interval_s: float, rng: np.random.Generator,
                      progress: bool) -> tuple[list[RequestRecord], float, list[list[float]]]:
    """Send `requests` at their arrival times (no new sends after `duration_s`), wait for all of them."""
    offsets = data.arrival_offsets(len(requests), rate, burstiness, rng)
    if duration_s is not None:
        offsets = offsets[offsets <= duration_s]
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(offsets), desc=f"rate {data.format_rate(rate)}/s", disable=not progress,
               leave=False)
    samples: list[list[float]] = []
    stop = asyncio.Event()
    start = time.perf_counter()
    poller = asyncio.create_task(
        poll_sm_split(client, target.base_url, metrics_interval_s, start, samples, stop))

    async def one(req: SampleRequest) -> RequestRecord:
        if limit is None:
            rec = await send_request(client, target, req, time.perf_counter() - start)
        else:
            async with limit:  # timed from the actual send, after waiting for a concurrency slot
                rec = await send_request(client, target, req, time.perf_counter() - start)
        bar.update(1)
        return rec

    tasks = []
    for req, offset in zip(requests, offsets):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    stop.set()
    await poller
    bar.close()
    return records, duration, samples


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
        make_requests = request_maker(args, max_model_len)
        workloads = [make_requests(np.random.default_rng([args.seed, i]))
                     for i in range(len(args.request_rates))]
        target = Target(args.base_url, model, args.endpoint, not args.no_ignore_eos, args.temperature,
                        json.loads(args.extra_body) if args.extra_body else {})
        warm_up = SampleRequest(data.random_words(8, np.random.default_rng(args.seed)), 8, 2)
        warm = await send_request(client, target, warm_up, 0.0)
        if not warm.ok:
            raise SystemExit(f"error: warm-up request to {target.url} failed: {warm.error}")
        points = []
        for i, (rate, requests) in enumerate(zip(args.request_rates, workloads)):
            records, duration, samples = await run_at_rate(
                client, target, requests, rate, args.burstiness, args.max_concurrency, args.duration_s,
                args.metrics_interval_s, np.random.default_rng([args.seed, i, 1]), not args.no_progress)
            summary = data.summarize(records, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            print_summary(args.label, rate, summary)
            points.append({"request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
                           "summary": summary, "requests": [r.to_json() for r in records],
                           "sm_split": samples})
    config = {k: v for k, v in vars(args).items() if k not in ("compare", "api_key", "out", "plot_dir")}
    config["request_rates"] = [data.format_rate(r) for r in args.request_rates]
    return {"label": args.label, "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "server": {"base_url": args.base_url, "model": model, "endpoint": args.endpoint,
                       "max_model_len": max_model_len}, "config": config, "rates": points}


MakeRequests = Callable[[np.random.Generator], list[SampleRequest]]


def request_maker(args: argparse.Namespace, max_model_len: int) -> MakeRequests:
    """Each rate gets its own prompts (same length distribution; the same per rate whatever the engine), so a
    server's prefix cache cannot reuse one rate's prompts in the next."""
    if args.dataset == "sharegpt":
        if args.dataset_path is None:
            raise SystemExit("error: --dataset sharegpt needs --dataset-path FILE")
        pool = data.load_sharegpt(Path(args.dataset_path), max_model_len, args.tokenizer,
                                  args.sharegpt_output_len)
        return lambda rng: data.sample_requests(pool, args.num_prompts, rng)
    return lambda rng: data.synthetic_requests(
        args.dataset, args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.long_fraction,
        args.long_input_len, args.long_output_len or args.output_len, max_model_len, rng)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semipd-bench-serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="only compare saved results files")
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:30000")
    s.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    s.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    s.add_argument("--api-key", default=None)
    s.add_argument("--max-model-len", type=int, default=None,
                   help="prompt+output limit for the workload (default: /v1/models max_model_len, else 4096)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=["fixed", "uniform", "longtail", "sharegpt"], default="fixed")
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
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("load")
    a.add_argument("--request-rates", type=_rate, nargs="+", default=[1.0],
                   help="req/s, one run each (inf: all at once)")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 = Poisson")
    a.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    a.add_argument("--duration-s", type=float, default=None, help="stop sending new requests after this long")
    a.add_argument("--request-timeout-s", type=float, default=600.0)
    a.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    a.add_argument("--slo-tpot-ms", type=float, default=100.0)
    a.add_argument("--metrics-interval-s", type=float, default=1.0, help="/metrics polling for the SM split")
    o = p.add_argument_group("output")
    o.add_argument("--label", default="run", help="name of this run in the results file and plots")
    o.add_argument("--out", default=None, help="results JSON to append this run to")
    o.add_argument("--plot-dir", default=None, help="PNG plots of all runs in --out (or --compare) go here")
    o.add_argument("--no-progress", action="store_true")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len", "long_input_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_concurrency", "max_model_len", "long_output_len", "sharegpt_output_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("burstiness", "request_timeout_s", "slo_ttft_ms", "slo_tpot_ms", "metrics_interval_s"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.duration_s is not None and not args.duration_s > 0:
        p.error("--duration-s must be > 0")
    if args.extra_body is not None:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                raise ValueError("not an object")
        except ValueError as e:
            p.error(f"--extra-body must be a JSON object ({e})")
    if args.plot_dir is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot-dir needs matplotlib (e.g. `uv run --with matplotlib ...`)")
    args.base_url = args.base_url.rstrip("/")
    args.base_url = args.base_url.removesuffix("/v1")


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    if args.compare:
        runs = []
        for path in args.compare:
            for run in load_runs(Path(path)):
                if any(r["label"] == run["label"] for r in runs):
                    run = {**run, "label": f"{run['label']} ({Path(path).stem})"}
                runs.append(run)
    else:
        run = asyncio.run(run_sweep(args))
        runs = save_run(Path(args.out), run) if args.out else [run]
        if args.out:
            print(f"\nresults: {args.out} (label {args.label!r}; {len(runs)} runs in file)")
    if len(runs) > 1 or args.compare:
        print("\n" + data.comparison_table(runs))
    if args.plot_dir:
        for path in data.write_plots(runs, Path(args.plot_dir)):
            print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
