"""semipd_memory: paged KV pool, page allocator and cross-process tensor sharing."""

from __future__ import annotations

from semipd_memory.kv_pool import KVPool
from semipd_memory.page_allocator import OutOfPagesError, PageAllocator

__all__ = ["KVPool", "OutOfPagesError", "PageAllocator"]
