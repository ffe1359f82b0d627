"""Persistent Triton GEMM for linear layers, y = x @ weight.T (+ bias), with the grid sized by the granted
SMs.

Under a green-context or MPS share a process owns only some SMs; a persistent kernel launched with one program
per *granted* SM walks the output tiles itself (grouped order for L2 reuse) instead of relying on a grid sized
for the whole device. cuBLAS stays the default for the model's linear layers; this kernel exists to be
benchmarked against it at full and partial SM counts (`benchmarks/bench_kernels.py`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels.sm_budget import current_sm_budget
from semipd_kernels.triton.common import dot_precision, interpreting, mma


@triton.jit
def _persistent_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K, num_programs,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    tiles_per_group = GROUP_M * num_pid_n
    for tile in range(pid, num_tiles, num_programs):
        # grouped ordering: GROUP_M row-blocks sweep the columns together so B tiles stay in L2
        group = tile // tiles_per_group
        first_m = group * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_size
        pid_n = (tile % tiles_per_group) // group_size
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # clamp out-of-range rows/cols to a valid index: their results are dropped at the store, no mask
        # needed
        rm_safe = tl.where(rm < M, rm, 0).to(tl.int64)
        rn_safe = tl.where(rn < N, rn, 0).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            a_ptrs = a_ptr + rm_safe[:, None] * stride_am + rk[None, :] * stride_ak
            b_ptrs = b_ptr + rn_safe[None, :] * stride_bn + rk[:, None] * stride_bk
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < K, other=0.0)
            acc += mma(a, b, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn_safe).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn.to(tl.int64)[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_config(m: int) -> dict[str, int]:
    """Tile shape by batch rows, tuned on H100 bf16: skinny (decode) GEMMs stream the weight with deep K
    tiles; big ones want 128x256 tiles (0.85-0.89x cuBLAS at 132 SMs with pointer loads, no TMA)."""
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    if m <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, num_sms: int | None = None,
    config: dict[str, int] | None = None,
) -> Tensor:
    """x [..., K] @ weight[N, K].T (+ bias[N]) -> [..., N] in x.dtype, fp32 accumulation.

    num_sms: the number of persistent programs, i.e. the SMs this process was granted (default: the device's).
    """
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight's in_features {weight.shape[1]} must equal x's last dim {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} must equal weight dtype {weight.dtype}")
    a = x.reshape(-1, k)
    m = a.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    if num_sms is None:
        num_sms = current_sm_budget() or (_device_sm_count(x.device.index or 0) if x.is_cuda else 4)
    if num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    cfg = dict(config or default_config(m))
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    programs = min(num_sms, tiles)
    _persistent_matmul_kernel[(programs,)](
        a, weight, out, bias if bias is not None else out,
        m, n, k, programs,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, EVEN_K=k % cfg["BLOCK_K"] == 0,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.view(*x.shape[:-1], n)
