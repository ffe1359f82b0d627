"""Where a CUDA-graph decode step's time goes (issue 22): kernel by kernel inside the captured graph, grouped
into GEMMs / attention / norms / rotary+KV store / activation / other, each group's achieved HBM bandwidth, and
the time between kernels; then HBM bandwidth against SM count (a device copy and the decode step inside green
contexts of N SMs), i.e. what a decode partition's SMs buy.

    python benchmarks/bench_decode_breakdown.py --shape llama-3.1-8b --batches 1 64 --ctx 2048 \
        --green-percent 50 --sm-sweep 16 33 50 66 83 99 116 --out $OUT/decode_breakdown.json

The step is `ModelRunner.forward` on its CUDA graphs, exactly the decode worker's path (sampling excluded).
Inside a partition the graphs are captured there (the split-KV grid follows the partition's SMs, as in serving).
Bytes: GEMMs read every weight once per step (embedding excluded: it is gathered); attention reads B x (ctx+1)
tokens of K and V. The roofline is (weights + KV) / datasheet bandwidth, as in bench_decode_step.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode_step import copy_bandwidth, time_step
from bench_step_profile import kernel_table
from model_shapes import SHAPES, datasheet_hbm_tbps, with_layers

from semipd_memory import KVPool
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights

GROUPS = (  # first match wins; lower-case substrings of kernel names
    ("attention", ("_decode_split", "_decode_reduce", "decode_attention")),
    ("rotary+kv", ("rotary", "store_kv")),
    ("norm", ("rms_norm", "norm")),
    ("activation", ("silu",)),
    ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "sm90", "sm80", "splitk", "cublas")),
)


def group_of(kernel: str) -> str:
    k = kernel.lower()
    return next((g for g, keys in GROUPS if any(s in k for s in keys)), "other")


def profile_steps(fn, steps: int) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Kernel table of `steps` calls of fn (bench_step_profile's, after a warm-up): per kernel name, calls and
    device ms per step, and its group."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    rows = kernel_table(lambda: [fn() for _ in range(steps)], top=1 << 30)
    return [{"kernel": r["kernel"], "calls_per_step": r["calls"] / steps, "ms_per_step": r["ms"] / steps,
             "group": group_of(r["kernel"])}
            for r in rows if r["kernel"] not in ("", "Memcpy HtoD (Pinned -> Device)")]


def breakdown(fn, steps: int, iters: int, weight_bytes: int, kv_bytes: int, hbm: float) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    wall = time_step(fn, iters)
    kernels = profile_steps(fn, steps)
    groups: dict[str, float] = defaultdict(float)
    launches = 0.0
    for r in kernels:
        groups[r["group"]] += r["ms_per_step"]
        launches += r["calls_per_step"]
    busy = sum(groups.values())
    out: dict[str, Any] = {
        "wall_ms": wall * 1e3, "roofline_ms": (weight_bytes + kv_bytes) / (hbm * 1e12) * 1e3,
        "kernels_ms": busy, "between_kernels_ms": wall * 1e3 - busy, "kernels_per_step": launches,
        "groups_ms": dict(sorted(groups.items(), key=lambda kv: -kv[1])), "top": kernels[:15],
    }
    out["pct_of_roofline"] = 100 * out["roofline_ms"] / out["wall_ms"]
    for name, nbytes in (("gemm", weight_bytes), ("attention", kv_bytes)):
        if groups.get(name):
            out[f"{name}_tbps"] = nbytes / (groups[name] / 1e3) / 1e12
    return out


def print_breakdown(tag: str, r: dict[str, Any]) -> None:
    print(f"== {tag}: {r['wall_ms']:.2f} ms ({r['pct_of_roofline']:.0f}% of roofline {r['roofline_ms']:.2f}); "
          f"kernels {r['kernels_ms']:.2f} ms in {r['kernels_per_step']:.0f} launches, "
          f"between kernels {r['between_kernels_ms']:.2f} ms", flush=True)
    print("   groups: " + ", ".join(f"{g} {ms:.2f}" for g, ms in r["groups_ms"].items())
          + "".join(f"; {g} {r[f'{g}_tbps']:.2f} TB/s" for g in ("gemm", "attention") if f"{g}_tbps" in r))
    for k in r["top"][:10]:
        print(f"   {k['ms_per_step']:7.3f} ms {k['calls_per_step']:5.0f}x  [{k['group']}] {k['kernel']}")


def graphed(fn):  # type: ignore[no-untyped-def]
    """fn captured in a CUDA graph (on the current stream: inside a green context, its SMs): the replay times the
    device work alone, no host launch gaps."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    cur = torch.cuda.current_stream()
    with torch.cuda.graph(g, stream=cur if cur.cuda_stream != 0 else None):
        fn()
    return g.replay


