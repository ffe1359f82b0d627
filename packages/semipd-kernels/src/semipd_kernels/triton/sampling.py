"""Sampling without a host sync: one program per row, thresholds found by radix select instead of a sort.

Semantics are those of `reference.sample` (read its docstring). The k-th largest scaled logit (top-k) and the top-p
cut are found exactly by an 8-pass radix-16 search over order-preserving 32-bit keys of the float values, so no
vocabulary sort is needed; a final pass runs the Gumbel-max race with the counter-based noise of `semipd_kernels.rng`
(same integer hash, so torch and Triton pick the same token).
"""

from __future__ import annotations

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
def _radix_threshold(row_ptr, vocab, temp, zmax, floor, target, USE_MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Largest value t (a scaled logit of the row) with weight(z >= t and z >= floor) >= target, where the weight
    is a count (top-k) or the unnormalised mass exp(z - zmax) (top-p)."""
    base = tl.zeros((), dtype=tl.int64)
    digits = tl.arange(0, 16).to(tl.int64)
    for p in tl.static_range(8):
        thr = base + (digits << (28 - 4 * p))
        weight = tl.zeros([16], dtype=tl.float32)
        for v0 in range(0, vocab, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            z = _scaled(row_ptr, offs, vocab, temp)
            ok = (offs < vocab) & (z >= floor)
            if USE_MASS:
                w = tl.where(ok, tl.exp(z - zmax), 0.0)
            else:
                w = tl.where(ok, 1.0, 0.0)
            hit = _order_key(z)[:, None] >= thr[None, :]
            weight += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
        # weights fall with the digit; digit 0 always qualifies (invariant), guard it against rounding
        digit = tl.maximum(tl.sum((weight >= target).to(tl.int32), axis=0) - 1, 0)
        base = base + (digit.to(tl.int64) << (28 - 4 * p))
    return _from_order_key(base)


@triton.jit
def _sample_kernel(
    logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr, steps_ptr, out_ptr,
    logits_stride, vocab, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    temp = tl.load(temp_ptr + row)
    greedy = temp <= 0.0
    sampling = temp > 0.0
    temp = tl.where(greedy, 1.0, temp)

    zmax = tl.full((), float("-inf"), dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        zmax = tl.maximum(zmax, tl.max(_scaled(row_ptr, v0 + tl.arange(0, BLOCK_V), vocab, temp), axis=0))

    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    t_k = tl.full((), float("-inf"), dtype=tl.float32)
    t_p = tl.full((), float("-inf"), dtype=tl.float32)
    if sampling:
        if (top_k > 0) & (top_k < vocab):
            t_k = _radix_threshold(row_ptr, vocab, temp, zmax, t_k, top_k.to(tl.float32), False, BLOCK_V)
        if top_p < 1.0:
            total = tl.zeros((), dtype=tl.float32)
            for v0 in range(0, vocab, BLOCK_V):
                offs = v0 + tl.arange(0, BLOCK_V)
                z = _scaled(row_ptr, offs, vocab, temp)
                total += tl.sum(tl.where((offs < vocab) & (z >= t_k), tl.exp(z - zmax), 0.0), axis=0)
            t_p = _radix_threshold(row_ptr, vocab, temp, zmax, t_k, top_p * total, True, BLOCK_V)

    key = _row_key(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    best = tl.full((), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((), dtype=tl.int64)
    for v0 in range(0, vocab, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        z = _scaled(row_ptr, offs, vocab, temp)
        if greedy:
            score = z  # temperature forced to 1: the raw logits
        else:
            keep = (z >= t_k) & (z >= t_p) & (tl.exp(z - zmax) >= min_p)
            u = _uniform(key, offs.to(tl.int64))
            score = tl.where(keep, z - tl.log(-tl.log(u)), float("-inf"))
        score = tl.where(offs < vocab, score, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_idx = tl.argmax(score, axis=0).to(tl.int64) + v0
        better = block_best > best  # strict: the earliest index wins ties, as torch.argmax
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_idx)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor,
    steps: Tensor,
    block_v: int = 1024,
) -> Tensor:
    """Same contract as `reference.sample`."""
    checks.check_sample(logits, temperature, top_k, top_p, min_p, seeds, steps)
    bsz, vocab = logits.shape
    out = torch.empty(bsz, dtype=torch.int64, device=logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if bsz:
        _sample_kernel[(bsz,)](
            logits, temperature, top_k, top_p, min_p, seeds, steps, out,
            logits.stride(0), vocab, BLOCK_V=block_v, num_warps=8,
        )
    return out


assert rng.MUL_A == 0x21F0AAAD and rng.MUL_B == 0x735A2D97 and rng.KEY_SALT == 0x1B873593  # keep twins in step
