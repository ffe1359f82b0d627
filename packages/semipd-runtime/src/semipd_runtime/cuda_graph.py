"""CUDA graphs for decode steps: one graph per padded batch size and per CUDA stream.

A decode step of a 32-layer model is ~400 small kernel launches; replaying a captured graph removes the Python
and launch overhead that otherwise dominates it. Graphs keep the SM partition of the stream they were captured on
(green contexts), so they are keyed by the current stream: a role running in a new partition captures its own set
the first time it decodes there (or ahead of time through `capture`).

Inputs live in static buffers; a batch of n requests runs in the smallest captured size >= n, the padded rows
with seq_len 0 and page -1 (no K/V written, attention reads nothing). `replay=False` runs the same padded
forward eagerly: the CPU tests cover the padding logic that way.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from semipd_memory import KVPool
from semipd_runtime.forward_batch import AttentionMetadata, fill_placeholders, to_device
from semipd_runtime.models.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 64, every 16 to 256, every 32 beyond, capped at max_bs (always included)."""
    if max_bs < 1:
        raise ValueError(f"cuda_graph_max_bs must be >= 1, got {max_bs}")
    sizes = [1, 2, 4, 8, *range(16, 65, 8), *range(80, 257, 16), *range(288, max_bs + 1, 32)]
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class DecodeGraphRunner:
    def __init__(
        self, model: LlamaForCausalLM, kv_pool: KVPool, cos_sin_cache: Tensor, page_size: int,
        max_pages_per_req: int, max_bs: int, replay: bool = True,
    ) -> None:
        self.model, self.kv_pool, self.cos_sin_cache = model, kv_pool, cos_sin_cache
        self.page_size = page_size
        self.batch_sizes = graph_batch_sizes(max_bs)
        self.max_bs = self.batch_sizes[-1]
        self.replay = replay
        dev = cos_sin_cache.device
        self.device = dev
        vocab = model.config.vocab_size
        # rows: input ids, positions, seq_lens (one H2D copy per step)
        self.inputs = torch.zeros((3, self.max_bs), dtype=torch.long, device=dev)
        self.page_table = torch.full((self.max_bs, max_pages_per_req), -1, dtype=torch.int32, device=dev)
        self.logits = torch.zeros((self.max_bs, vocab), dtype=torch.float32, device=dev)
        self.arange = torch.arange(self.max_bs + 1, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        # one memory pool per stream: a pool whose graphs were all dropped is freed by torch and its handle
        # must not be captured into again
        self.pools: dict[int, _POOL_HANDLE] = {}
        self._side_stream: torch.cuda.Stream | None = None

    def padded_size(self, n: int) -> int | None:
        i = bisect.bisect_left(self.batch_sizes, n)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def _forward_static(self, bs: int) -> None:
        """The graphed region: everything from the static buffers to the static logits."""
        ids, pos, lens = self.inputs[0, :bs], self.inputs[1, :bs], self.inputs[2, :bs]
        table = self.page_table[:bs]
        page = table.gather(1, (pos // self.page_size).unsqueeze(1)).squeeze(1).long()
        slot_mapping = torch.where(page >= 0, page * self.page_size + pos % self.page_size, -1)
        meta = AttentionMetadata(
            positions=pos, slot_mapping=slot_mapping, page_table=table, seq_lens=lens.int(),
            cu_seqlens_q=self.arange[: bs + 1].int(), logits_indices=self.arange[:bs], is_decode=True,
            kv_pool=self.kv_pool, cos_sin_cache=self.cos_sin_cache,
        )
        self.logits[:bs].copy_(self.model(ids, meta))

    def _stream_key(self) -> tuple[int, torch.cuda.Stream]:
        """The stream this role runs on; the legacy default stream cannot capture, so it uses a side stream
        (same SMs: an ordinary stream of the same context)."""
        cur = torch.cuda.current_stream(self.device)
        if cur.cuda_stream != 0:
            return cur.cuda_stream, cur
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return 0, self._side_stream

    @torch.inference_mode()
    def capture(self, batch_sizes: list[int] | None = None) -> float:
        """Capture graphs for the current stream (largest first, so smaller ones reuse its pool). Seconds."""
        if not self.replay:
            return 0.0
        t0 = time.perf_counter()
        key, stream = self._stream_key()
        cur = torch.cuda.current_stream(self.device)
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            for bs in sorted(batch_sizes or self.batch_sizes, reverse=True):
                if (key, bs) in self.graphs:
                    continue
                self.inputs[:, :bs].zero_()
                self.page_table[:bs, 0] = -1
                for _ in range(2):  # warm up: Triton JIT, cuBLAS workspaces, allocator
                    self._forward_static(bs)
                g = torch.cuda.CUDAGraph()
                # capture_begin/end rather than torch.cuda.graph(), which synchronizes the whole device (the
                # other role's stream too); thread_local: the other role's thread may sync its own stream meanwhile
                pool = self.pools.setdefault(key, torch.cuda.graph_pool_handle())
                g.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self._forward_static(bs)
                finally:
                    g.capture_end()
                self.graphs[(key, bs)] = g
        cur.wait_stream(stream)
        dt = time.perf_counter() - t0
        log.info("captured %d decode CUDA graphs (bs <= %d) on stream %#x in %.2fs",
                 len(batch_sizes or self.batch_sizes), self.max_bs, key, dt)
        return dt

    def drop(self, stream_key: int) -> int:
        """Forget the graphs captured on one stream (a retired green context's: its handle may be reused by a
        later stream, whose decode must not replay graphs confined to the old SMs). Returns how many."""
        keys = [k for k in self.graphs if k[0] == stream_key]
        for k in keys:
            del self.graphs[k]
        self.pools.pop(stream_key, None)
        return len(keys)

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], page_table: Tensor,
            prev_tokens: Tensor | None = None) -> Tensor:
        """float32 logits [n, vocab] of one decode token per request (row i: token_ids[i] at positions[i]); a
        negative id is a placeholder filled from prev_tokens (see `fill_placeholders`), in the static input
        buffer right before the replay."""
        n = len(token_ids)
        bs = self.padded_size(n)
        if bs is None:
            raise ValueError(f"decode batch of {n} exceeds cuda_graph_max_bs {self.max_bs}")
        g = None
        if self.replay:
            key, _ = self._stream_key()
            if (key, bs) not in self.graphs:
                self.capture([bs])  # first decode of this size in this partition (normally captured ahead)
            g = self.graphs[(key, bs)]
        pad = [0] * (bs - n)  # padded rows: token 0 at position 0, seq_len 0
        rows = [token_ids + pad, positions + pad, [p + 1 for p in positions] + pad]
        # a fresh pinned block per step: the copy of the step in flight may still read the last one
        self.inputs[:, :bs].copy_(to_device(rows, torch.long, self.device))
        if min(token_ids) < 0:
            ids = self.inputs[0, :n]
            ids.copy_(fill_placeholders(ids, prev_tokens))
        w = min(page_table.shape[1], self.page_table.shape[1])
        self.page_table[:n, :w].copy_(page_table[:, :w])
        self.page_table[n:bs, 0] = -1
        if g is None:
            self._forward_static(bs)
        else:
            g.replay()
        return self.logits[:n]
