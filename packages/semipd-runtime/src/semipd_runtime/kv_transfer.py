"""KV bytes between instances through the Mooncake transfer engine (P2P handshake, no metadata server): each side
registers its whole KV buffer ([layers, 2, pages, page_size, heads, head_dim], one allocation), so a page of a
layer's K or V is one contiguous run of bytes at a computable offset.

GPU pools and the non-CUDA Mooncake build (the one on PyPI for every platform): the engine can only read and write
host memory, so the pool gets a pinned host mirror of the same layout that Mooncake registers instead. The prefill
copies the pages it sends device -> mirror before the write; the decode copies the landed pages mirror -> device
before the request decodes (`landed`). The CUDA build (`mooncake-transfer-engine`) registers device memory itself,
so no mirror is made there. SEMIPD_KV_STAGING=1/0 forces the choice (tests stage a CPU pool)."""

from __future__ import annotations

import importlib.metadata
import logging
import os

import torch

from semipd_memory import KVPool
from semipd_runtime.pd_bootstrap import advertised_host

log = logging.getLogger(__name__)
MAX_BATCH_ENTRIES = 1024  # (address, length) pairs per Mooncake batch write


class MooncakeTransport:
    def __init__(self, host: str, protocol: str = "tcp", device_name: str = "") -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:  # an extra: a plain install stays light
            raise RuntimeError("--disaggregation-transfer-backend mooncake needs the Mooncake transfer engine: "
                               "pip install 'semipd-server[pd]' (or mooncake-transfer-engine on CUDA)") from e
        host = advertised_host(host)  # Mooncake's session name is what the peer dials
        self.engine = TransferEngine()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
        if rc != 0:
            raise RuntimeError(f"Mooncake TransferEngine.initialize({host!r}, P2PHANDSHAKE, {protocol}) returned {rc}")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self.base = 0
        self.page_bytes = 0
        self.num_pages = 0
        self.pool_buffer: torch.Tensor | None = None
        self.mirror: torch.Tensor | None = None  # the pinned host copy Mooncake sees when staging
        self.staged_bytes = 0

    def register(self, pool: KVPool) -> None:
        buf = self.pool_buffer = pool.buffer
        assert buf.is_contiguous()
        if _stages(buf):
            buf = self.mirror = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=buf.is_cuda)
            log.info("Mooncake: this build cannot address %s memory; KV pages travel through a pinned host mirror",
                     self.pool_buffer.device)
        nbytes = buf.numel() * buf.element_size()
        rc = self.engine.register_memory(buf.data_ptr(), nbytes)
        if rc != 0:
            raise RuntimeError(f"Mooncake register_memory of the KV pool ({nbytes} bytes) returned {rc}")
        self.base, self.num_pages, self.num_layers = buf.data_ptr(), pool.num_pages, pool.num_layers
        self.page_bytes = pool.page_size * pool.num_kv_heads * pool.head_dim * buf.element_size()
        log.info("Mooncake: session %s, KV buffer of %d bytes registered", self.session, nbytes)

    def write_pages(self, session: str, dst_base: int, dst_num_pages: int, src_pages: list[int],
                    dst_pages: list[int]) -> int:
        """Copy our pages src_pages[i] into the peer's dst_pages[i], every layer's K and V; returns bytes."""
        assert len(src_pages) == len(dst_pages)
        srcs, dsts, lens = [], [], []
        for layer in range(self.num_layers):
            for kv in range(2):
                row = layer * 2 + kv
                for s, d in _runs(src_pages, dst_pages):  # contiguous runs on both sides: one entry each
                    n = s[1] - s[0]
                    srcs.append(self.base + (row * self.num_pages + s[0]) * self.page_bytes)
                    dsts.append(dst_base + (row * dst_num_pages + d) * self.page_bytes)
                    lens.append(n * self.page_bytes)
        if not srcs:
            return 0
        self._stage(src_pages, to_host=True)
        # bounded batches: the TCP transport rejects (-1, "lane queue-full") a batch of tens of thousands of
        # entries, which scattered pages of an 8k prompt make (pages x layers x K/V)
        for i in range(0, len(srcs), MAX_BATCH_ENTRIES):
            j = i + MAX_BATCH_ENTRIES
            rc = self.engine.batch_transfer_sync_write(session, srcs[i:j], dsts[i:j], lens[i:j])
            if rc != 0:
                raise RuntimeError(f"Mooncake batch_transfer_sync_write to {session} returned {rc} "
                                   f"({len(srcs[i:j])} entries)")
        return sum(lens)

    def landed(self, pages: list[int]) -> None:
        """Decode side: the peer's write into `pages` completed; make it visible in the pool."""
        self._stage(pages, to_host=False)

    def _stage(self, pages: list[int], to_host: bool) -> None:
        if self.mirror is None or not pages or self.pool_buffer is None:
            return
        idx = torch.tensor(pages, dtype=torch.long)
        src, dst = (self.pool_buffer, self.mirror) if to_host else (self.mirror, self.pool_buffer)
        # [layers, 2, pages, ...]: one gather and one scatter for every layer's K and V
        dst[:, :, idx.to(dst.device)] = src[:, :, idx.to(src.device)].to(dst.device)
        self.staged_bytes += len(pages) * self.page_bytes * 2 * self.num_layers


def _stages(buf: torch.Tensor) -> bool:
    forced = os.environ.get("SEMIPD_KV_STAGING")
    if forced is not None:
        return forced == "1"
    if not buf.is_cuda:
        return False
    try:
        importlib.metadata.version("mooncake-transfer-engine")  # the CUDA build
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def _runs(src: list[int], dst: list[int]) -> list[tuple[tuple[int, int], int]]:
    """[((src_start, src_end), dst_start)] for maximal runs where both sides are consecutive."""
    out: list[tuple[tuple[int, int], int]] = []
    i = 0
    while i < len(src):
        j = i + 1
        while j < len(src) and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        out.append(((src[i], src[j - 1] + 1), dst[i]))
        i = j
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
