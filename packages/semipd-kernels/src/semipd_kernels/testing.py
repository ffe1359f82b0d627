"""Helpers shared by the kernel tests and `benchmarks/bench_kernels.py --check`: devices, tolerances,
inputs."""

from __future__ import annotations

import torch
from torch import Tensor

# absolute and relative tolerance per dtype: fp32 kernels only reorder sums; bf16 keeps 8 mantissa bits
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def test_device() -> str:
    """CUDA when present, else CPU (where Triton kernels need TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


test_device.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, scale: float = 1.0
) -> None:
    """Compare in float32 with the tolerance of `dtype` (default: actual's dtype) times `scale`."""
    tol = TOLERANCE[dtype or actual.dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def paged_kv(
    seq_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str,
    spare_pages: int = 3, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Random K/V caches and a page table whose pages are shuffled across requests; unused entries are -1."""
    pages_per_req = [-(-n // page_size) for n in seq_lens]
    total = sum(pages_per_req) + spare_pages
    shape = (total, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
    v_cache = torch.randn(shape, generator=generator).to(dtype=dtype, device=device)
    perm = torch.randperm(total, generator=generator)
    width = max(pages_per_req + [1]) + 1
    table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_req):
        table[b, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return k_cache, v_cache, table.to(device)
