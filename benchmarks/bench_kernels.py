"""Kernel micro-benchmarks: ours vs torch (SDPA / cuBLAS / eager) vs the H100 roofline, side by side.

    python benchmarks/bench_kernels.py --out results/kernels.json            # all benchmarks
    python benchmarks/bench_kernels.py --only decode,prefill --out k.json     # a subset
    python benchmarks/bench_kernels.py --only rotary_kv                       # fused rotary + KV store
    python benchmarks/bench_kernels.py --green --out k.json                   # + GEMM on green SM shares
    python benchmarks/bench_kernels.py --check --out check.json               # GPU correctness at real shapes

Shapes are Llama-3.1-8B's (32 q / 8 kv heads, head_dim 128, hidden 4096, bf16). Times are medians of
triton.testing.do_bench (L2 flushed between repetitions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HBM_TBPS = 3.35  # datasheet peak; main() sets it by GPU name (H100 SXM 3.35, H200 4.8)
BF16_TFLOPS = 989.0  # H100 SXM dense bf16 peak
HQ, HK, D, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
DT = torch.bfloat16


def _bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _bench_graph(fn: Callable[[], Any]) -> float:
    """Median milliseconds of a CUDA-graph replay of fn (no Python or launch overhead, as the engine's
    decode)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _bench(graph.replay)


def _row(kind: str, case: str, **fields: Any) -> dict[str, Any]:
    row = {"bench": kind, "case": case, **fields}
    fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
    print("  ".join(fields), flush=True)
    return row