def carveout_row(model: Any, sms: int, total: int, iters: int) -> dict[str, Any]:
    """gate_up at M=64 over all layers, graphed inside the current partition: cuBLAS as the model runs it, and
    cuBLASLt told the partition's SM count (torch's experimental SM carveout = total - sms) so its grid is sized
    for the SMs it has (a 132-CTA grid on 120 SMs runs two waves)."""
    ws = [ly.mlp.gate_up_proj.weight for ly in model.layers]
    x = torch.randn(64, ws[0].shape[1], dtype=ws[0].dtype, device=ws[0].device)
    nbytes = ws[0].numel() * ws[0].element_size()
    t_default = time_step(graphed(lambda: [torch.matmul(x, w.t()) for w in ws]), iters) / len(ws)
    backend = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        t_lt = time_step(graphed(lambda: [torch.matmul(x, w.t()) for w in ws]), iters) / len(ws)
        torch._C._set_sm_carveout_experimental(total - sms if sms < total else None)
        t_carve = time_step(graphed(lambda: [torch.matmul(x, w.t()) for w in ws]), iters) / len(ws)
    finally:
        torch._C._set_sm_carveout_experimental(None)
        torch.backends.cuda.preferred_blas_library(backend)
    return {"sms": sms, "cublas_tbps": nbytes / t_default / 1e12, "cublaslt_tbps": nbytes / t_lt / 1e12,
            "cublaslt_carveout_tbps": nbytes / t_carve / 1e12}


def gemm_table(model: Any, ms_rows: list[int], iters: int) -> list[dict[str, Any]]:
    """Each weight GEMM at decode rows M, over all layers' copies of that weight in one CUDA graph (distinct
    weights: nothing stays in L2, as in a real step): cuBLAS (torch.matmul, the model's path) against the
    Triton persistent GEMM and, at M <= 16, the GEMV-shaped kernel at its best config of `skinny_gemm.CONFIGS`,
    as achieved weight-read bandwidth per call."""
    from semipd_kernels.triton.gemm import linear
    from semipd_kernels.triton.skinny_gemm import CONFIGS, MAX_ROWS, skinny_linear

    layers = list(model.layers)
    named = [("qkv", [ly.self_attn.qkv_proj.weight for ly in layers]),
             ("o", [ly.self_attn.o_proj.weight for ly in layers]),
             ("gate_up", [ly.mlp.gate_up_proj.weight for ly in layers]),
             ("down", [ly.mlp.down_proj.weight for ly in layers])]
    rows = []
    for m in ms_rows:
        for name, ws in named:
            w0 = ws[0]
            x = torch.randn(m, w0.shape[1], dtype=w0.dtype, device=w0.device)
            nbytes = w0.numel() * w0.element_size()
            cub = graphed(lambda: [torch.matmul(x, w.t()) for w in ws])
            tri = graphed(lambda: [linear(x, w) for w in ws])
            t_cublas, t_triton = time_step(cub, iters) / len(ws), time_step(tri, iters) / len(ws)
            rows.append({"m": m, "gemm": name, "n": w0.shape[0], "k": w0.shape[1], "cublas_us": t_cublas * 1e6,
                         "cublas_tbps": nbytes / t_cublas / 1e12, "triton_us": t_triton * 1e6,
                         "triton_tbps": nbytes / t_triton / 1e12})
            r = rows[-1]
            skinny = ""
            if m <= MAX_ROWS:
                by_config = {}
                for cfg in CONFIGS:
                    g = graphed(lambda cfg=cfg: [skinny_linear(x, w, cfg) for w in ws])
                    by_config[cfg] = time_step(g, iters) / len(ws)
                    del g
                cfg, t = min(by_config.items(), key=lambda kv: kv[1])
                err = (skinny_linear(x, w0, cfg).float() - torch.matmul(x, w0.t()).float()).abs().max().item()
                r.update(skinny_us=t * 1e6, skinny_tbps=nbytes / t / 1e12, skinny_config=list(cfg),
                         skinny_max_abs_err=err,
                         skinny_by_config={"x".join(map(str, c)): v * 1e6 for c, v in by_config.items()})
                skinny = f" | skinny {t * 1e6:7.1f} us {nbytes / t / 1e12:5.2f} TB/s {cfg} (err {err:.2g})"
            print(f"   M={m:<3} {name:8s} {r['n']:>6}x{r['k']:<6} cuBLAS {r['cublas_us']:7.1f} us "
                  f"{r['cublas_tbps']:5.2f} TB/s | Triton {r['triton_us']:7.1f} us {r['triton_tbps']:5.2f} TB/s"
                  + skinny, flush=True)
            del cub, tri
    return rows


