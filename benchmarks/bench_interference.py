"""Decode inter-token latency under prefill interference: unified chunked prefill vs semi-PD (green, mps, none).

32 streams decode continuously while 16k-token prompts keep arriving; we report decode ITL p50/p99 per config,
next to the ITL of the same 32 streams with no prefill running, and the prefill throughput achieved.

    python benchmarks/bench_interference.py --shape llama-3.1-8b --configs unified green:30 green:50 mps:30 \
        --out $OUT/interference.json

Each config runs in a fresh child process (MPS percentages and green contexts are per process)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")


def child(args: argparse.Namespace) -> dict:
    from semipd_runtime.config import EngineConfig
    from semipd_runtime.core_factory import create_core
    from semipd_runtime.messages import AddRequest, CoreSampling

    kind, _, pct = args.config.partition(":")
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps(cfg_dict))
    n_streams = args.streams
    stream_tokens = args.stream_prompt_len + args.decode_steps * 3  # prompt + alone + interfered + slack
    max_len = max(args.prompt_len, stream_tokens) + 64
    tokens = n_streams * stream_tokens + 3 * max_len
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = EngineConfig.from_knobs(
        model_path=str(model_dir), device=args.device, dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_len, eos_token_ids=[],
        max_running_requests=n_streams + 4, chunked_prefill_size=args.chunk, page_size=16,
        num_pages=tokens // 16 + 64, mode="unified" if kind == "unified" else "semi-pd",
        sm_partition=kind if kind != "unified" else "none", prefill_placement="process",
        prefill_sm_percent=100 - int(pct or 50), decode_sm_percent=int(pct or 50),
        max_prefill_tokens=args.prompt_len, load_format="dummy")  # random weights at the shape's sizes
    core = create_core(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = cfg_dict["vocab_size"]
    last: dict[str, float] = {}
    itl: dict[str, list[float]] = {"alone": [], "interfered": []}
    phase = "warmup"
    for i in range(n_streams):  # long enough to outlast both phases (the benchmark stops them)
        core.add_request(AddRequest(f"s{i}", torch.randint(10, vocab, (args.stream_prompt_len,), generator=g).tolist(),
                                    CoreSampling(temperature=0.0, max_tokens=stream_tokens - args.stream_prompt_len,
                                                 ignore_eos=True)))
    prefills_done = 0
    prefill_tokens = 0
    t_phase = time.perf_counter()
    steps_in_phase = 0
    n_big = 0
    deadline = time.monotonic() + args.child_timeout_s
    while True:
        events = core.step()
        now = time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{args.config}: still in phase {phase} after {args.child_timeout_s}s")
        for ev in events:
            if ev.error:
                raise RuntimeError(f"{args.config}: request {ev.rid} failed: {ev.error}")
            if ev.rid.startswith("s") and ev.token_ids:
                if ev.rid in last and phase in itl:
                    itl[phase].append(now - last[ev.rid])
                last[ev.rid] = now
            elif ev.rid.startswith("big") and ev.finish_reason:
                prefills_done += 1
                prefill_tokens += args.prompt_len
        if phase == "warmup" and len(last) == n_streams:
            phase, t_phase, steps_in_phase = "alone", now, 0
            last.clear()
        elif phase in ("alone", "interfered"):
            steps_in_phase += 1
            if phase == "interfered":
                waiting = core.stats().num_waiting
                if waiting < 2:  # keep the prefill side busy with 16k prompts
                    core.add_request(AddRequest(
                        f"big{n_big}", torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist(),
                        CoreSampling(temperature=0.0, max_tokens=1, ignore_eos=True)))
                    n_big += 1
            if steps_in_phase >= args.decode_steps:
                if phase == "alone":
                    phase, steps_in_phase, t_phase = "interfered", 0, now
                    prefills_done = prefill_tokens = 0
                    last.clear()
                else:
                    elapsed = now - t_phase
                    break
    stats = core.stats()
    core.close()
    return {
        "config": args.config, "prefill_sm": stats.prefill_sm, "decode_sm": stats.decode_sm,
        "itl_alone_p50_ms": 1e3 * percentile(itl["alone"], 50), "itl_alone_p99_ms": 1e3 * percentile(itl["alone"], 99),
        "itl_p50_ms": 1e3 * percentile(itl["interfered"], 50), "itl_p99_ms": 1e3 * percentile(itl["interfered"], 99),
        "prefill_tok_s": prefill_tokens / elapsed, "prefills_done": prefills_done, "elapsed_s": elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--configs", nargs="+", default=["unified", "green:30", "green:50", "mps:30", "mps:50"],
                    help="unified | green:DECODE_PCT | mps:DECODE_PCT | none:DECODE_PCT")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=2048, help="chunked prefill size (unified) / prefill chunk")
    ap.add_argument("--decode-steps", type=int, default=300)
    ap.add_argument("--stream-prompt-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (--shape tiny)")
    ap.add_argument("--child-timeout-s", type=float, default=300.0)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.config:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    for c in args.configs:
        cmd = [sys.executable, __file__, "--config", c, "--shape", args.shape, "--streams", str(args.streams),
               "--prompt-len", str(args.prompt_len), "--chunk", str(args.chunk),
               "--decode-steps", str(args.decode_steps), "--stream-prompt-len", str(args.stream_prompt_len),
               "--device", args.device, "--child-timeout-s", str(args.child_timeout_s)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        env = dict(os.environ)
        if c.startswith("mps:"):
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = c.split(":")[1]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout_s + 60)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            p = subprocess.CompletedProcess(cmd, -9, out, f"timed out: {e}")
        res = [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        row = res[0] if res else {"config": c, "error": (p.stderr or p.stdout)[-2000:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "shape": args.shape,
            "streams": args.streams, "prompt_len": args.prompt_len, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
