"""The client side of semipd-bench-serving: one streaming OpenAI request timed on the client (TTFT, ITLs,
E2E), an open-loop sender of a schedule of arrivals, and a poller of the server's SM split (/metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from semipd_server.bench.serving_data import RequestRecord, SampleRequest
from semipd_server.bench.serving_workload import Arrival


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
                event = line[5:].strip()
                if event == "[DONE]":
                    break
                chunk = json.loads(event)
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def run_schedule(client: httpx.AsyncClient, target: Target, schedule: Sequence[Arrival],
                       max_concurrency: int | None, metrics_interval_s: float, label: str,
                       progress: bool) -> tuple[list[RequestRecord], float, list[list[float]]]:
    """Send each arrival at its offset (open loop: whether or not earlier ones finished), wait for all of them;
    poll the server's SM split meanwhile. Returns the records (with their phase), the duration, the split samples."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(schedule), desc=label, disable=not progress, leave=False)
    samples: list[list[float]] = []
    stop = asyncio.Event()
    start = time.perf_counter()
    poller = asyncio.create_task(
        poll_sm_split(client, target.base_url, metrics_interval_s, start, samples, stop))

    async def one(arrival: Arrival) -> RequestRecord:
        if limit is None:
            rec = await send_request(client, target, arrival.request, time.perf_counter() - start)
        else:
            async with limit:  # timed from the actual send, after waiting for a concurrency slot
                rec = await send_request(client, target, arrival.request, time.perf_counter() - start)
        rec.phase = arrival.phase
        bar.update(1)
        return rec

    tasks = []
    for arrival in sorted(schedule, key=lambda a: a.offset):
        delay = start + arrival.offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival)))
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    stop.set()
    await poller
    bar.close()
    return records, duration, samples
