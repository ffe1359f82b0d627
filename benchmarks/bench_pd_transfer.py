"""PD instances on one machine: the KV transfer rate and the TTFT that the prefill -> decode hand-off adds.

Starts a unified server, then a prefill and a decode instance (`--disaggregation-mode prefill|decode`, Mooncake),
all on this machine's GPU with random weights at a real shape, and sends each prompt the way the smg gateway does in
PD mode: the same body to both instances at once with bootstrap_host / bootstrap_port / bootstrap_room; the decode's
stream is what the client sees (the prefill's answer is drained). TTFT is measured on the client at the first
streamed token; the transfer rate comes from the prefill's `semipd:pd_kv_transfer_*` metrics (bytes and seconds per
transfer, summed over each prompt length's repeats).

    python benchmarks/bench_pd_transfer.py --model-path scratch/llama8b --prompt-lens 1024 4096 8192 \
        --server-args "--load-format dummy --num-pages 2048" --out $OUT/pd_transfer.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from semipd_server.testing import ServerProcess, free_port, scrape_metrics


async def _ttft(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        first = None
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                raise RuntimeError(f"{url}: {line[:300]}")
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError(f"{url}: no token streamed")
        return first


async def _pd_ttft(client: httpx.AsyncClient, prefill: str, decode: str, body: dict[str, Any], room: int,
                   bootstrap_port: int) -> float:
    pd = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": bootstrap_port, "bootstrap_room": room}
    drained = client.post(f"{prefill}/v1/completions", json={**pd, "stream": False})
    p, ttft = await asyncio.gather(drained, _ttft(client, decode, pd))
    if p.status_code != 200:
        raise RuntimeError(f"prefill: HTTP {p.status_code}: {p.text[:300]}")
    return ttft


def _transfer(url: str) -> tuple[float, float, float]:
    m = scrape_metrics(url)
    return (m.get("semipd:pd_kv_transfer_bytes_total{}", 0.0), m.get("semipd:pd_kv_transfer_seconds_sum{}", 0.0),
            m.get("semipd:pd_kv_transfer_seconds_count{}", 0.0))


def _prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


async def _measure(args: argparse.Namespace, unified: ServerProcess | None, prefill: ServerProcess,
                   decode: ServerProcess, bootstrap_port: int, vocab: int) -> list[dict[str, Any]]:
    rng = random.Random(0)
    rows = []
    room = 1
    async with httpx.AsyncClient(timeout=300) as client:
        model = (await client.get(f"{decode.url}/v1/models")).json()["data"][0]["id"]
        for n in args.prompt_lens:
            body: dict[str, Any] = {"model": model, "max_tokens": args.output_len, "temperature": 0}
            # warm-up at this length (kernel autotuning, graph shapes), not counted
            await _pd_ttft(client, prefill.url, decode.url, {**body, "prompt": _prompt(rng, n, vocab)}, room,
                           bootstrap_port)
            room += 1
            if unified is not None:
                await _ttft(client, unified.url, {**body, "prompt": _prompt(rng, n, vocab)})
            b0, s0, c0 = _transfer(prefill.url)
            pd_ttft, uni_ttft = [], []
            for _ in range(args.repeats):
                prompt = _prompt(rng, n, vocab)
                pd_ttft.append(await _pd_ttft(client, prefill.url, decode.url, {**body, "prompt": prompt}, room,
                                              bootstrap_port))
                room += 1
                if unified is not None:
                    uni_ttft.append(await _ttft(client, unified.url, {**body, "prompt": prompt}))
            b1, s1, c1 = _transfer(prefill.url)
            row = {"prompt_len": n, "transfers": c1 - c0, "kv_mb_per_request": (b1 - b0) / max(c1 - c0, 1) / 1e6,
                   "transfer_ms_mean": 1e3 * (s1 - s0) / max(c1 - c0, 1),
                   "transfer_gb_s": (b1 - b0) / (s1 - s0) / 1e9 if s1 > s0 else None,
                   "pd_ttft_ms_p50": 1e3 * statistics.median(pd_ttft),
                   "unified_ttft_ms_p50": 1e3 * statistics.median(uni_ttft) if uni_ttft else None}
            if uni_ttft:
                row["added_ttft_ms_p50"] = row["pd_ttft_ms_p50"] - row["unified_ttft_ms_p50"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model directory (default: the bundled default model)")
    ap.add_argument("--server-args", default="", help="flags for all three servers")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--output-len", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-unified", action="store_true", help="PD pair only (no added-TTFT column)")
    ap.add_argument("--startup-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    flags = ([] if args.model_path is None else ["--model-path", args.model_path]) + shlex.split(args.server_args)
    ctx = str(max(args.prompt_lens) + args.output_len + 16)
    flags += ["--context-length", ctx]
    vocab = 49152
    if args.model_path is not None:
        vocab = json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"]
    logs = args.out.parent
    servers: list[ServerProcess] = []
    try:
        # one at a time: each sizes its KV cache from the memory the earlier ones left
        unified = None
        if not args.skip_unified:
            unified = ServerProcess(*flags, log_path=logs / "pd_unified.log", single_thread=False,
                                    startup_timeout_s=args.startup_timeout_s)
            servers.append(unified)
        boot = free_port()
        prefill = ServerProcess(*flags, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port",
                                str(boot), log_path=logs / "pd_prefill.log", single_thread=False,
                                startup_timeout_s=args.startup_timeout_s)
        servers.append(prefill)
        decode = ServerProcess(*flags, "--disaggregation-mode", "decode", "--disaggregation-bootstrap-port",
                               str(boot), log_path=logs / "pd_decode.log", single_thread=False,
                               startup_timeout_s=args.startup_timeout_s)
        servers.append(decode)
        rows = asyncio.run(_measure(args, unified, prefill, decode, boot, vocab))
    finally:
        for s in reversed(servers):
            s.stop()
    args.out.write_text(json.dumps({"server_flags": flags, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
