from __future__ import annotations

import pytest
import torch

from semipd_memory import KVPool


def test_one_allocation_with_per_layer_views() -> None:
    pool = KVPool(num_layers=3, num_pages=5, page_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    assert pool.buffer.shape == (3, 2, 5, 4, 2, 8) and pool.buffer.dtype == torch.bfloat16
    assert bool((pool.buffer == 0).all())
    base = pool.buffer.data_ptr()
    layer_bytes = 2 * 5 * 4 * 2 * 8 * 2
    for layer in range(3):
        k, v = pool.k(layer), pool.v(layer)
        assert k.shape == v.shape == (5, 4, 2, 8) and k.is_contiguous() and v.is_contiguous()
        assert k.data_ptr() == base + layer * layer_bytes
        assert v.data_ptr() == base + layer * layer_bytes + layer_bytes // 2
        assert k.untyped_storage().data_ptr() == base  # a view, not a copy
    pool.k(1)[2, 3, 1, 5] = 7.0
    pool.v(2)[0] = -1.0
    assert pool.buffer[1, 0, 2, 3, 1, 5].item() == 7.0
    assert bool((pool.buffer[2, 1, 0] == -1).all()) and int((pool.buffer != 0).sum()) == 1 + 4 * 2 * 8
    assert pool.nbytes == 3 * layer_bytes
    assert pool.num_layers == 3 and pool.num_pages == 5 and pool.page_size == 4
    assert pool.num_kv_heads == 2 and pool.head_dim == 8 and pool.dtype == torch.bfloat16


def test_sizing_from_a_byte_budget() -> None:
    shape = dict(num_layers=4, page_size=16, num_kv_heads=2, head_dim=64)
    per_page = KVPool.bytes_per_page(**shape, dtype=torch.float16)
    assert per_page == 2 * 4 * 16 * 2 * 64 * 2
    pool = KVPool(num_pages=3, **shape, dtype=torch.float16)
    assert pool.nbytes == 3 * per_page
    assert KVPool.pages_for_budget(10 * per_page - 1, 4, 16, 2, 64, torch.float16) == 9
    assert KVPool.pages_for_budget(10 * per_page, 4, 16, 2, 64, torch.float16) == 10
    assert KVPool.pages_for_budget(0, 4, 16, 2, 64, torch.float32) == 0
    assert KVPool.bytes_per_page(4, 16, 2, 64, torch.float32) == 2 * per_page
    with pytest.raises(ValueError, match="budget_bytes"):
        KVPool.pages_for_budget(-1, 4, 16, 2, 64, torch.float16)


def test_from_buffer_wraps_without_copy_and_checks_shape() -> None:
    pool = KVPool(2, 3, 4, 1, 8, torch.float32)
    again = KVPool.from_buffer(pool.buffer, num_layers=2, num_pages=3, page_size=4, num_kv_heads=1, head_dim=8)
    again.k(1)[0, 0, 0, 0] = 5.0
    assert pool.k(1)[0, 0, 0, 0].item() == 5.0
    with pytest.raises(ValueError, match=r"buffer has shape \(2, 2, 3, 4, 1, 8\), expected \(2, 2, 4, 4, 1, 8\)"):
        KVPool.from_buffer(pool.buffer, num_layers=2, num_pages=4, page_size=4, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="contiguous"):
        KVPool.from_buffer(pool.buffer.transpose(0, 1).contiguous().transpose(0, 1), num_layers=2, num_pages=3,
                           page_size=4, num_kv_heads=1, head_dim=8)
    with pytest.raises(TypeError, match=r"buffer must be a torch\.Tensor"):
        KVPool.from_buffer([1, 2], num_layers=2, num_pages=3, page_size=4, num_kv_heads=1, head_dim=8)  # type: ignore


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        KVPool(2, 0, 4, 1, 8, torch.float32)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        KVPool(2, 3, 4, 1, 8.0, torch.float32)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        KVPool(2, 3, 4, 1, 8, "float16")  # type: ignore[arg-type]
    pool = KVPool(2, 3, 4, 1, 8, torch.float32)
    with pytest.raises(IndexError, match=r"layer must be an int in \[0, 2\)"):
        pool.k(2)
    with pytest.raises(IndexError, match="layer"):
        pool.v(-1)
