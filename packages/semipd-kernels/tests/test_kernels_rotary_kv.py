"""Fused rotary + paged KV store vs its reference (apply_rotary then store_kv) and the two Triton kernels."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from semipd_kernels import ops
from semipd_kernels import reference as ref
from semipd_kernels.testing import assert_close, test_device
from semipd_kernels.triton import kv_store, rotary, rotary_kv

DEVICE = test_device()
MAX_POS = 64


def _case(
    tokens: int, hq: int, hk: int, head_dim: int, dtype: torch.dtype, page_size: int, pads: list[int],
    seed: int, num_pages: int = 8, cache_dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """q/k/v as strided views of one qkv row (as the model makes them), scattered positions and slots (the
    rows in `pads` are -1), caches full of noise so that a stray write shows."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g).to(dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    slots = torch.randperm(num_pages * page_size, generator=g)[:tokens]
    slots[pads] = -1
    shape = (num_pages, page_size, hk, head_dim)
    return {
        "q": q.view(tokens, hq, head_dim),
        "k": k.view(tokens, hk, head_dim),
        "v": v.view(tokens, hk, head_dim),
        "positions": torch.randperm(MAX_POS, generator=g)[:tokens].to(DEVICE),
        "cos_sin_cache": ref.rope_cos_sin_cache(head_dim, MAX_POS, 10000.0, device=DEVICE),
        "k_cache": torch.randn(shape, generator=g).to(dtype=cache_dtype or dtype, device=DEVICE),
        "v_cache": torch.randn(shape, generator=g).to(dtype=cache_dtype or dtype, device=DEVICE),
        "slot_mapping": slots.to(DEVICE),
    }


def _run(fn: Callable[..., Tensor], case: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """fn on fresh copies of the caches: (q_out, k_cache, v_cache)."""
    kc, vc = case["k_cache"].clone(), case["v_cache"].clone()
    c = case | {"k_cache": kc, "v_cache": vc}
    q_out = fn(c["q"], c["k"], c["v"], c["positions"], c["cos_sin_cache"], kc, vc, c["slot_mapping"])
    return q_out, kc, vc


def _triton_pair(
    q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor, k_cache: Tensor,
    v_cache: Tensor, slot_mapping: Tensor,
) -> Tensor:
    """The two unfused Triton kernels (which read positions and slots as contiguous)."""
    q, k = rotary.apply_rotary(q, k, positions.contiguous(), cos_sin_cache)
    kv_store.store_kv(k, v, k_cache, v_cache, slot_mapping.contiguous())
    return q


def _check(case: dict[str, Tensor]) -> None:
    q_out, kc, vc = _run(rotary_kv.rotary_store_kv, case)
    q_exp, kc_exp, vc_exp = _run(ref.rotary_store_kv, case)
    assert q_out.shape == case["q"].shape and q_out.dtype == case["q"].dtype and q_out.is_contiguous()
    assert_close(q_out, q_exp)
    assert_close(kc, kc_exp)
    if vc.dtype == case["v"].dtype:
        assert torch.equal(vc, vc_exp)  # a plain copy
    else:
        assert_close(vc, vc_exp)
    # the same fp32 math and casts as the two unfused kernels: bit-identical to them
    q_pair, kc_pair, vc_pair = _run(_triton_pair, case)
    assert torch.equal(q_out, q_pair) and torch.equal(kc, kc_pair) and torch.equal(vc, vc_pair)
    # rows of padded tokens and slots nobody owns keep their old bytes
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool, device=DEVICE)
    slots = case["slot_mapping"]
    written[slots[slots >= 0].long()] = True
    for new, old in ((kc, case["k_cache"]), (vc, case["v_cache"])):
        flat_new, flat_old = new.view(written.shape[0], -1), old.view(written.shape[0], -1)
        assert torch.equal(flat_new[~written], flat_old[~written])
        assert not written.any() or not torch.equal(flat_new[written], flat_old[written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "hq,hk,head_dim",
    [(4, 2, 64), (4, 2, 128), (4, 4, 64), (4, 4, 128), (6, 3, 64), (12, 3, 128)],
    ids=["gqa-64", "gqa-128", "mha-64", "mha-128", "gqa-3heads-64", "gqa-3heads-128"],
)
def test_rotary_store_kv_matches_reference(hq: int, hk: int, head_dim: int, dtype: torch.dtype) -> None:
    _check(_case(7, hq, hk, head_dim, dtype, page_size=4, pads=[0, 4], seed=hq * head_dim))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(
    tokens=st.integers(1, 6),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([64, 128]),
    page_size=st.sampled_from([1, 4, 16]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    pad_mask=st.integers(0, 63),
    seed=st.integers(0, 99),
)
def test_rotary_store_kv_hypothesis(
    tokens: int, kv_heads: int, group: int, head_dim: int, page_size: int, dtype: torch.dtype,
    pad_mask: int, seed: int,
) -> None:
    pads = [t for t in range(tokens) if pad_mask >> t & 1]
    _check(_case(tokens, kv_heads * group, kv_heads, head_dim, dtype, page_size, pads, seed))


def test_rotary_store_kv_casts_like_the_pair() -> None:
    # fp32 activations into a bf16 cache: rotated k rounds to fp32 (a no-op) then bf16, v is cast once
    _check(_case(5, 4, 2, 64, torch.float32, page_size=4, pads=[2], seed=1, cache_dtype=torch.bfloat16))


def test_rotary_store_kv_all_padding_and_empty() -> None:
    case = _case(3, 4, 2, 64, torch.float32, page_size=4, pads=[0, 1, 2], seed=2)
    q_out, kc, vc = _run(rotary_kv.rotary_store_kv, case)
    assert torch.equal(kc, case["k_cache"]) and torch.equal(vc, case["v_cache"])
    assert_close(q_out, ref.apply_rotary(case["q"], case["k"], case["positions"], case["cos_sin_cache"])[0])
    empty = _case(0, 4, 2, 64, torch.float32, page_size=4, pads=[], seed=3)
    q_out, kc, vc = _run(rotary_kv.rotary_store_kv, empty)
    assert q_out.shape == (0, 4, 64) and torch.equal(kc, empty["k_cache"])


def test_rotary_store_kv_strided_positions_and_slots() -> None:
    case = _case(5, 4, 2, 128, torch.float32, page_size=4, pads=[3], seed=4)
    # every other entry of a longer buffer, as a view with stride 2
    case["positions"] = torch.stack([case["positions"], case["positions"].flip(0)], dim=1)[:, 0]
    case["slot_mapping"] = torch.stack([case["slot_mapping"], case["slot_mapping"].flip(0)], dim=1)[:, 0]
    assert case["positions"].stride(0) == 2 and case["slot_mapping"].stride(0) == 2
    _check(case)


def test_rotary_store_kv_rejects_mismatched_v() -> None:
    case = _case(2, 4, 2, 64, torch.float32, page_size=4, pads=[], seed=5)
    case["v"] = case["v"][:, :1]
    with pytest.raises(ValueError, match="v shape"):
        _run(rotary_kv.rotary_store_kv, case)


def test_ops_dispatches_rotary_store_kv() -> None:
    case = _case(4, 4, 2, 64, torch.float32, page_size=4, pads=[1], seed=6)
    before = ops.get_backend()
    try:
        for backend, impl in (("torch", ref.rotary_store_kv), ("triton", rotary_kv.rotary_store_kv)):
            ops.set_backend(backend)
            assert ops.backend_for("rotary_store_kv", case["q"]) == backend
            got, want = _run(ops.rotary_store_kv, case), _run(impl, case)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    finally:
        ops.set_backend(before)
