"""Soak: a semi-PD server under mixed traffic for a long while, with client disconnects, bad inputs and a
prefill-worker SIGKILL every few minutes. Reports requests served / failed (with reasons), KV pages still held
once the traffic stops (leak check), the server's RSS and the GPU's used memory over time (drift).

    python benchmarks/soak.py --duration-s 1800 --kill-every-s 300 --model-path scratch/llama8b \
        --server-args "--load-format dummy --enable-semi-pd --sm-partition mps --context-length 4096" \
        --out $OUT/soak.json

The prefill worker must be a process of its own for the kill (`--sm-partition mps`, or `none`; green runs it as
a thread of the core). Not a CI test: a benchmark of endurance.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from semipd_server.testing import ServerProcess, child_pids, proc_cmdline, scrape_metrics

WORDS = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "are", "with", "as", "by", "at", "from",
         "this", "that", "be", "it", "an", "or"]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += child_pids(p)
    return out


def _rss_mb(pid: int) -> float:
    total = 0
    for p in _descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _gpu_used_mb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _prefill_workers(server: ServerProcess) -> list[int]:
    """The semi-PD prefill worker processes: spawned children of the engine core (itself a spawned child)."""
    cores = [p for p in child_pids(server.proc.pid) if "spawn_main" in proc_cmdline(p)]
    return [w for c in cores for w in child_pids(c) if "spawn_main" in proc_cmdline(w)]


class Tally:
    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: collections.Counter[str] = collections.Counter()

    def fail(self, why: str) -> None:
        self.counts["failed"] += 1
        self.failures[why[:120]] += 1


def _chat(rng: random.Random, model: str, stream: bool) -> dict[str, Any]:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 600)))
    return {"model": model, "messages": [{"role": "user", "content": words}], "stream": stream,
            "max_tokens": rng.randrange(4, 200), "temperature": rng.choice([0.0, 0.7])}


BAD: list[tuple[str, Any, int]] = [  # (name, body, the status it must get)
    ("temperature", {"temperature": -1}, 400), ("empty messages", {"messages": []}, 400),
    ("max_tokens", {"max_tokens": -5}, 400), ("n", {"n": 0}, 400), ("unknown field", {"frobnicate": 1}, 400),
]


async def _one(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, t: Tally,
               max_request_bytes: int) -> None:
    kind = rng.choices(["chat", "stream", "disconnect", "bad", "invalid_json", "oversize"],
                       [55, 20, 10, 10, 3, 2])[0]
    try:
        if kind in ("bad", "invalid_json", "oversize"):
            if kind == "bad":
                name, extra, want = rng.choice(BAD)
                r = await client.post(f"{url}/v1/chat/completions", json={**_chat(rng, model, False), **extra})
            elif kind == "invalid_json":
                name, want = kind, 400
                r = await client.post(f"{url}/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                      headers={"content-type": "application/json"})
            else:
                name, want = kind, 413
                r = await client.post(f"{url}/v1/chat/completions", content=b"x" * (max_request_bytes + 1),
                                      headers={"content-type": "application/json"})
            t.counts["bad_input_rejected" if r.status_code == want else "bad_input_wrong_status"] += 1
            if r.status_code != want:
                t.failures[f"bad input {name}: {r.status_code} (want {want})"] += 1
            return
        body = _chat(rng, model, kind != "chat")
        if kind == "chat":
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            if r.status_code == 200:
                t.counts["served"] += 1
            else:
                t.fail(f"HTTP {r.status_code}: {r.json().get('error', {}).get('message', '')[:80]}")
            return
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                t.fail(f"stream HTTP {r.status_code}")
                return
            done, err = False, ""
            async for line in r.aiter_lines():
                if kind == "disconnect" and line.startswith("data: {"):
                    t.counts["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
                if line.startswith("data: {") and '"error"' in line:
                    err = line[6:120]
                done = done or line == "data: [DONE]"
            if err:
                t.fail(f"stream error event: {err}")
            elif done:
                t.counts["served"] += 1
            else:
                t.fail("stream ended without [DONE]")
    except httpx.HTTPError as e:
        t.fail(f"{type(e).__name__}: {e}")


async def _traffic(url: str, model: str, args: argparse.Namespace, t: Tally, stop: asyncio.Event) -> None:
    async def worker(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(timeout=args.request_timeout_s) as client:
            while not stop.is_set():
                await _one(client, url, model, rng, t, args.max_request_bytes)

    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))


async def _run(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as c:
        model = (await c.get(f"{server.url}/v1/models")).json()["data"][0]["id"]
    t, stop = Tally(), asyncio.Event()
    samples: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    traffic = asyncio.create_task(_traffic(server.url, model, args, t, stop))
    t0 = time.monotonic()
    next_kill = t0 + args.kill_every_s
    while time.monotonic() - t0 < args.duration_s:
        await asyncio.sleep(min(args.sample_every_s, max(0.0, args.duration_s - (time.monotonic() - t0))))
        m = await asyncio.to_thread(scrape_metrics, server.url)
        samples.append({"t_s": round(time.monotonic() - t0, 1), "rss_mb": _rss_mb(server.proc.pid),
                        "gpu_used_mb": _gpu_used_mb(), "pages_used": m.get("semipd:kv_pages_used{}"),
                        "served": t.counts["served"], "failed": t.counts["failed"]})
        print(json.dumps(samples[-1]), flush=True)
        if args.kill_every_s > 0 and time.monotonic() >= next_kill:
            next_kill += args.kill_every_s
            kills.append(await _kill_prefill(server, args.recover_timeout_s))
            print(json.dumps(kills[-1]), flush=True)
    stop.set()
    await traffic
    idle = await _wait_idle(server.url, 120.0)
    return {"counts": dict(t.counts), "failures": dict(t.failures.most_common()), "kills": kills,
            "samples": samples, "after_idle": idle}


async def _kill_prefill(server: ServerProcess, timeout_s: float) -> dict[str, Any]:
    workers = _prefill_workers(server)
    if len(workers) != 1:
        return {"killed": None, "why": f"expected one prefill worker process, found {workers}"}
    os.kill(workers[0], signal.SIGKILL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        fresh = [p for p in _prefill_workers(server) if p != workers[0]]
        try:
            healthy = (await asyncio.to_thread(httpx.get, f"{server.url}/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if fresh and healthy:
            return {"killed": workers[0], "replaced_by": fresh[0], "recovered_s": round(time.monotonic() - t0, 2)}
        await asyncio.sleep(0.2)
    return {"killed": workers[0], "replaced_by": None, "recovered_s": None}


async def _wait_idle(url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = await asyncio.to_thread(scrape_metrics, url)
        busy = m.get("semipd:num_requests_running{}", 0) + m.get("semipd:num_requests_waiting{}", 0)
        if busy == 0 or time.monotonic() > deadline:
            return {"idle": busy == 0, "kv_pages_used": m.get("semipd:kv_pages_used{}"),
                    "prefix_cache_pages": m.get("semipd:prefix_cache_pages{}"),
                    "kv_pages_total": m.get("semipd:kv_pages_total{}")}
        await asyncio.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="model directory (default: the bundled default model)")
    ap.add_argument("--server-args", default="--enable-semi-pd", help="semipd-server flags")
    ap.add_argument("--duration-s", type=float, default=1800.0)
    ap.add_argument("--kill-every-s", type=float, default=300.0, help="0: no kills")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sample-every-s", type=float, default=10.0)
    ap.add_argument("--request-timeout-s", type=float, default=120.0)
    ap.add_argument("--recover-timeout-s", type=float, default=120.0)
    ap.add_argument("--max-request-bytes", type=int, default=1 << 20, help="passed to the server; oversize probe")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    flags = ([] if args.model_path is None else ["--model-path", args.model_path]) + shlex.split(args.server_args)
    flags += ["--max-request-bytes", str(args.max_request_bytes)]
    server = ServerProcess(*flags, log_path=args.out.with_suffix(".server.log"), single_thread=False,
                           startup_timeout_s=600)
    try:
        report = asyncio.run(_run(server, args))
    finally:
        rc = server.stop()
    s = report["samples"]
    report |= {"server_flags": flags, "server_exit": rc,
               "rss_drift_mb": s[-1]["rss_mb"] - s[0]["rss_mb"] if s else None,
               "gpu_drift_mb": (s[-1]["gpu_used_mb"] - s[0]["gpu_used_mb"])
               if s and s[0]["gpu_used_mb"] is not None and s[-1]["gpu_used_mb"] is not None else None}
    args.out.write_text(json.dumps(report, indent=2))
    keys = ("counts", "failures", "kills", "after_idle", "rss_drift_mb", "gpu_drift_mb", "server_exit")
    summary = {k: report[k] for k in keys}
    print(json.dumps(summary, indent=2))
    leaked = report["after_idle"]["kv_pages_used"]
    return 0 if report["after_idle"]["idle"] and not leaked else 1


if __name__ == "__main__":
    sys.exit(main())
