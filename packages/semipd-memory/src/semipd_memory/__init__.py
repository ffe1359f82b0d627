"""semipd_memory: paged KV pool, page allocator and cross-process tensor sharing."""

from __future__ import annotations

from semipd_memory.kv_pool import KVPool
from semipd_memory.page_allocator import OutOfPagesError, PageAllocator
from semipd_memory.radix_cache import RadixCache
from semipd_memory.shared_weights import SharedModelWeights, bind_tensors, module_tensors
from semipd_memory.sharing import (
    OwnerInfo,
    SharedMemoryError,
    SharedStorage,
    SharedTensor,
    SharedTensorsHandle,
    export,
    export_tensors,
    import_,
    import_tensors,
    live_exports,
    release_export,
    release_import,
)

__all__ = [
    "KVPool",
    "OutOfPagesError",
    "OwnerInfo",
    "PageAllocator",
    "RadixCache",
    "SharedMemoryError",
    "SharedModelWeights",
    "SharedStorage",
    "SharedTensor",
    "SharedTensorsHandle",
    "bind_tensors",
    "export",
    "export_tensors",
    "import_",
    "import_tensors",
    "live_exports",
    "module_tensors",
    "release_export",
    "release_import",
]
