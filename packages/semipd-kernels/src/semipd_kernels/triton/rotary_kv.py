"""Rotary on q and k fused with the paged K/V store: one program per token, all q heads and kv heads.

The same result as `rotary.apply_rotary` then `kv_store.store_kv`, in one launch instead of two, and rotated
k goes from registers straight into its page slot rather than through an HBM temporary. Rotated k is rounded
to k's dtype and then to the cache's, as the two-op pair does; padded tokens (slot < 0) write nothing but
still get their q rotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks


@triton.jit
def _load_halves(ptr, mask, HALF: tl.constexpr):
    return tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + HALF, mask=mask, other=0.0)


@triton.jit
def _rotate(x1, x2, cos, sin):
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, q_out_ptr, pos_ptr, cos_sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    q_tok_stride, q_head_stride, k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
    qo_tok_stride, qo_head_stride, cos_sin_stride, pos_stride, slot_stride,
    num_q_heads, num_kv_heads,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok * pos_stride).to(tl.int64)
    slot = tl.load(slot_ptr + tok * slot_stride).to(tl.int64)
    cols = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_sin_ptr + pos * cos_sin_stride + cols).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * cos_sin_stride + HALF + cols).to(tl.float32)

    qh = tl.arange(0, Q_HEADS)[:, None]
    q_mask = qh < num_q_heads
    q1, q2 = _load_halves(q_ptr + tok * q_tok_stride + qh * q_head_stride + cols, q_mask, HALF)
    r1, r2 = _rotate(q1, q2, cos, sin)
    q_dst = q_out_ptr + tok * qo_tok_stride + qh * qo_head_stride + cols
    tl.store(q_dst, r1.to(q_out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, r2.to(q_out_ptr.dtype.element_ty), mask=q_mask)

    if slot >= 0:
        kh = tl.arange(0, KV_HEADS)[:, None]
        kv_mask = kh < num_kv_heads
        k1, k2 = _load_halves(k_ptr + tok * k_tok_stride + kh * k_head_stride + cols, kv_mask, HALF)
        v1, v2 = _load_halves(v_ptr + tok * v_tok_stride + kh * v_head_stride + cols, kv_mask, HALF)
        # new names only: the compiler rejects a block that rebinds a variable to another type
        kr1, kr2 = _rotate(k1, k2, cos, sin)
        # cache slots are contiguous [Hk, D] rows; the double cast mirrors apply_rotary's k output dtype
        dst = slot * num_kv_heads * (2 * HALF) + kh * (2 * HALF) + cols
        kc1 = kr1.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
        kc2 = kr2.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
        tl.store(k_cache_ptr + dst, kc1, mask=kv_mask)
        tl.store(k_cache_ptr + dst + HALF, kc2, mask=kv_mask)
        tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    checks.check_rotary(q, k, positions, cos_sin_cache)
    checks.check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    tokens, hq, d = q.shape
    hk = k.shape[1]
    half = d // 2
    if half & (half - 1):
        raise ValueError(f"q head_dim {d}: the Triton rotary kernel needs head_dim/2 to be a power of two")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    cos_sin_cache = _last_dim_contiguous(cos_sin_cache)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens:
        _rotary_store_kv_kernel[(tokens,)](
            q, k, v, q_out, positions, cos_sin_cache, slot_mapping, k_cache, v_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            q_out.stride(0), q_out.stride(1), cos_sin_cache.stride(0),
            positions.stride(0), slot_mapping.stride(0),
            hq, hk,
            Q_HEADS=triton.next_power_of_2(hq), KV_HEADS=triton.next_power_of_2(hk), HALF=half, num_warps=4,
        )
    return q_out
