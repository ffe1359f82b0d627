"""Scatter the new tokens' K/V into their page slots (slot = page * page_size + offset; negative = skip)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_tok_stride, k_head_stride, v_tok_stride, v_head_stride,
    num_heads,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_BLOCK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS)[:, None]
        cols = tl.arange(0, DIM_BLOCK)[None, :]
        mask = (heads < num_heads) & (cols < HEAD_DIM)
        # cache slots are contiguous [Hk, D] rows, so one slot is num_heads * HEAD_DIM elements
        dst = slot * num_heads * HEAD_DIM + heads * HEAD_DIM + cols
        k = tl.load(k_ptr + tok * k_tok_stride + heads * k_head_stride + cols, mask=mask)
        v = tl.load(v_ptr + tok * v_tok_stride + heads * v_head_stride + cols, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    checks.check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    tokens, hk, d = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if tokens:
        _store_kv_kernel[(tokens,)](
            k, v, k_cache, v_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            hk,
            HEADS=triton.next_power_of_2(hk), HEAD_DIM=d, DIM_BLOCK=triton.next_power_of_2(d), num_warps=4,
        )