def bench_decode() -> list[dict[str, Any]]:
    from semipd_kernels.testing import paged_kv
    from semipd_kernels.triton.decode_attention import decode_attention

    rows = []
    for bsz, ctx in ((64, 4096), (1, 32768), (8, 8192), (128, 1024), (32, 16384)):
        kc, vc, table = paged_kv([ctx] * bsz, 16, HK, D, DT, "cuda", spare_pages=0)
        q = torch.randn(bsz, HQ, D, dtype=DT, device="cuda")
        lens = torch.full((bsz,), ctx, dtype=torch.int32, device="cuda")
        ms = _bench(lambda: decode_attention(q, kc, vc, table, lens, D**-0.5))
        graph_ms = _bench_graph(lambda: decode_attention(q, kc, vc, table, lens, D**-0.5))
        nbytes = 2 * bsz * ctx * HK * D * 2 + 2 * q.numel() * 2
        # torch SDPA on KV already gathered contiguous (the gather itself not timed): a lower bound for torch
        keys = kc[table[:, : ctx // 16].long()].reshape(bsz, ctx, HK, D).transpose(1, 2).contiguous()
        vals = vc[table[:, : ctx // 16].long()].reshape(bsz, ctx, HK, D).transpose(1, 2).contiguous()
        q4 = q[:, :, None, :]
        try:
            sdpa_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, keys, vals, scale=D**-0.5, enable_gqa=True))
        except Exception as e:  # noqa: BLE001 - older torch without enable_gqa
            print(f"  sdpa skipped: {e}")
            sdpa_ms = float("nan")
        tbps = nbytes / ms / 1e9
        graph_tbps = nbytes / graph_ms / 1e9
        rows.append(_row("decode_attention", f"B={bsz} ctx={ctx}", ours_ms=ms, ours_TBps=tbps,
                         hbm_fraction=tbps / HBM_TBPS, ours_graph_ms=graph_ms, graph_TBps=graph_tbps,
                         graph_hbm_fraction=graph_tbps / HBM_TBPS, sdpa_gathered_ms=sdpa_ms,
                         speedup_vs_sdpa=sdpa_ms / ms))
        torch.cuda.empty_cache()
    return rows


def bench_prefill() -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from semipd_kernels.testing import paged_kv
    from semipd_kernels.triton.prefill_attention import prefill_attention

    rows = []
    for prefix, new in ((0, 1024), (0, 4096), (0, 8192), (0, 16384), (8192, 2048)):
        total = prefix + new
        kc, vc, table = paged_kv([total], 16, HK, D, DT, "cuda", spare_pages=0)
        q = torch.randn(new, HQ, D, dtype=DT, device="cuda")
        cu = torch.tensor([0, new], dtype=torch.int32, device="cuda")
        lens = torch.tensor([total], dtype=torch.int32, device="cuda")
        ms = _bench(lambda: prefill_attention(q, kc, vc, table, cu, lens, D**-0.5))
        graph_ms = _bench_graph(lambda: prefill_attention(q, kc, vc, table, cu, lens, D**-0.5))
        visible = new * prefix + new * (new + 1) / 2  # causal (query, key) pairs
        flops = 4 * HQ * D * visible
        row = {"ours_ms": ms, "ours_TFLOPs": flops / ms / 1e9, "ours_graph_TFLOPs": flops / graph_ms / 1e9}
        if prefix == 0:  # SDPA's causal mask is top-left aligned: only comparable without a prefix
            keys = kc[table[0, : total // 16].long()].reshape(total, HK, D)
            vals = vc[table[0, : total // 16].long()].reshape(total, HK, D)
            qh = q.transpose(0, 1)[None]
            kh = keys.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)[None].contiguous()
            vh = vals.repeat_interleave(HQ // HK, dim=1).transpose(0, 1)[None].contiguous()
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa_ms = _bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qh, kh, vh, is_causal=True, scale=D**-0.5))
            row |= {"sdpa_flash_ms": sdpa_ms, "sdpa_TFLOPs": flops / sdpa_ms / 1e9,
                    "ratio_vs_sdpa": sdpa_ms / ms}
        rows.append(_row("prefill_attention", f"prefix={prefix} new={new}", **row,
                         peak_fraction=row["ours_TFLOPs"] / BF16_TFLOPS))
        torch.cuda.empty_cache()
    return rows


def bench_elementwise() -> list[dict[str, Any]]:
    from semipd_kernels import reference as ref
    from semipd_kernels.triton import activation, norm, rotary

    rows = []
    cache = ref.rope_cos_sin_cache(D, 65536, 500000.0, device="cuda")
    for t in (64, 8192):
        x = torch.randn(t, HIDDEN, dtype=DT, device="cuda")
        r = torch.randn(t, HIDDEN, dtype=DT, device="cuda")
        w = torch.randn(HIDDEN, dtype=DT, device="cuda")
        gu = torch.randn(t, 2 * INTER, dtype=DT, device="cuda")
        q = torch.randn(t, HQ, D, dtype=DT, device="cuda")
        k = torch.randn(t, HK, D, dtype=DT, device="cuda")
        pos = torch.randint(0, 65536, (t,), device="cuda")
        cases = {
            "rms_norm": (lambda: norm.rms_norm(x, w, 1e-5), lambda: ref.rms_norm(x, w, 1e-5),
                         2 * x.numel() * 2),
            "fused_add_rms_norm": (lambda: norm.fused_add_rms_norm(x, r, w, 1e-5),
                                   lambda: ref.fused_add_rms_norm(x, r, w, 1e-5), 4 * x.numel() * 2),
            "silu_and_mul": (lambda: activation.silu_and_mul(gu), lambda: ref.silu_and_mul(gu),
                             3 * t * INTER * 2),
            "rotary": (lambda: rotary.apply_rotary(q, k, pos, cache),
                       lambda: ref.apply_rotary(q, k, pos, cache),
                       2 * (q.numel() + k.numel()) * 2 + t * D * 4),
        }
        for name, (ours, torch_fn, nbytes) in cases.items():
            ms, tms = _bench(ours), _bench(torch_fn)
            rows.append(_row(name, f"T={t}", ours_ms=ms, ours_TBps=nbytes / ms / 1e9,
                             hbm_fraction=nbytes / ms / 1e9 / HBM_TBPS, torch_ms=tms, speedup=tms / ms))
    return rows


def bench_rotary_kv() -> list[dict[str, Any]]:
    """One layer's decode-step rotary + KV store: the fused kernel vs apply_rotary then store_kv."""
    from semipd_kernels import reference as ref
    from semipd_kernels.triton import kv_store, rotary, rotary_kv

    rows = []
    cache = ref.rope_cos_sin_cache(D, 65536, 500000.0, device="cuda")
    page_size, num_pages = 16, 4096
    kc = torch.zeros(num_pages, page_size, HK, D, dtype=DT, device="cuda")
    vc = torch.zeros_like(kc)
    for bsz in (1, 64, 128):
        # q, k, v as views of one qkv projection output, as the model passes them
        qkv = torch.randn(bsz, (HQ + 2 * HK) * D, dtype=DT, device="cuda")
        q, k, v = (t.view(bsz, -1, D) for t in qkv.split([HQ * D, HK * D, HK * D], dim=-1))
        pos = torch.randint(0, 65536, (bsz,), device="cuda")
        slots = torch.randperm(num_pages * page_size, device="cuda")[:bsz]

        def fused() -> torch.Tensor:
            return rotary_kv.rotary_store_kv(q, k, v, pos, cache, kc, vc, slots)

        def separate() -> torch.Tensor:
            q_rot, k_rot = rotary.apply_rotary(q, k, pos, cache)
            kv_store.store_kv(k_rot, v, kc, vc, slots)
            return q_rot

        # q, k, v read and written once each (q out, k/v into their slots), a cos/sin row, two int64 indices
        nbytes = 2 * bsz * (HQ + 2 * HK) * D * 2 + bsz * (D * 4 + 2 * 8)
        separate_nbytes = nbytes + 2 * bsz * HK * D * 2  # rotated k written out and read back
        roofline_ms = nbytes / (HBM_TBPS * 1e9)
        ms, sep_ms = _bench(fused), _bench(separate)
        torch_ms = _bench(lambda: ref.rotary_store_kv(q, k, v, pos, cache, kc, vc, slots))
        graph_ms, sep_graph_ms = _bench_graph(fused), _bench_graph(separate)
        rows.append(_row("rotary_store_kv", f"B={bsz}", bytes=nbytes, separate_bytes=separate_nbytes,
                         roofline_ms=roofline_ms, fused_ms=ms, separate_ms=sep_ms, speedup=sep_ms / ms,
                         fused_graph_ms=graph_ms, separate_graph_ms=sep_graph_ms,
                         graph_speedup=sep_graph_ms / graph_ms, graph_hbm_fraction=roofline_ms / graph_ms,
                         torch_ms=torch_ms))
    return rows


def bench_sampling() -> list[dict[str, Any]]:
    from semipd_kernels import reference as ref
    from semipd_kernels.triton.sampling import sample

    rows = []
    for bsz in (1, 64, 256):
        logits = torch.randn(bsz, VOCAB, device="cuda") * 4
        for mode, (temp, top_k, top_p) in {"greedy": (0.0, 0, 1.0), "temp": (0.8, 0, 1.0),
                                           "top_k50_top_p0.9": (0.8, 50, 0.9)}.items():
            args = (torch.full((bsz,), temp, device="cuda"),
                    torch.full((bsz,), top_k, dtype=torch.int32, device="cuda"),
                    torch.full((bsz,), top_p, device="cuda"), torch.zeros(bsz, device="cuda"),
                    torch.arange(bsz, device="cuda"), torch.zeros(bsz, dtype=torch.int64, device="cuda"))
            ms, tms = _bench(lambda: sample(logits, *args)), _bench(lambda: ref.sample(logits, *args))
            rows.append(_row("sample", f"B={bsz} {mode}", ours_ms=ms, torch_ref_ms=tms, speedup=tms / ms))
    return rows


def bench_penalties() -> list[dict[str, Any]]:
    """apply_penalties over B rows of the 128k vocabulary: ours, the torch twin, the HBM roofline (logits and
    counts read, logits written)."""
    from semipd_kernels import reference as ref
    from semipd_kernels.triton.penalties import apply_penalties

    rows = []
    for bsz in (1, 64, 256):
        counts = torch.randint(0, 3, (bsz, VOCAB), dtype=torch.int32, device="cuda")
        args = (torch.randn(bsz, VOCAB, device="cuda"), counts, torch.arange(bsz, device="cuda"),
                torch.full((bsz,), 0.5, device="cuda"), torch.full((bsz,), 0.5, device="cuda"),
                torch.full((bsz,), 1.1, device="cuda"))
        ms, tms = _bench(lambda: apply_penalties(*args)), _bench(lambda: ref.apply_penalties(*args))
        roofline_ms = 3 * bsz * VOCAB * 4 / (HBM_TBPS * 1e12) * 1e3
        rows.append(_row("penalties", f"B={bsz}", ours_ms=ms, torch_ref_ms=tms, speedup=tms / ms,
                         hbm_fraction=roofline_ms / ms))
    return rows


GEMM_SHAPES = {"qkv": (HIDDEN, (HQ + 2 * HK) * D), "o": (HQ * D, HIDDEN), "gate_up": (HIDDEN, 2 * INTER),
               "down": (INTER, HIDDEN)}


def _gemm_rows(tag: str, sms: int, stream: torch.cuda.Stream | None) -> list[dict[str, Any]]:
    from semipd_kernels.triton.gemm import linear

    rows = []
    for m in (64, 8192):
        for name, (k, n) in GEMM_SHAPES.items():
            x = torch.randn(m, k, dtype=DT, device="cuda")
            w = torch.randn(n, k, dtype=DT, device="cuda") / k**0.5
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                ms = _bench(lambda: linear(x, w, num_sms=sms))
                cublas_ms = _bench(lambda: torch.nn.functional.linear(x, w))
            flops = 2 * m * n * k
            rows.append(_row("gemm", f"{tag} sms={sms} M={m} {name} {n}x{k}", ours_ms=ms,
                             ours_TFLOPs=flops / ms / 1e9, cublas_ms=cublas_ms,
                             cublas_TFLOPs=flops / cublas_ms / 1e9, ratio_vs_cublas=cublas_ms / ms))
    return rows


def bench_gemm(green: bool) -> list[dict[str, Any]]:
    total = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict[str, Any]] = []
    # without isolation: our grid is limited to n programs, cuBLAS has the whole device
    for sms in (total, total // 2, total // 4):
        rows += _gemm_rows("grid-only", sms, None)
    if not green:
        return rows
    try:
        from semipd_runtime.partition import GreenPartition
    except Exception as e:  # noqa: BLE001 - optional: needs semipd-runtime and cuda-python's driver bindings
        print(f"green-context GEMM skipped: {type(e).__name__}: {e}")
        return rows
    for percent in (50, 25):
        try:
            part = GreenPartition(100 - percent, percent)
        except Exception as e:  # noqa: BLE001 - no green contexts here: skip the row
            print(f"green-context GEMM at {percent}% skipped: {type(e).__name__}: {e}")
            continue
        try:
            granted = part.sm_count["decode"]
            rows += _gemm_rows(f"green({percent}%)", granted, part._streams["decode"])
        finally:
            part.close()
    return rows


def run_check(out: str | None) -> int:
    from semipd_kernels.gpu_check import run_all

    results = run_all("cuda")
    for r in results:
        print(json.dumps(r), flush=True)
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed"
          + (f"; failed: {failed}" if failed else ""))
    if out:
        with open(out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--only", default="decode,prefill,elementwise,rotary_kv,sampling,penalties,gemm",
                        help="comma-separated subset of: decode, prefill, elementwise, rotary_kv, sampling, "
                        "penalties, gemm")
    parser.add_argument("--green", action="store_true", help="also run GEMMs on green-context SM shares")
    parser.add_argument("--check", action="store_true", help="GPU correctness vs the references, then exit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    global HBM_TBPS
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_shapes import datasheet_hbm_tbps
    HBM_TBPS = datasheet_hbm_tbps(torch.cuda.get_device_name())
    if args.check:
        return run_check(args.out)
    benches: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "decode": bench_decode, "prefill": bench_prefill, "elementwise": bench_elementwise,
        "rotary_kv": bench_rotary_kv, "sampling": bench_sampling, "penalties": bench_penalties,
        "gemm": lambda: bench_gemm(args.green),
    }
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in benches]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; choose from {list(benches)}")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "hbm_TBps": HBM_TBPS,
                              "results": []}
    import triton

    report["triton"] = triton.__version__
    for name in wanted:
        print(f"== {name}", flush=True)
        report["results"] += benches[name]()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
