"""Persistent Triton GEMM (grid = granted SMs) vs torch.nn.functional.linear."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semipd_kernels.testing import TOLERANCE, test_device
from semipd_kernels.triton import gemm

DEVICE = test_device()
SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 70),
    n=st.integers(1, 90),
    k=st.sampled_from([16, 40, 64]),
    num_sms=st.integers(1, 5),
    with_bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 999),
)
def test_linear_matches_torch(
    m: int, n: int, k: int, num_sms: int, with_bias: bool, dtype: torch.dtype, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype=dtype, device=DEVICE)
    b = torch.randn(n, generator=g).to(dtype=dtype, device=DEVICE) if with_bias else None
    out = gemm.linear(x, w, b, num_sms=num_sms, config=SMALL)
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    # the sum over k grows the absolute error; scale the dtype tolerance by sqrt(k)
    tol = TOLERANCE[dtype] * k**0.5
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=TOLERANCE[dtype])


def test_linear_keeps_leading_dims_and_checks_shapes() -> None:
    x = torch.randn(2, 3, 32, device=DEVICE)
    w = torch.randn(20, 32, device=DEVICE)
    out = gemm.linear(x, w, num_sms=2, config=SMALL)
    assert out.shape == (2, 3, 20)
    torch.testing.assert_close(out, x @ w.T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="in_features"):
        gemm.linear(x, torch.randn(20, 31, device=DEVICE))
    with pytest.raises(ValueError, match="num_sms"):
        gemm.linear(x, w, num_sms=0)
