"""Where a serving step's time goes: prefill chunks, mixed chunk + decode steps and decode steps, timed and
profiled kernel by kernel, against the compute roofline (2 FLOPs per weight per token + attention, at the
datasheet bf16 dense peak).

    python benchmarks/bench_step_profile.py --shape llama-3.1-8b --out $OUT/step_profile.json

Cases (one forward each through ModelRunner, exactly the engine's path; sampling not included):
  prefill T@P   one request, T new tokens after P cached ones (chunked prefill mid-prompt when P > 0)
  mixed T+B@C   a T-token chunk (prefix C) batched with B decode rows at context C (unified's mixed step)
  decode B@C    B decode rows at context C (eager, i.e. the path a mixed step's decode rows take)
The profiler table lists the top CUDA kernels of each case by total time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, with_layers

from semipd_memory import KVPool
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H20": 148.0}


def parse_case(s: str) -> dict[str, Any]:
    kind, _, spec = s.partition(":")
    if kind == "prefill":  # prefill:T@P
        t, p = spec.split("@")
        return {"kind": kind, "tokens": int(t), "prefix": int(p), "decode": 0, "ctx": 0}
    if kind == "mixed":  # mixed:T+B@C
        tb, c = spec.split("@")
        t, b = tb.split("+")
        return {"kind": kind, "tokens": int(t), "prefix": int(c), "decode": int(b), "ctx": int(c)}
    if kind == "decode":  # decode:B@C
        b, c = spec.split("@")
        return {"kind": kind, "tokens": 0, "prefix": 0, "decode": int(b), "ctx": int(c)}
    raise argparse.ArgumentTypeError(f"case must be prefill:T@P, mixed:T+B@C or decode:B@C, got {s!r}")


def case_inputs(case: dict[str, Any], page: int, vocab: int, gen: torch.Generator
                ) -> tuple[list[list[int]], list[int], torch.Tensor, list[int]]:
    """Token chunks, start positions, a page table of distinct pages, and the rows that sample."""
    chunks, starts, lens = [], [], []
    if case["tokens"]:
        chunks.append(torch.randint(10, vocab, (case["tokens"],), generator=gen).tolist())
        starts.append(case["prefix"])
        lens.append(case["prefix"] + case["tokens"])
    for _ in range(case["decode"]):
        chunks.append([int(torch.randint(10, vocab, (1,), generator=gen))])
        starts.append(case["ctx"])
        lens.append(case["ctx"] + 1)
    pages = [-(-n // page) for n in lens]
    width, base, rows = max(pages), 0, []
    for n in pages:
        rows.append(list(range(base, base + n)) + [-1] * (width - n))
        base += n
    table = torch.tensor(rows, dtype=torch.int32, device="cuda")
    return chunks, starts, table, list(range(len(chunks)))


def flops(mcfg: ModelConfig, params: int, case: dict[str, Any]) -> float:
    """2 FLOPs per weight per token, plus attention (QK^T and PV: 4 * heads * head_dim per visible pair)."""
    t, p = case["tokens"], case["prefix"]
    pairs = t * p + t * (t + 1) / 2 + case["decode"] * (case["ctx"] + 1)
    tokens = t + case["decode"]
    return 2 * params * tokens + 4 * mcfg.num_heads * mcfg.head_dim * pairs * mcfg.num_layers


def timed(fn: Any, iters: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def cublas_tflops(model: Any, tokens: int, iters: int) -> float:
    """The rate cuBLAS reaches on this forward's weight GEMMs at `tokens` rows (one layer's linears, timed
    back to back), TFLOP/s: the bar for a prefill forward (issue 22: >= 70% of it)."""
    layer = model.layers[0]
    weights = [m.weight for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                  layer.mlp.down_proj)]
    xs = [torch.randn(tokens, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]
    ms = timed(lambda: [torch.matmul(x, w.t()) for x, w in zip(xs, weights)], iters)
    return 2 * tokens * sum(w.numel() for w in weights) / ms / 1e9


def kernel_table(fn: Any, top: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if dev_us > 0:
            rows.append({"kernel": ev.key[:90], "calls": ev.count, "ms": dev_us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--cases", type=parse_case, nargs="+", default=[parse_case(c) for c in (
        "prefill:512@0", "prefill:512@2560", "prefill:2048@0", "prefill:8192@0", "mixed:512+32@2560",
        "decode:32@2560", "decode:64@2048")])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--green-percent", type=int, nargs="*", default=[58, 30],
                    help="also time each case alone inside a green context with this share of the SMs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)
    mcfg = ModelConfig.from_dict(with_layers(SHAPES[args.shape], args.layers))
    model = build_empty_model(mcfg, torch.device("cuda"), torch.bfloat16)
    init_random_weights(model, seed=0)
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n or mcfg.tie_word_embeddings)
    page = 16
    need = max(-(-(c["prefix"] + c["tokens"]) // page) + c["decode"] * -(-(c["ctx"] + 1) // page)
               for c in args.cases)
    pool = KVPool(mcfg.num_layers, need + 1, page, mcfg.num_kv_heads, mcfg.head_dim, torch.bfloat16,
                  torch.device("cuda"))
    max_len = max(c["prefix"] + c["tokens"] + c["ctx"] + 2 for c in args.cases)
    runner = ModelRunner(model, pool, page, max_len, cuda_graph_max_bs=0)
    gen = torch.Generator().manual_seed(0)
    from semipd_runtime.partition import GreenPartition

    greens = [(pct, GreenPartition(100 - pct, pct)) for pct in args.green_percent]
    results = []
    for case in args.cases:
        chunks, starts, table, rows = case_inputs(case, page, mcfg.vocab_size, gen)
        fn = lambda: runner.forward(chunks, starts, table, rows)  # noqa: E731
        ms = timed(fn, args.iters)
        f = flops(mcfg, params, case)
        roof_ms = f / (peak * 1e12) * 1e3
        kernels = kernel_table(fn, args.top)
        label = {"prefill": f"prefill {case['tokens']}@{case['prefix']}",
                 "mixed": f"mixed {case['tokens']}+{case['decode']}@{case['ctx']}",
                 "decode": f"decode {case['decode']}@{case['ctx']}"}[case["kind"]]
        row = case | {"label": label, "ms": ms, "tflops": f / ms / 1e9, "compute_roofline_ms": roof_ms,
                      "pct_of_peak": 100 * roof_ms / ms, "kernels": kernels, "green": []}
        if case["kind"] == "prefill" and case["tokens"] >= 512:
            row["cublas_tflops"] = cublas_tflops(model, case["tokens"], args.iters)
            row["pct_of_cublas"] = 100 * row["tflops"] / row["cublas_tflops"]
            print(f"   cuBLAS on the same GEMM shapes: {row['cublas_tflops']:.0f} TFLOP/s; forward at "
                  f"{row['pct_of_cublas']:.0f}% of it")
        for pct, part in greens:
            with part.role_context_factory("decode")():
                g_ms = timed(fn, args.iters)
            row["green"].append({"percent": pct, "sms": part.sm_count["decode"], "ms": g_ms,
                                 "speed_vs_full": ms / g_ms})
            print(f"   green {part.sm_count['decode']} SMs: {g_ms:.2f} ms ({ms / g_ms:.2f}x of full speed)")
        results.append(row)
        print(f"== {label}: {ms:.2f} ms, {row['tflops']:.0f} TFLOP/s ({row['pct_of_peak']:.0f}% of {peak:.0f})",
              flush=True)
        for k in kernels:
            print(f"   {k['ms']:8.2f} ms {k['calls']:5d}x  {k['kernel']}")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "shape": args.shape, "layers": mcfg.num_layers,
                                        "peak_tflops": peak, "torch": torch.__version__, "cases": results},
                                       indent=2))


if __name__ == "__main__":
    main()
