"""GEMV-shaped Triton kernel (decode rows, M <= 16) vs torch.nn.functional.linear, every split of K."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels.testing import TOLERANCE, test_device
from semipd_kernels.triton import skinny_gemm

DEVICE = test_device()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 16),
    n=st.integers(1, 70),
    k=st.sampled_from([16, 48, 96]),
    block_n=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
    split_k=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 999),
)
def test_skinny_linear_matches_torch(m: int, n: int, k: int, block_n: int, block_k: int, split_k: int,
                                     dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype=dtype, device=DEVICE)
    out = skinny_gemm.skinny_linear(x, w, (block_n, block_k, split_k, 4, 2))
    assert out.dtype == dtype and out.shape == (m, n)
    expected = torch.nn.functional.linear(x.float(), w.float())
    tol = TOLERANCE[dtype] * k**0.5  # the sum over k grows the absolute error
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=TOLERANCE[dtype])


def test_skinny_linear_keeps_leading_dims_and_refuses_what_it_cannot_do() -> None:
    x = torch.randn(2, 3, 32, device=DEVICE)
    w = torch.randn(20, 32, device=DEVICE)
    out = skinny_gemm.skinny_linear(x, w, (16, 16, 1, 4, 2))
    assert out.shape == (2, 3, 20)
    torch.testing.assert_close(out, x @ w.T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="in_features"):
        skinny_gemm.skinny_linear(x, torch.randn(20, 31, device=DEVICE))
    with pytest.raises(ValueError, match="at most 16 rows"):
        skinny_gemm.skinny_linear(torch.randn(17, 32, device=DEVICE), w)
    with pytest.raises(ValueError, match="contiguous along K"):
        skinny_gemm.skinny_linear(x, torch.randn(32, 20, device=DEVICE).T)
    with pytest.raises(ValueError, match="SPLIT_K"):
        skinny_gemm.skinny_linear(x, w, (16, 16, 0, 4, 2))


def test_ops_linear_takes_the_skinny_kernel_only_when_asked_and_only_for_few_rows(monkeypatch) -> None:
    from semipd_kernels import ops

    calls: list[int] = []
    real = skinny_gemm.skinny_linear
    monkeypatch.setattr(skinny_gemm, "skinny_linear", lambda x, w, *a: calls.append(x.shape[0]) or real(x, w, *a))
    monkeypatch.setattr(ops, "_backend", "triton")
    w, bias = torch.randn(24, 32, device=DEVICE), torch.randn(24, device=DEVICE)
    few, many = torch.randn(3, 32, device=DEVICE), torch.randn(17, 32, device=DEVICE)
    for enabled in (False, True):
        ops.set_skinny_gemm(enabled)
        try:
            for x in (few, many):
                torch.testing.assert_close(ops.linear(x, w, bias), x @ w.T + bias, atol=1e-4, rtol=1e-4)
        finally:
            ops.set_skinny_gemm(False)
    assert calls == [3]  # the 3-row call with the kernel on; 17 rows and the off state stay on cuBLAS
    assert ops.SKINNY_MAX_ROWS == skinny_gemm.MAX_ROWS


def test_choose_takes_the_fastest_candidate_and_cublas_when_it_wins() -> None:
    a, b = skinny_gemm.CONFIGS[0], skinny_gemm.CONFIGS[1]
    assert skinny_gemm.choose([None, a, b], {None: 3.0, a: 2.0, b: 2.5}.__getitem__) == a
    assert skinny_gemm.choose([None, a, b], {None: 1.0, a: 2.0, b: 2.5}.__getitem__) is None
    assert skinny_gemm.choose([None, a], {None: 2.0, a: 2.0}.__getitem__) is None  # a tie keeps cuBLAS
    with pytest.raises(ValueError, match="at least one"):
        skinny_gemm.choose([], lambda c: 0.0)


def test_linear_keys_its_pick_by_shape_and_row_bucket_and_adds_the_bias() -> None:
    w, bias = torch.randn(40, 32, device=DEVICE), torch.randn(40, device=DEVICE)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 32, device=DEVICE)
        torch.testing.assert_close(skinny_gemm.linear(x, w, bias), x @ w.T + bias, atol=1e-4, rtol=1e-4)
    buckets = sorted(r for (n, k, r, dt) in skinny_gemm.chosen() if (n, k, dt) == (40, 32, torch.float32))
    assert buckets == [1, 4, 16]  # 1 row, 3-4 rows, 9 rows -> 16
