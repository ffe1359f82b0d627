"""Presence / frequency / repetition penalties over a batch of logits in one pass.

Semantics are those of `reference.apply_penalties`. One program per (row, vocab block) reads the logits and,
for rows with a state row, the packed int32 token counts (`reference.PROMPT_BIT`), and writes the penalised
logits: a decode step of B rows costs one read of B x V logits, one of B x V counts and one write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks
from semipd_kernels.reference import PROMPT_BIT


@triton.jit
def _penalties_kernel(
    logits_ptr, counts_ptr, rows_ptr, presence_ptr, frequency_ptr, repetition_ptr, out_ptr,
    logits_stride, counts_stride, out_stride, vocab, PROMPT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = offs < vocab
    x = tl.load(logits_ptr + b * logits_stride + offs, mask=inside, other=0.0).to(tl.float32)
    row = tl.load(rows_ptr + b).to(tl.int64)
    if row >= 0:  # rows without penalties are a plain copy: their state is never read
        state = tl.load(counts_ptr + row * counts_stride + offs, mask=inside, other=0)
        count = (state & (PROMPT - 1)).to(tl.float32)
        rep = tl.load(repetition_ptr + b)
        # div_rn: the correctly rounded division of the torch twin (the default is approximate)
        x = tl.where(state != 0, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
        x = x - tl.load(frequency_ptr + b) * count
        x = x - tl.where(count > 0, tl.load(presence_ptr + b), 0.0)
    tl.store(out_ptr + b * out_stride + offs, x, mask=inside)


def apply_penalties(
    logits: Tensor,
    token_counts: Tensor,
    rows: Tensor,
    presence: Tensor,
    frequency: Tensor,
    repetition: Tensor,
    block_v: int = 4096,
) -> Tensor:
    """Same contract as `reference.apply_penalties`: a new float32 tensor, no host sync."""
    checks.check_penalties(logits, token_counts, rows, presence, frequency, repetition)
    bsz, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if token_counts.stride(-1) != 1:
        token_counts = token_counts.contiguous()
    out = torch.empty((bsz, vocab), dtype=torch.float32, device=logits.device)
    if bsz == 0:
        return out
    block_v = min(block_v, triton.next_power_of_2(vocab))
    _penalties_kernel[(bsz, triton.cdiv(vocab, block_v))](
        logits, token_counts, rows, presence, frequency, repetition, out,
        logits.stride(0), token_counts.stride(0), out.stride(0), vocab, PROMPT=PROMPT_BIT, BLOCK_V=block_v,
        num_warps=4,
    )
    return out
