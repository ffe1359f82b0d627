"""Triton split-KV paged decode attention vs the torch reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels import reference as ref
from semipd_kernels.testing import assert_close, paged_kv, test_device
from semipd_kernels.triton import decode_attention as dec

DEVICE = test_device()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3),
    page_size=st.sampled_from([1, 4, 16]),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    num_splits=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 999),
)
def test_decode_attention_matches_reference(
    seq_lens: list[int], page_size: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
    num_splits: int | None, seed: int,
) -> None:
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = paged_kv(seq_lens, page_size, kv_heads, head_dim, dtype, DEVICE, generator=g)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = dec.decode_attention(q, k_cache, v_cache, table, lens, scale, num_splits=num_splits, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref.decode_attention(q, k_cache, v_cache, table, lens, scale))


def test_decode_attention_many_splits_and_short_rows() -> None:
    # more splits than tiles for the short request: its empty splits must not disturb the merge
    g = torch.Generator().manual_seed(7)
    seq_lens = [3, 100]
    k_cache, v_cache, table = paged_kv(seq_lens, 8, 2, 64, torch.float32, DEVICE, generator=g)
    q = torch.randn(2, 4, 64, generator=g).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = dec.decode_attention(q, k_cache, v_cache, table, lens, 0.125, num_splits=5, block_n=16)
    assert_close(out, ref.decode_attention(q, k_cache, v_cache, table, lens, 0.125))


def test_choose_num_splits() -> None:
    assert dec.choose_num_splits(batch=64, num_kv_heads=8, max_context=4096, num_sms=132) == 2
    assert dec.choose_num_splits(batch=1, num_kv_heads=8, max_context=32768, num_sms=132) == 32
    assert dec.choose_num_splits(batch=1, num_kv_heads=8, max_context=100, num_sms=132) == 1


def test_decode_attention_rejects_bad_gqa() -> None:
    k_cache = torch.zeros(2, 4, 3, 64, device=DEVICE)
    q = torch.zeros(1, 4, 64, device=DEVICE)
    table = torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        lens = torch.ones(1, dtype=torch.int32, device=DEVICE)
        dec.decode_attention(q, k_cache, k_cache.clone(), table, lens, 1.0)
