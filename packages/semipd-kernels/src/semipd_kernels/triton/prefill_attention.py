"""Causal variable-length prefill attention over paged KV (cached prefix / earlier chunks + new tokens).

Grid (q_head, q_block): the packed new tokens of all requests are cut into BLOCK_M-row blocks per request; a
device-side table maps a flat block id to (request, block) so no host sync is needed and the grid is only
cdiv(T, BLOCK_M) + B blocks tall. Each program runs flash attention over its request's pages in two phases:
key tiles every row may see (no masking) and the diagonal tiles (causal mask). Heads are the fast grid axis so
the GROUP query heads sharing one KV head run together and hit the same pages in L2; the heaviest (last)
blocks of the causal triangle start first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks
from semipd_kernels.triton.common import dot_precision, interpreting, mma

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row, start, end, kv_head, page_size, qk_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    dims = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            in_range = pos < end
            page = tl.load(table_row + pos // page_size, mask=in_range, other=0).to(tl.int64)
        else:
            page = tl.load(table_row + pos // page_size).to(tl.int64)
        kv_off = ((page * page_size + pos % page_size) * NUM_KV_HEADS + kv_head) * HEAD_DIM
        if MASKED:
            k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :])
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        if MASKED:
            visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :])
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


# ints that change from batch to batch are not specialised on (value 1, divisible by 16): each new
# combination would compile another kernel (~1 s, holding the GIL) in the middle of serving
@triton.jit(do_not_specialize=["table_stride", "num_reqs", "num_blocks"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, cu_q_ptr, seq_lens_ptr, block_req_ptr, cu_blocks_ptr, out_ptr,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, table_stride,
    qk_scale, page_size, num_reqs, num_blocks,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    head = tl.program_id(0)
    flat_block = num_blocks - 1 - tl.program_id(1)  # reversed: late (long) causal blocks first
    b = tl.load(block_req_ptr + flat_block)
    if b < num_reqs:
        blk = flat_block - tl.load(cu_blocks_ptr + b)
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        kv_len = tl.load(seq_lens_ptr + b)
        prefix = kv_len - q_len
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = rows < q_len
        q_pos = prefix + rows
        kv_head = head // GROUP
        dims = tl.arange(0, HEAD_DIM)
        tok = (q_start + rows).to(tl.int64)
        q_ptrs = q_ptr + tok[:, None] * q_stride_t + head * q_stride_h + dims[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
        table_row = table_ptr + b.to(tl.int64) * table_stride

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # keys before the block's first query position are visible to every row: no mask needed
        first_pos = prefix + blk * BLOCK_M
        full_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row, 0, full_end, kv_head, page_size,
            qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, False, DOT_PRECISION, UPCAST,
        )
        diag_end = tl.minimum(kv_len, first_pos + BLOCK_M)
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_row, full_end, diag_end, kv_head,
            page_size, qk_scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_N, True, DOT_PRECISION, UPCAST,
        )
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * out_stride_t + head * out_stride_h + dims[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs", "grid_blocks"])
def _block_map_kernel(
    cu_q_ptr, block_req_ptr, cu_blocks_ptr, num_reqs, grid_blocks,
    BLOCK_M: tl.constexpr, REQ_BLOCK: tl.constexpr, ID_BLOCK: tl.constexpr,
):
    """One program: per-request first block (exclusive cumsum of cdiv(q_len, BLOCK_M)) and, for every flat
    block id, the request that owns it (num_reqs for ids past the end). One launch instead of a chain of torch
    ops."""
    reqs = tl.arange(0, REQ_BLOCK)
    rmask = reqs < num_reqs
    start = tl.load(cu_q_ptr + reqs, mask=rmask, other=0)
    end = tl.load(cu_q_ptr + reqs + 1, mask=rmask, other=0)
    blocks = tl.where(rmask, (end - start + BLOCK_M - 1) // BLOCK_M, 0)
    last = tl.cumsum(blocks, axis=0)  # one past each request's last block
    tl.store(cu_blocks_ptr + reqs, last - blocks, mask=rmask)
    for i0 in range(0, grid_blocks, ID_BLOCK):
        ids = i0 + tl.arange(0, ID_BLOCK)
        owner = tl.sum(((last[None, :] <= ids[:, None]) & rmask[None, :]).to(tl.int32), axis=1)
        tl.store(block_req_ptr + ids, owner, mask=ids < grid_blocks)


def _block_map(cu_seqlens_q: Tensor, num_tokens: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """(block -> request table, per-request first block, grid height), computed on the device."""
    bsz = cu_seqlens_q.shape[0] - 1
    # sum_b cdiv(q_len_b, M) <= cdiv(T, M) + B: an upper bound known on the host
    grid_blocks = triton.cdiv(num_tokens, block_m) + bsz
    block_req = torch.empty(grid_blocks, dtype=torch.int32, device=cu_seqlens_q.device)
    cu_blocks = torch.empty(bsz, dtype=torch.int32, device=cu_seqlens_q.device)
    _block_map_kernel[(1,)](
        cu_seqlens_q, block_req, cu_blocks, bsz, grid_blocks,
        BLOCK_M=block_m, REQ_BLOCK=max(16, triton.next_power_of_2(bsz)), ID_BLOCK=64, num_warps=4,
    )
    return block_req, cu_blocks, grid_blocks


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> Tensor:
    """Same contract as `reference.prefill_attention`. Defaults tuned on H100 (bf16, head_dim 128): 128x64
    tiles with 4 warps for big batches, 64-row blocks below 4096 tokens so small prefills still fill the
    SMs."""
    checks.check_prefill(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens)
    tokens, hq, d = q.shape
    page_size, hk = k_cache.shape[1], k_cache.shape[2]
    if d & (d - 1):
        raise ValueError(f"q head_dim {d}: the Triton prefill kernel needs a power of two")
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty((tokens, hq, d), dtype=q.dtype, device=q.device)
    bsz = seq_lens.shape[0]
    if tokens == 0 or bsz == 0:
        return out
    if block_m is None:
        block_m = 128 if tokens >= 4096 else 64
    block_req, cu_blocks, grid_blocks = _block_map(cu_seqlens_q, tokens, block_m)
    _prefill_kernel[(hq, grid_blocks)](
        q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, block_req, cu_blocks, out,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), page_table.stride(0),
        scale * LOG2E, page_size, bsz, grid_blocks,
        NUM_KV_HEADS=hk, GROUP=hq // hk, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST=interpreting(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
