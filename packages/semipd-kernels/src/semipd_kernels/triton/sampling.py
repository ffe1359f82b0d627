"""Sampling without a host sync; thresholds found by radix select instead of a vocabulary sort.

Semantics are those of `reference.sample` (read its docstring). Kernel 1 (one program per row) finds the k-th
largest scaled logit (top-k) and the top-p cut exactly, by an 8-pass radix-16 search over order-preserving
32-bit keys of the float values; rows that filter nothing skip it. Kernel 2 (rows x vocab chunks, so even one
row fills the GPU) runs the Gumbel-max race with the counter-based noise of `semipd_kernels.rng` (same integer
hash as torch, so both pick the same token) and merges chunk winners with a 64-bit atomic max.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks, rng


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF  # constants as in semipd_kernels.rng (MUL_A, MUL_B)
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


@triton.jit
def _row_key(seed, step):
    h = _hash32(seed & 0xFFFFFFFF)
    h = _hash32(h ^ ((seed >> 32) & 0xFFFFFFFF))
    h = _hash32(h ^ (step & 0xFFFFFFFF))
    return _hash32(h ^ ((step >> 32) & 0xFFFFFFFF))


@triton.jit
def _uniform(key, index):
    h = _hash32((index + key) & 0xFFFFFFFF)
    h = _hash32(h ^ (key ^ 0x1B873593))  # rng.KEY_SALT
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _order_key(z):
    """float32 -> int64 in [0, 2^32) with the same order as the floats."""
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return key.to(tl.int64) + 2147483647 + 1


@triton.jit
def _from_order_key(ukey):
    key = (ukey - 2147483647 - 1).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scaled(row_ptr, offs, vocab, temp):
    x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
    return tl.math.div_rn(x, temp)


@triton.jit
def _radix_threshold(
    row_ptr, vocab, temp, zmax, floor, target, USE_MASS: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Largest value t (a scaled logit of the row) with weight(z >= t and z >= floor) >= target, where the
    weight is a count (top-k) or the unnormalised mass exp(z - zmax) (top-p). Partial sums stay per lane
    across the vocab loop and are reduced once per pass (a cross-warp reduction per tile would dominate)."""
    base = tl.zeros((), dtype=tl.int64)
    digits = tl.arange(0, 16).to(tl.int64)
    for p in tl.static_range(8):
        thr = base + (digits << (28 - 4 * p))
        lanes = tl.zeros([BLOCK_V, 16], dtype=tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            z = _scaled(row_ptr, offs, vocab, temp)
            ok = (offs < vocab) & (z >= floor)
            if USE_MASS:  # noqa: SIM108 - a constexpr branch: only the taken side is compiled
                w = tl.where(ok, tl.exp(z - zmax), 0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
            hit = _order_key(z)[:, None] >= thr[None, :]
            lanes += tl.where(hit, w[:, None], 0.0)
        weight = tl.sum(lanes, axis=0)
        # weights fall with the digit; digit 0 always qualifies (invariant), guard it against rounding
        digit = tl.maximum(tl.sum((weight >= target).to(tl.int32), axis=0) - 1, 0)
        base = base + (digit.to(tl.int64) << (28 - 4 * p))
    return _from_order_key(base)


@triton.jit
def _thresholds_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, thr_ptr, logits_stride, vocab,
    BLOCK_V: tl.constexpr, RADIX_BLOCK_V: tl.constexpr,
):
    """Per row: (max z, top-k cut, top-p cut) into thr[row, 0:3]; rows that filter nothing skip all passes."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    temp = tl.load(temp_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    k_on = (temp > 0.0) & (top_k > 0) & (top_k < vocab)
    p_on = (temp > 0.0) & (top_p < 1.0)
    zmax = tl.zeros((), dtype=tl.float32)
    t_k = tl.full((), float("-inf"), dtype=tl.float32)
    t_p = tl.full((), float("-inf"), dtype=tl.float32)
    if k_on | p_on | ((temp > 0.0) & (min_p > 0.0)):
        lane_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            lane_max = tl.maximum(lane_max, _scaled(row_ptr, v0 + tl.arange(0, BLOCK_V), vocab, temp))
        zmax = tl.max(lane_max, axis=0)
        if k_on:
            t_k = _radix_threshold(
                row_ptr, vocab, temp, zmax, t_k, top_k.to(tl.float32), False, RADIX_BLOCK_V
            )
        if p_on:
            lane_total = tl.zeros([BLOCK_V], dtype=tl.float32)
            for v0 in range(0, vocab, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                z = _scaled(row_ptr, offs, vocab, temp)
                lane_total += tl.where((offs < vocab) & (z >= t_k), tl.exp(z - zmax), 0.0)
            total = tl.sum(lane_total, axis=0)
            t_p = _radix_threshold(row_ptr, vocab, temp, zmax, t_k, top_p * total, True, RADIX_BLOCK_V)
    tl.store(thr_ptr + row * 3, zmax)
    tl.store(thr_ptr + row * 3 + 1, t_k)
    tl.store(thr_ptr + row * 3 + 2, t_p)


@triton.jit
def _race_kernel(
    logits_ptr, temp_ptr, min_p_ptr, seeds_ptr, steps_ptr, thr_ptr, packed_ptr, logits_stride, vocab, chunk,
    BLOCK_V: tl.constexpr,
):
    """Grid (row, vocab chunk): the Gumbel-max race over one chunk; the winner (score, index) is packed into
    one int64 (order key high, ~index low: ties go to the lowest index) and merged across chunks with
    atomic_max."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk
    row_ptr = logits_ptr + row * logits_stride
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    temp = tl.where(greedy, 1.0, temp)
    min_p = tl.load(min_p_ptr + row)
    # min-p off: compare against -1 so the exp of an unset zmax can never drop a token
    min_p = tl.where(min_p > 0.0, min_p, -1.0)
    zmax = tl.load(thr_ptr + row * 3)
    t_k = tl.load(thr_ptr + row * 3 + 1)
    t_p = tl.load(thr_ptr + row * 3 + 2)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    # per-lane running best; a lane sees increasing indices, so strict '>' keeps its earliest maximum
    lane_best = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_idx = tl.zeros([BLOCK_V], dtype=tl.int32)
    end = tl.minimum(start + chunk, vocab)
    for v0 in range(start, end, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = _scaled(row_ptr, offs, vocab, temp)
        if greedy:
            score = z  # temperature forced to 1: the raw logits
        else:
            keep = (z >= t_k) & (z >= t_p) & (tl.exp(z - zmax) >= min_p)
            u = _uniform(key, offs.to(tl.int64))
            score = tl.where(keep, z - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(offs < end, score, float("-inf"))
        better = score > lane_best
        lane_idx = tl.where(better, offs, lane_idx)
        lane_best = tl.where(better, score, lane_best)
    best = tl.max(lane_best, axis=0)
    idx = tl.min(tl.where(lane_best == best, lane_idx, 2147483647), axis=0).to(tl.int64)
    packed = ((_order_key(best) - 2147483647 - 1) << 32) + ((-1 - idx) & 0xFFFFFFFF)
    tl.atomic_max(packed_ptr + row, packed)


@functools.cache
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor,
    steps: Tensor,
    block_v: int = 2048,
    radix_block_v: int = 512,
    num_chunks: int | None = None,
) -> Tensor:
    """Same contract as `reference.sample`. Three launches (thresholds, chunked race, unpack), no host
    sync."""
    checks.check_sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
    bsz, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if bsz == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if num_chunks is None:
        sms = _device_sm_count(logits.device.index or 0) if logits.is_cuda else 4
        num_chunks = max(1, min(triton.cdiv(2 * sms, bsz), triton.cdiv(vocab, 2 * block_v)))
    chunk = triton.cdiv(triton.cdiv(vocab, num_chunks), block_v) * block_v
    thr = torch.empty((bsz, 3), dtype=torch.float32, device=logits.device)
    packed = torch.full((bsz,), -(2**63), dtype=torch.int64, device=logits.device)
    _thresholds_kernel[(bsz,)](
        logits, temperature, top_k, top_p, min_p, thr, logits.stride(0), vocab,
        BLOCK_V=block_v, RADIX_BLOCK_V=radix_block_v, num_warps=8,
    )
    _race_kernel[(bsz, triton.cdiv(vocab, chunk))](
        logits, temperature, min_p, seeds, steps, thr, packed, logits.stride(0), vocab, chunk,
        BLOCK_V=block_v, num_warps=8,
    )
    return (~packed) & 0xFFFFFFFF


# keep the twins in step
assert rng.MUL_A == 0x21F0AAAD and rng.MUL_B == 0x735A2D97 and rng.KEY_SALT == 0x1B873593
