"""Penalties: the torch reference against a plain per-token loop (the definition), the Triton kernel against
the reference on random batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels import ops
from semipd_kernels import reference as ref
from semipd_kernels.testing import test_device
from semipd_kernels.triton import penalties

DEVICE = test_device()


def _inputs(bsz: int, vocab: int, num_rows: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    counts = torch.randint(0, 4, (num_rows, vocab), generator=g, dtype=torch.int32)
    counts[torch.rand(num_rows, vocab, generator=g) < 0.5] = 0  # most tokens never seen
    counts |= (torch.rand(num_rows, vocab, generator=g) < 0.2).int() * ref.PROMPT_BIT
    rows = torch.randint(-1, num_rows, (bsz,), generator=g)
    args = {
        "logits": torch.randn(bsz, vocab, generator=g) * 4,
        "token_counts": counts,
        "rows": rows,
        "presence": torch.rand(bsz, generator=g) * 4 - 2,
        "frequency": torch.rand(bsz, generator=g) * 4 - 2,
        "repetition": torch.rand(bsz, generator=g) * 2 + 0.05,
    }
    args["logits"][:, ::7] = float("-inf")  # banned tokens stay banned
    return {k: v.to(DEVICE) for k, v in args.items()}


def _by_definition(args: dict[str, torch.Tensor]) -> torch.Tensor:
    out = args["logits"].cpu().clone()
    for b, row in enumerate(args["rows"].tolist()):
        if row < 0:
            continue
        for v in range(out.shape[1]):
            state = int(args["token_counts"][row, v])
            count, in_prompt = state & (ref.PROMPT_BIT - 1), bool(state & ref.PROMPT_BIT)
            x = float(out[b, v])
            if count or in_prompt:
                rep = float(args["repetition"][b])
                x = x / rep if x > 0 else x * rep
            x -= float(args["frequency"][b]) * count + (float(args["presence"][b]) if count else 0.0)
            out[b, v] = x
    return out


def test_reference_follows_the_definition() -> None:
    args = _inputs(5, 37, 3, torch.Generator().manual_seed(3))
    got = ref.apply_penalties(**args).cpu()
    torch.testing.assert_close(got, _by_definition(args), rtol=1e-5, atol=1e-5)
    assert torch.isneginf(got[:, ::7]).all()


def test_penalties_push_seen_tokens_down() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[3, ref.PROMPT_BIT, 0, ref.PROMPT_BIT | 1]], dtype=torch.int32)
    one = torch.ones(1)
    got = ref.apply_penalties(logits, counts, torch.zeros(1, dtype=torch.long), 0.5 * one, 0.25 * one, 2.0 * one)
    # token 0: 2/2 - 0.25*3 - 0.5; token 1 (prompt only): -2*2; token 2: unseen; token 3: 0.5/2 - 0.25 - 0.5
    assert got.tolist() == [[1.0 - 0.75 - 0.5, -4.0, 1.0, 0.25 - 0.25 - 0.5]]
    unchanged = ref.apply_penalties(logits, counts, torch.full((1,), -1), one, one, 2.0 * one)
    assert torch.equal(unchanged, logits)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(bsz=st.integers(1, 9), vocab=st.integers(1, 600), num_rows=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_kernel_equals_reference(bsz: int, vocab: int, num_rows: int, seed: int) -> None:
    args = _inputs(bsz, vocab, num_rows, torch.Generator().manual_seed(seed))
    got = penalties.apply_penalties(**args, block_v=128)
    assert got.dtype == torch.float32 and got.shape == (bsz, vocab)
    torch.testing.assert_close(got, ref.apply_penalties(**args), rtol=1e-6, atol=1e-6)


def test_kernel_strided_logits_and_empty_batch() -> None:
    args = _inputs(4, 300, 3, torch.Generator().manual_seed(1))
    wide = torch.randn(4, 512, device=DEVICE)
    args["logits"] = wide[:, :300]  # a view with row stride 512, as the CUDA graphs' static buffer gives
    torch.testing.assert_close(penalties.apply_penalties(**args, block_v=64), ref.apply_penalties(**args),
                               rtol=1e-6, atol=1e-6)
    empty = {k: v[:0] if k != "token_counts" else v for k, v in args.items()}
    assert penalties.apply_penalties(**empty).shape == (0, 300)


def test_shapes_are_checked() -> None:
    args = _inputs(2, 16, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="token_counts"):
        ops.apply_penalties(**{**args, "token_counts": args["token_counts"][:, :8]})
    with pytest.raises(ValueError, match="presence"):
        ops.apply_penalties(**{**args, "presence": args["presence"][:1]})