def green_copy_bandwidth(nbytes: int = 1 << 29) -> float:
    """Device copy on the current stream (inside a green context: its SMs only), bytes/s read + written."""
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * nbytes / time_step(lambda: y.copy_(x), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--green-percent", type=int, default=50, help="decode share of the partitioned breakdown (0: skip)")
    ap.add_argument("--sm-sweep", type=int, nargs="*", default=[16, 33, 50, 66, 83, 99, 116],
                    help="decode SM counts for the bandwidth sweep (green contexts; the full device is added)")
    ap.add_argument("--sweep-batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--max-model-len", type=int, default=8192, help="the serving context the graphs are sized for")
    ap.add_argument("--gemm-rows", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--carveout", action="store_true",
                    help="in the SM sweep, also gate_up at M=64 with cuBLASLt told the partition's SM count")
    ap.add_argument("--only-sweep", action="store_true", help="skip the GEMM table and the breakdowns")
    ap.add_argument("--only-gemms", action="store_true", help="the GEMM table only (cuBLAS, Triton, skinny)")
    ap.add_argument("--steps", type=int, default=10, help="profiled steps per case")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per case")
    ap.add_argument("--hbm-tbps", type=float, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    hbm = args.hbm_tbps or datasheet_hbm_tbps(name)
    mcfg = ModelConfig.from_dict(with_layers(SHAPES[args.shape], args.layers))
    model = build_empty_model(mcfg, torch.device("cuda"), torch.bfloat16)
    init_random_weights(model, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not mcfg.tie_word_embeddings:
        weight_bytes -= model.embed_tokens.weight.numel() * 2
    page, ctx = 16, args.ctx
    per_token = mcfg.num_layers * 2 * mcfg.num_kv_heads * mcfg.head_dim * 2
    pages_per = -(-(ctx + 1) // page)
    max_b = max(args.batches + args.sweep_batches)
    pool = KVPool(mcfg.num_layers, max_b * pages_per, page, mcfg.num_kv_heads, mcfg.head_dim, torch.bfloat16,
                  torch.device("cuda"))
    for layer in range(mcfg.num_layers):
        pool.k(layer).normal_()
        pool.v(layer).normal_()
    # the graphs' page-table width is the serving context (it sets the split-KV count at small batch)
    runner = ModelRunner(model, pool, page, max(args.max_model_len, ctx + 16), cuda_graph_max_bs=max_b)
    g = torch.Generator().manual_seed(0)

    def step_fn(b: int):  # type: ignore[no-untyped-def]
        table = torch.arange(b * pages_per, dtype=torch.int32, device="cuda").view(b, pages_per)
        chunks = [[t] for t in torch.randint(10, mcfg.vocab_size, (b,), generator=g).tolist()]
        return lambda: runner.forward(chunks, [ctx] * b, table, list(range(b)))

    from semipd_runtime.partition import GreenPartition

    result: dict[str, Any] = {"device": name, "shape": args.shape, "layers": mcfg.num_layers, "ctx": ctx,
                              "hbm_tbps_datasheet": hbm, "copy_tbps_full": copy_bandwidth() / 1e12,
                              "torch": torch.__version__, "breakdown": [], "sm_sweep": []}
    print(f"{name}: copy {result['copy_tbps_full']:.2f} TB/s (datasheet {hbm})", flush=True)
    if not args.only_sweep:
        print("== weight GEMMs at decode rows (all layers' copies in one graph: no L2 reuse)", flush=True)
        result["gemms"] = gemm_table(model, args.gemm_rows, args.iters)
    if args.only_gemms:
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return
    green = GreenPartition(100 - args.green_percent, args.green_percent) if args.green_percent else None
    for b in [] if args.only_sweep else args.batches:
        fn, kv = step_fn(b), b * (ctx + 1) * per_token
        r = breakdown(fn, args.steps, args.iters, weight_bytes, kv, hbm) | {"batch": b, "sms": "all"}
        print_breakdown(f"B={b} ctx={ctx} full GPU", r)
        result["breakdown"].append(r)
        if green is not None:
            with green.role_context_factory("decode")():
                r = breakdown(fn, args.steps, args.iters, weight_bytes, kv, hbm)
            r |= {"batch": b, "sms": green.sm_count["decode"]}
            print_breakdown(f"B={b} ctx={ctx} green {green.sm_count['decode']} SMs", r)
            result["breakdown"].append(r)
    total_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{'SMs':>4} {'copy TB/s':>9} " + " ".join(f"{'B=' + str(b) + ' ms':>9} {'%roof':>5}"
                                                    for b in args.sweep_batches), flush=True)
    for sms in [*args.sm_sweep, total_sms]:
        part = None if sms >= total_sms else GreenPartition(100 - 100 * sms / total_sms, 100 * sms / total_sms)
        ctx_mgr = part.role_context_factory("decode")() if part else torch.cuda.stream(torch.cuda.current_stream())
        with ctx_mgr:
            row: dict[str, Any] = {"sms": part.sm_count["decode"] if part else total_sms,
                                   "copy_tbps": green_copy_bandwidth() / 1e12}
            for b in args.sweep_batches:
                ms = time_step(step_fn(b), args.iters) * 1e3
                roof = (weight_bytes + b * (ctx + 1) * per_token) / (hbm * 1e12) * 1e3
                row[f"b{b}_ms"], row[f"b{b}_pct_of_roofline"] = ms, 100 * roof / ms
            if args.carveout:
                row["gate_up_m64"] = carveout_row(model, row["sms"], total_sms, args.iters)
        result["sm_sweep"].append(row)
        print(f"{row['sms']:>4} {row['copy_tbps']:>9.2f} " + " ".join(
            f"{row[f'b{b}_ms']:>9.2f} {row[f'b{b}_pct_of_roofline']:>4.0f}%" for b in args.sweep_batches)
            + ("   gate_up M=64 TB/s: cuBLAS {cublas_tbps:.2f}, Lt {cublaslt_tbps:.2f}, Lt + SM target "
               "{cublaslt_carveout_tbps:.2f}".format(**row["gate_up_m64"]) if args.carveout else ""), flush=True)
    from semipd_kernels import ops

    if ops.skinny_gemm_enabled():  # what the per-shape timing picked (None: cuBLAS won), beside the step times
        from semipd_kernels.triton.skinny_gemm import chosen

        result["skinny_chosen"] = [[n, k, rows, str(dt), cfg] for (n, k, rows, dt), cfg in chosen().items()]
        for n, k, rows, dt, cfg in result["skinny_chosen"]:
            print(f"skinny pick N={n} K={k} rows<={rows} {dt}: {cfg or 'cuBLAS'}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
