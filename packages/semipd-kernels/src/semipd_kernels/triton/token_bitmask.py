"""Apply grammar token bitmasks to the logits of some rows of a batch, in place (one launch for the batch).

A program handles one masked row and a block of the vocabulary: it reads the packed 32-bit words its block
covers (a block of 32 * k tokens reads k words) and writes -inf only where a token is banned, so an allowed token
costs a read of its word and nothing else. Semantics are `reference.apply_token_bitmask`'s."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, mask_ptr, rows_ptr, logits_stride, mask_stride, vocab, words,
                                BLOCK: tl.constexpr):
    g = tl.program_id(0)
    row = tl.load(rows_ptr + g).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < vocab
    word = cols // 32
    packed = tl.load(mask_ptr + g.to(tl.int64) * mask_stride + word, mask=in_vocab & (word < words), other=0)
    banned = ((packed >> (cols % 32)) & 1) == 0
    neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_stride + cols, neg_inf, mask=in_vocab & banned)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor, block: int = 2048) -> None:
    checks.check_token_bitmask(logits, bitmask, rows)
    n, vocab = rows.shape[0], logits.shape[1]
    if n == 0:
        return
    if bitmask.stride(-1) != 1:
        bitmask = bitmask.contiguous()
    grid = (n, triton.cdiv(vocab, block))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, logits.stride(0), bitmask.stride(0), vocab,
                                      bitmask.shape[1], BLOCK=block, num_warps=4)
