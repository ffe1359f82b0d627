"""Paged decode attention, split-KV ("flash-decoding") with a reduction step.

Grid (batch, kv_head, split): one program reads one KV head's pages once for all the GROUP query heads that
share it (GQA packed into the rows of one tl.dot), over 1/num_splits of that request's context. Each request's
context is cut into num_splits equal chunks on the device (no host sync), so long contexts at small batch
still fill the GPU. A second kernel merges the per-split partial outputs with their log-sum-exps. With one
split the first kernel writes the output directly.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks
from semipd_kernels.sm_budget import current_sm_budget
from semipd_kernels.triton.common import dot_precision, interpreting, mma

LOG2E = 1.4426950408889634
MAX_SPLITS = 32  # H100: B=1 ctx 32k ran best at 32 splits (1.97 TB/s) vs 64 or 128
MIN_TOKENS_PER_SPLIT = 256


# ints that change from batch to batch are not specialised on (value 1, divisible by 16): each new
# combination would compile another kernel (~1 s, holding the GIL) in the middle of serving
@triton.jit(do_not_specialize=["table_stride", "num_splits"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    q_stride_b, q_stride_h, table_stride, out_stride_b, out_stride_h,
    qk_scale, num_splits, page_size,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, WRITE_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    # equal chunks per request, rounded up to whole tiles
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_BLOCK)
    row_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=row_mask[:, None],
                other=0.0)

    m_i = tl.full([GROUP_BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_BLOCK], dtype=tl.float32)
    acc = tl.zeros([GROUP_BLOCK, HEAD_DIM], dtype=tl.float32)
    table_row = table_ptr + b * table_stride
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        page = tl.load(table_row + pos // page_size, mask=valid, other=0).to(tl.int64)
        slot = page * page_size + (pos % page_size)
        kv_off = (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM
        k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new

    has_data = l_i > 0.0
    o = acc / tl.where(has_data, l_i, 1.0)[:, None]
    if WRITE_PARTIAL:
        # partials: [B, Hq, num_splits, D] and lse [B, Hq, num_splits] (log2 domain), -inf for empty splits
        bh = b * (NUM_KV_HEADS * GROUP) + heads
        tl.store(part_o_ptr + (bh[:, None] * num_splits + split) * HEAD_DIM + dims[None, :], o,
                 mask=row_mask[:, None])
        lse = tl.where(has_data, m_i + tl.log2(tl.where(has_data, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + bh * num_splits + split, lse, mask=row_mask)
    else:
        tl.store(out_ptr + b * out_stride_b + heads[:, None] * out_stride_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, out_stride_b, out_stride_h, num_heads, num_splits,
    SPLIT_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    bh = b * num_heads + h
    splits = tl.arange(0, SPLIT_BLOCK)
    smask = splits < num_splits
    lse = tl.load(part_lse_ptr + bh * num_splits + splits, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): output zeros, not NaN
    w = tl.exp2(lse - m)
    dims = tl.arange(0, HEAD_DIM)
    o_ptrs = part_o_ptr + (bh * num_splits + splits[:, None]) * HEAD_DIM + dims[None, :]
    o = tl.load(o_ptrs, mask=smask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * out_stride_b + h * out_stride_h + dims, res.to(out_ptr.dtype.element_ty))


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Enough (batch, kv_head, split) programs for ~4 waves of the SMs, never chunks under 256 tokens."""
    programs = max(1, batch * num_kv_heads)
    want = triton.cdiv(4 * num_sms, programs)
    cap = max(1, min(MAX_SPLITS, max_context // MIN_TOKENS_PER_SPLIT))
    return max(1, min(want, cap))


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    seq_lens: Tensor,
    scale: float,
    num_splits: int | None = None,
    num_sms: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Tensor:
    """Same contract as `reference.decode_attention`. num_sms: SMs this process was granted (default: all)."""
    checks.check_decode(q, k_cache, v_cache, page_table, seq_lens)
    bsz, hq, d = q.shape
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if d & (d - 1):
        raise ValueError(f"q head_dim {d}: the Triton decode kernel needs a power of two")
    if q.stride(-1) != 1:
        q = q.contiguous()
    group = hq // hk
    out = torch.empty((bsz, hq, d), dtype=q.dtype, device=q.device)
    if bsz == 0:
        return out
    if num_splits is None:
        if num_sms is None:
            num_sms = current_sm_budget() or (_device_sm_count(q.device.index or 0) if q.is_cuda else 8)
        num_splits = choose_num_splits(bsz, hk, page_table.shape[1] * page_size, num_sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    partial = num_splits > 1
    part_o = torch.empty((bsz, hq, num_splits, d), dtype=torch.float32, device=q.device) if partial else out
    part_lse = torch.empty((bsz, hq, num_splits), dtype=torch.float32, device=q.device) if partial else out
    _decode_split_kernel[(bsz, hk, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, out, part_o, part_lse,
        q.stride(0), q.stride(1), page_table.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E, num_splits, page_size,
        NUM_KV_HEADS=hk, GROUP=group, GROUP_BLOCK=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_N=block_n, WRITE_PARTIAL=partial, DOT_PRECISION=dot_precision(q.dtype), UPCAST=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    if partial:
        _decode_reduce_kernel[(bsz, hq)](
            part_o, part_lse, out, out.stride(0), out.stride(1), hq, num_splits,
            SPLIT_BLOCK=triton.next_power_of_2(num_splits), HEAD_DIM=d, num_warps=4,
        )
    return out
