"""GEMV-shaped Triton kernel for decode's linear layers at few rows (M <= 16): y = x @ weight.T.

At decode batch 1-16 a linear layer is a weight stream: every weight byte is read once, the rows of x are
reused from registers. cuBLAS reaches ~2.7 TB/s of the H100's 3.35 there (benchmarks/RESULTS.md, "decode
breakdown"); the persistent GEMM (`gemm.py`) half that, because its 64-row tiles waste the MMA on padding and
its grid of one program per SM leaves too few loads in flight. Here each program owns BLOCK_N weight rows (and,
with SPLIT_K > 1, one K slice of them, reduced by fp32 atomics into a workspace), so a 4096-wide layer already
launches hundreds of programs that each stream a contiguous block. `linear` (ops.linear with SEMIPD_SKINNY_GEMM=1)
times every config and cuBLAS once per shape and keeps the fastest; `benchmarks/bench_decode_breakdown.py
--only-gemms` prints the same comparison per weight shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from semipd_kernels.triton.common import dot_precision, interpreting, mma

MAX_ROWS = 16
# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) tried by the benchmark; the first is the default
CONFIGS: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 256, 1, 4, 4), (32, 256, 1, 4, 4), (16, 512, 1, 4, 3), (64, 128, 1, 4, 4),
    (16, 256, 2, 4, 4), (32, 128, 4, 4, 4), (16, 128, 4, 2, 4),
)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    k_start = tl.program_id(1) * k_per_split
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)  # rows past N read row 0; the store drops them
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        w = tl.load(w_ptr + rn_safe[None, :] * stride_wn + rk[:, None], mask=rk[:, None] < K, other=0.0)
        acc += mma(x, w, DOT_PRECISION, UPCAST)
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn.to(tl.int64)[None, :]
    keep = (rm[:, None] < M) & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(out, acc, mask=keep)
    else:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=keep)


def skinny_linear(x: Tensor, weight: Tensor, config: tuple[int, int, int, int, int] | None = None) -> Tensor:
    """x [..., K] @ weight[N, K].T -> [..., N] in x.dtype, fp32 accumulation, for at most 16 rows of x.

    config: (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages), default `CONFIGS[0]`. SPLIT_K > 1 splits K over
    that many programs per column block and adds their fp32 partial sums atomically (the order of the adds, so
    the last bits, may differ between runs)."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"weight's in_features {k} must equal x's last dim {x.shape[-1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal weight dtype {weight.dtype}")
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous along K (a [N, K] row-major matrix)")
    a = x.reshape(-1, k).contiguous()
    m = a.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}; use the GEMM")
    block_n, block_k, split_k, num_warps, num_stages = config or CONFIGS[0]
    if min(block_n, block_k) < 16 or split_k < 1:
        raise ValueError(f"config needs BLOCK_N, BLOCK_K >= 16 and SPLIT_K >= 1, got {config}")
    if m == 0 or n == 0:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    atomic = splits > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    _skinny_kernel[(triton.cdiv(n, block_n), splits)](
        a, weight, out, m, n, k, k_per_split, a.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=atomic,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    return (out.to(x.dtype) if atomic else out).view(*x.shape[:-1], n)


Config = tuple[int, int, int, int, int]
# (N, K, rows rounded up to a power of 2, dtype) -> the fastest config, or None where cuBLAS won; filled on first
# use of a shape outside CUDA-graph capture (the model's warm-up), read during capture and replay
_chosen: dict[tuple[int, int, int, torch.dtype], Config | None] = {}


def choose(candidates: list[Config | None], time_ms: Callable[[Config | None], float]) -> Config | None:
    """The candidate (a config, or None for cuBLAS) with the least time; ties keep the earlier one."""
    if not candidates:
        raise ValueError("choose needs at least one candidate")
    return min(candidates, key=time_ms)


def _time_on_gpu(a: Tensor, weight: Tensor) -> Callable[[Config | None], float]:
    def time_ms(config: Config | None) -> float:
        fn = (lambda: torch.nn.functional.linear(a, weight)) if config is None else \
            (lambda: skinny_linear(a, weight, config))
        return float(triton.testing.do_bench(fn, warmup=5, rep=20))
    return time_ms


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`ops.linear`'s Triton path, for at most 16 rows (the bias, if any, added after).

    On CUDA each (shape, row bucket) is timed once, on first use, against every config and cuBLAS, and the fastest
    is kept. The timing runs where that first use runs: a step later replayed in another SM share keeps the pick
    (on the H200 a pick made on the whole GPU was 3% slower in a 72-SM partition; RESULTS.md, fifth session)."""
    n, k = weight.shape
    rows = x.numel() // max(k, 1)
    key = (n, k, 1 << max(rows - 1, 0).bit_length(), x.dtype)
    if key not in _chosen:
        if not x.is_cuda:
            _chosen[key] = CONFIGS[0]
        elif torch.cuda.is_current_stream_capturing():
            return torch.nn.functional.linear(x, weight, bias)  # untimed shape met inside capture: stay on cuBLAS
        else:
            probe = torch.randn(key[2], k, dtype=x.dtype, device=x.device)
            _chosen[key] = choose([None, *CONFIGS], _time_on_gpu(probe, weight))
    config = _chosen[key]
    if config is None:
        return torch.nn.functional.linear(x, weight, bias)
    out = skinny_linear(x, weight, config)
    return out if bias is None else out.add_(bias)


def chosen() -> dict[tuple[int, int, int, torch.dtype], Config | None]:
    """What `linear` picked per (N, K, row bucket, dtype) so far (None: cuBLAS), for benchmarks' logs."""
    return dict(_chosen)
