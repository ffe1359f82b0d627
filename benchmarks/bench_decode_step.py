"""Decode step time vs the HBM roofline: eager, CUDA graph, and CUDA graph inside a green-context partition.

    python benchmarks/bench_decode_step.py --shape llama-3.1-8b --batches 1 16 64 128 --contexts 1024 4096 \
        --green-percent 50 --out $OUT/decode_step.json

One decode step = the whole model forward for B requests of one new token each, every request with `ctx` tokens
of distinct KV in the paged cache (so the KV bytes really come from HBM). Roofline = (weight bytes + KV bytes
read) / bandwidth, with the datasheet bandwidth (--hbm-tbps) and with a measured device-to-device copy.
Times: median of CUDA-event-timed steps after warm-up (sampling not included: it is a separate kernel).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import SHAPES, datasheet_hbm_tbps, with_layers

from semipd_memory import KVPool
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import build_empty_model, init_random_weights


def copy_bandwidth() -> float:
    """Measured device-to-device copy, bytes/s (read + write)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record()
        y.copy_(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * x.numel() / statistics.median(times)


def time_step(fn, iters: int) -> float:  # type: ignore[no-untyped-def]
    stream = torch.cuda.current_stream()
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(stream)
        fn()
        e.record(stream)
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--green-percent", type=int, default=50, help="decode SM share of the green run (0: skip)")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="datasheet HBM bandwidth (default: by GPU name)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    hbm = args.hbm_tbps or datasheet_hbm_tbps(name)
    cfg_dict = with_layers(SHAPES[args.shape], args.layers)
    mcfg = ModelConfig.from_dict(cfg_dict)
    model = build_empty_model(mcfg, torch.device("cuda"), torch.bfloat16)
    init_random_weights(model, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not mcfg.tie_word_embeddings:  # the input embedding is gathered, not read whole
        weight_bytes -= model.embed_tokens.weight.numel() * 2
    page = 16
    max_ctx = max(args.contexts) + 16
    # distinct pages for the largest batch x context; smaller cases use a prefix of them
    need_tokens = max(args.batches) * max_ctx
    per_token = mcfg.num_layers * 2 * mcfg.num_kv_heads * mcfg.head_dim * 2
    free = torch.cuda.mem_get_info()[0] - (8 << 30)
    num_pages = min(need_tokens, free // per_token) // page
    pool = KVPool(mcfg.num_layers, num_pages, page, mcfg.num_kv_heads, mcfg.head_dim, torch.bfloat16,
                  torch.device("cuda"))
    for layer in range(mcfg.num_layers):
        pool.k(layer).normal_()
        pool.v(layer).normal_()
    bw_copy = copy_bandwidth()
    max_bs = max(args.batches)
    runner = ModelRunner(model, pool, page, max_ctx, cuda_graph_max_bs=max_bs)
    graphs = runner.graphs
    assert graphs is not None
    green = None
    if args.green_percent:
        from semipd_runtime.partition import GreenPartition

        green = GreenPartition(100 - args.green_percent, args.green_percent)
    rows = []
    g = torch.Generator().manual_seed(0)
    for ctx in args.contexts:
        for b in args.batches:
            pages_per = -(-(ctx + 1) // page)
            if b * pages_per > num_pages:
                print(json.dumps({"batch": b, "ctx": ctx, "skipped": "KV does not fit"}), flush=True)
                continue
            table = torch.arange(b * pages_per, dtype=torch.int32, device="cuda").view(b, pages_per)
            ids = torch.randint(10, mcfg.vocab_size, (b,), generator=g).tolist()
            chunks, starts = [[t] for t in ids], [ctx] * b
            rows_all = list(range(b))
            kv_bytes = b * (ctx + 1) * per_token
            roof = (weight_bytes + kv_bytes) / (hbm * 1e12)
            row: dict = {"batch": b, "ctx": ctx, "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
                         "roofline_ms": roof * 1e3, "copy_roofline_ms": (weight_bytes + kv_bytes) / bw_copy * 1e3}
            runner.graphs = None
            t_eager = time_step(lambda: runner.forward(chunks, starts, table, rows_all), args.iters)
            runner.graphs = graphs
            t_graph = time_step(lambda: runner.forward(chunks, starts, table, rows_all), args.iters)
            row |= {"eager_ms": t_eager * 1e3, "graph_ms": t_graph * 1e3,
                    "graph_pct_of_roofline": 100 * roof / t_graph, "eager_pct_of_roofline": 100 * roof / t_eager}
            if green is not None:
                with green.role_context_factory("decode")():
                    t_green = time_step(lambda: runner.forward(chunks, starts, table, rows_all), args.iters)
                row |= {"green_decode_sms": green.sm_count["decode"], "green_graph_ms": t_green * 1e3,
                        "green_pct_of_roofline": 100 * roof / t_green}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'B':>4} {'ctx':>5} {'roof ms':>8} {'eager':>7} {'graph':>7} {'%roof':>6} {'green':>7} {'%roof':>6}")
    for r in rows:
        print(f"{r['batch']:>4} {r['ctx']:>5} {r['roofline_ms']:>8.2f} {r['eager_ms']:>7.2f} {r['graph_ms']:>7.2f} "
              f"{r['graph_pct_of_roofline']:>5.0f}% {r.get('green_graph_ms', float('nan')):>7.2f} "
              f"{r.get('green_pct_of_roofline', float('nan')):>5.0f}%")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "shape": args.shape, "layers": mcfg.num_layers,
                                        "hbm_tbps_datasheet": hbm, "copy_tbps_measured": bw_copy / 1e12,
                                        "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
