"""Grammar bitmask application: the reference against a bit-by-bit rule, the Triton kernel against the
reference (rows with and without a mask, vocab sizes that are not a multiple of 32, masks narrower than the
vocabulary)."""

from __future__ import annotations

import pytest
import torch

from semipd_kernels import ops
from semipd_kernels import reference as ref
from semipd_kernels.testing import test_device
from semipd_kernels.triton import token_bitmask

DEVICE = test_device()


def _inputs(bsz: int, vocab: int, words: int, rows: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(bsz, vocab, generator=g)
    bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=g, dtype=torch.int64).to(torch.int32)
    if rows:
        bitmask[0] = -1  # all allowed
    return logits, bitmask


def _slow(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    words = bitmask.shape[1]
    for i, r in enumerate(rows):
        for v in range(logits.shape[1]):
            allowed = v // 32 < words and (int(bitmask[i, v // 32]) >> (v % 32)) & 1
            if not allowed:
                out[r, v] = float("-inf")
    return out


@pytest.mark.parametrize(("bsz", "vocab", "words", "rows"), [
    (4, 70, 3, [0, 2]),  # vocab not a multiple of 32
    (3, 96, 2, [2, 0, 1]),  # a mask narrower than the vocab bans the rest; rows out of order
    (2, 40, 2, []),  # nothing masked
])
def test_reference_matches_bit_rule(bsz: int, vocab: int, words: int, rows: list[int]) -> None:
    logits, bitmask = _inputs(bsz, vocab, words, rows, seed=bsz * vocab)
    expected = _slow(logits, bitmask, rows)
    got = logits.clone()
    ref.apply_token_bitmask(got, bitmask, torch.tensor(rows, dtype=torch.long))
    assert torch.equal(got, expected)
    untouched = [r for r in range(bsz) if r not in rows]
    assert torch.equal(got[untouched], logits[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bsz", "vocab", "rows"), [(6, 1000, [5, 1, 3]), (2, 4097, [0, 1]), (3, 33, [1])])
def test_triton_matches_reference(dtype: torch.dtype, bsz: int, vocab: int, rows: list[int]) -> None:
    words = (vocab + 31) // 32
    logits, bitmask = _inputs(bsz, vocab, words, rows, seed=vocab)
    logits = logits.to(dtype)
    r = torch.tensor(rows, dtype=torch.long)
    expected = logits.clone()
    ref.apply_token_bitmask(expected, bitmask, r)
    got = logits.to(DEVICE)
    token_bitmask.apply_token_bitmask(got, bitmask.to(DEVICE), r.to(DEVICE), block=256)
    assert torch.equal(got.cpu(), expected)


def test_masked_row_samples_only_allowed_tokens() -> None:
    # what the engine relies on: greedy and random sampling both land on an allowed token
    vocab = 300
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(3))
    allowed = [7, 130, 299]
    bitmask = torch.zeros(2, (vocab + 31) // 32, dtype=torch.int32)
    for v in allowed:
        bitmask[:, v // 32] |= torch.tensor(1 << (v % 32)).to(torch.int32)
    ops.apply_token_bitmask(logits, bitmask, torch.tensor([0, 1]))
    temp = torch.tensor([0.0, 1.0])
    tokens = ops.sample(logits, temp, torch.tensor([-1, -1], dtype=torch.int32), torch.ones(2), torch.zeros(2),
                        torch.tensor([1, 2]), torch.tensor([0, 0]))
    assert set(tokens.tolist()) <= set(allowed)


def test_sampling_never_picks_a_banned_token_where_the_noise_rounds_to_one() -> None:
    # seed 1, step 12: the uniform of index 10655 rounds to 1.0 in float32 (its Gumbel noise is +inf); a
    # banned token there once scored NaN and won the reference's argmax
    vocab = 49152
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, 12:] = float("-inf")
    args = dict(temperature=torch.tensor([0.8]), top_k=torch.tensor([-1], dtype=torch.int32),
                top_p=torch.tensor([1.0]), min_p=torch.tensor([0.0]), seeds=torch.tensor([1]),
                steps=torch.tensor([12]))
    assert int(ref.sample(logits, **args)) < 12
    dev = {k: v.to(DEVICE) for k, v in args.items()}
    assert int(ops.sample(logits.to(DEVICE), **dev)) == int(ref.sample(logits, **args))
