"""Triton RMSNorm / fused add, SiLU-and-mul, rotary and KV store vs their torch references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels import reference as ref
from semipd_kernels.testing import assert_close, test_device
from semipd_kernels.triton import activation, kv_store, norm, rotary

DEVICE = test_device()
FEW = settings(max_examples=6, deadline=None, derandomize=True)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


@FEW
@given(
    rows=st.integers(0, 5), hidden=st.sampled_from([8, 48, 64, 200]), dtype=DTYPES, seed=st.integers(0, 99)
)
def test_rms_norm_matches_reference(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> None:
    x = _randn(rows, hidden, dtype=dtype, seed=seed)
    w = _randn(hidden, dtype=dtype, seed=seed + 1)
    assert_close(norm.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))


@FEW
@given(rows=st.integers(1, 5), hidden=st.sampled_from([16, 96, 128]), dtype=DTYPES, seed=st.integers(0, 99))
def test_fused_add_rms_norm_matches_reference(rows: int, hidden: int, dtype: torch.dtype, seed: int) -> None:
    x, r = _randn(rows, hidden, dtype=dtype, seed=seed), _randn(rows, hidden, dtype=dtype, seed=seed + 1)
    w = _randn(hidden, dtype=dtype, seed=seed + 2)
    x0, r0 = x.clone(), r.clone()
    out, summed = norm.fused_add_rms_norm(x, r, w, 1e-5)
    exp_out, exp_sum = ref.fused_add_rms_norm(x, r, w, 1e-5)
    if dtype == torch.bfloat16:  # the CPU interpreter truncates fp32 -> bf16 instead of rounding to nearest
        assert_close(summed, exp_sum)
    else:
        assert torch.equal(summed, exp_sum)  # one rounding of an exact sum: bit-identical
    assert_close(out, exp_out)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched


def test_rms_norm_accepts_strided_rows() -> None:
    base = _randn(4, 96, dtype=torch.float32, seed=3)
    x = base[:, 16:80]  # row stride 96, last dim contiguous
    w = _randn(64, dtype=torch.float32, seed=4)
    assert_close(norm.rms_norm(x, w, 1e-6), ref.rms_norm(x.contiguous(), w, 1e-6))


@FEW
@given(rows=st.integers(0, 4), inter=st.sampled_from([1, 32, 100]), dtype=DTYPES, seed=st.integers(0, 99))
def test_silu_and_mul_matches_reference(rows: int, inter: int, dtype: torch.dtype, seed: int) -> None:
    x = _randn(rows, 2 * inter, dtype=dtype, seed=seed)
    assert_close(activation.silu_and_mul(x, block=64), ref.silu_and_mul(x))


@FEW
@given(
    tokens=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([64, 128]),
    dtype=DTYPES,
    seed=st.integers(0, 99),
)
def test_rotary_matches_reference(
    tokens: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, seed: int
) -> None:
    hq = kv_heads * group
    cache = ref.rope_cos_sin_cache(head_dim, 64, 10000.0, device=DEVICE)
    # q and k as strided views of one fused qkv output, as the model produces them
    qkv = _randn(tokens, (hq + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    pos = torch.randint(0, 64, (tokens,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    q_out, k_out = rotary.apply_rotary(q, k, pos, cache)
    q_exp, k_exp = ref.apply_rotary(q, k, pos, cache)
    assert_close(q_out, q_exp)
    assert_close(k_out, k_exp)


@FEW
@given(
    tokens=st.integers(1, 6),
    kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([64, 128]),
    page_size=st.sampled_from([1, 4, 16]),
    dtype=DTYPES,
    seed=st.integers(0, 99),
)
def test_store_kv_matches_reference(
    tokens: int, kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype, seed: int
) -> None:
    num_pages = 8
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens]
    slots[0] = -1  # a padding token must be skipped
    slots = slots.to(DEVICE)
    k = _randn(tokens, kv_heads, head_dim, dtype=dtype, seed=seed)
    v = _randn(tokens, kv_heads, head_dim, dtype=dtype, seed=seed + 1)
    shape = (num_pages, page_size, kv_heads, head_dim)
    caches = [torch.zeros(shape, dtype=dtype, device=DEVICE) for _ in range(4)]
    kv_store.store_kv(k, v, caches[0], caches[1], slots)
    ref.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].count_nonzero() == (tokens - 1) * kv_heads * head_dim


def test_store_kv_rejects_mismatched_heads() -> None:
    k = torch.zeros(2, 3, 64, device=DEVICE)
    cache = torch.zeros(4, 4, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="k_cache"):
        kv_store.store_kv(k, k, cache, cache.clone(), torch.zeros(2, dtype=torch.int64, device=DEVICE))
