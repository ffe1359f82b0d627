"""Rotary embedding (HF/NeoX rotate-half over the full head_dim): one program per token, all q and k heads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, src_tok_stride, src_head_stride, dst_tok_stride, dst_head_stride,
    tok, num_heads, cos, sin, HEADS: tl.constexpr, HALF: tl.constexpr,
):
    heads = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    src = src_ptr + tok * src_tok_stride + heads * src_head_stride + cols
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + tok * dst_tok_stride + heads * dst_head_stride + cols
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr,
    q_tok_stride, q_head_stride, k_tok_stride, k_head_stride,
    qo_tok_stride, qo_head_stride, ko_tok_stride, ko_head_stride, cache_stride,
    num_q_heads, num_k_heads,
    Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(cache_ptr + pos * cache_stride + cols).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + cols).to(tl.float32)
    _rotate_heads(q_ptr, q_out_ptr, q_tok_stride, q_head_stride, qo_tok_stride, qo_head_stride,
                  tok, num_q_heads, cos, sin, Q_HEADS, HALF)
    _rotate_heads(k_ptr, k_out_ptr, k_tok_stride, k_head_stride, ko_tok_stride, ko_head_stride,
                  tok, num_k_heads, cos, sin, K_HEADS, HALF)


def apply_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    checks.check_rotary(q, k, positions, cos_sin_cache)
    tokens, hq, d = q.shape
    hk = k.shape[1]
    half = d // 2
    if half & (half - 1):
        raise ValueError(f"q head_dim {d}: the Triton rotary kernel needs head_dim/2 to be a power of two")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(
        k.shape, dtype=k.dtype, device=k.device
    )
    if tokens:
        _rotary_kernel[(tokens,)](
            q, k, q_out, k_out, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0),
            hq, hk,
            Q_HEADS=triton.next_power_of_2(hq), K_HEADS=triton.next_power_of_2(hk), HALF=half, num_warps=4,
        )
    return q_out, k_out
