"""KVPool: the paged K/V cache of every layer in ONE allocation.

One buffer `[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]` (index 0 = K, 1 = V) so that a single
export shares the whole cache with another process, and `k(layer)` / `v(layer)` are contiguous views into it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from semipd_memory.page_allocator import _check_count


class KVPool:
    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = self._check_shape(num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        # zeros, not empty: kernels may read whole pages past a sequence's end, and 0 * NaN garbage is NaN
        self._setup(torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def from_buffer(
        cls, buffer: Tensor, *, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int
    ) -> KVPool:
        """A pool over an existing buffer (e.g. one imported from the owner process); nothing is copied."""
        shape = cls._check_shape(num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if not isinstance(buffer, Tensor):
            raise TypeError(f"buffer must be a torch.Tensor, got {type(buffer).__name__}")
        if tuple(buffer.shape) != shape:
            raise ValueError(f"buffer has shape {tuple(buffer.shape)}, expected {shape}")
        if not buffer.is_contiguous():
            raise ValueError("buffer must be contiguous")
        pool = cls.__new__(cls)
        pool._setup(buffer)
        return pool

    def _setup(self, buffer: Tensor) -> None:
        self.buffer = buffer
        self.num_layers, _, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = buffer.shape
        self.dtype = buffer.dtype
        self.device = buffer.device
        self._k = [buffer[i, 0] for i in range(self.num_layers)]
        self._v = [buffer[i, 1] for i in range(self.num_layers)]

    @staticmethod
    def _check_shape(
        num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (
            _check_count("num_layers", num_layers, minimum=1),
            2,
            _check_count("num_pages", num_pages, minimum=1),
            _check_count("page_size", page_size, minimum=1),
            _check_count("num_kv_heads", num_kv_heads, minimum=1),
            _check_count("head_dim", head_dim, minimum=1),
        )

    def k(self, layer: int) -> Tensor:
        """K cache of `layer`: [num_pages, page_size, num_kv_heads, head_dim] view."""
        return self._k[self._layer(layer)]

    def v(self, layer: int) -> Tensor:
        """V cache of `layer`: [num_pages, page_size, num_kv_heads, head_dim] view."""
        return self._v[self._layer(layer)]

    def _layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return layer

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one page costs across all layers, K and V."""
        for name, value in (("num_layers", num_layers), ("page_size", page_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            _check_count(name, value, minimum=1)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def pages_for_budget(
        cls, budget_bytes: int, num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """How many whole pages fit in `budget_bytes` (may be 0)."""
        _check_count("budget_bytes", budget_bytes)
        return budget_bytes // cls.bytes_per_page(num_layers, page_size, num_kv_heads, head_dim, dtype)

    def __repr__(self) -> str:
        return (
            f"KVPool(layers={self.num_layers}, pages={self.num_pages}, page_size={self.page_size}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, device={self.device})"
        )
