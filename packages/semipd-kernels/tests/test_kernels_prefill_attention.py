"""Triton paged causal prefill attention (cached prefix, chunked prefill, mixed decode rows) vs the
reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels import reference as ref
from semipd_kernels.testing import assert_close, paged_kv, test_device
from semipd_kernels.triton import prefill_attention as pre

DEVICE = test_device()


def _run(
    prefix_and_new: list[tuple[int, int]], page_size: int, kv_heads: int, group: int, head_dim: int,
    dtype: torch.dtype, seed: int, block_m: int = 16, block_n: int = 16,
) -> None:
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in prefix_and_new]
    k_cache, v_cache, table = paged_kv(seq_lens, page_size, kv_heads, head_dim, dtype, DEVICE, generator=g)
    cu = [0]
    for _, n in prefix_and_new:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], kv_heads * group, head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = pre.prefill_attention(
        q, k_cache, v_cache, table, cu_t, lens, scale, block_m=block_m, block_n=block_n
    )
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, ref.prefill_attention(q, k_cache, v_cache, table, cu_t, lens, scale))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    prefix_and_new=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 40)), min_size=1, max_size=3),
    page_size=st.sampled_from([1, 4, 16]),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([64, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 999),
)
def test_prefill_attention_matches_reference(
    prefix_and_new: list[tuple[int, int]], page_size: int, kv_heads: int, group: int, head_dim: int,
    dtype: torch.dtype, seed: int,
) -> None:
    _run(prefix_and_new, page_size, kv_heads, group, head_dim, dtype, seed)


def test_prefill_attention_mixed_decode_rows_and_rectangular_tiles() -> None:
    # q_len 1 rows (decode inside a chunked-prefill batch) next to a long chunk; BLOCK_M != BLOCK_N
    _run([(37, 1), (0, 45), (20, 1), (5, 19)], page_size=8, kv_heads=2, group=2, head_dim=64,
         dtype=torch.float32, seed=5, block_m=32, block_n=16)


def test_prefill_attention_empty_request_is_skipped() -> None:
    # a request with no new tokens (cu_seqlens equal) must not write anything or shift the others
    _run([(4, 3), (9, 0), (0, 5)], page_size=4, kv_heads=1, group=2, head_dim=64, dtype=torch.float32, seed=6)
