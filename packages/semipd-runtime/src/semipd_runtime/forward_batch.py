"""Batch metadata handed to the model: where each new token sits in the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from semipd_memory import KVPool


@dataclass(slots=True)
class AttentionMetadata:
    positions: Tensor  # int64 [T] absolute position of each new token
    slot_mapping: Tensor  # int64 [T] page * page_size + offset where its K/V goes
    page_table: Tensor  # int32 [B, max_pages] rows of the allocator's req_to_page
    seq_lens: Tensor  # int32 [B] tokens in the cache after this step (prefix + new)
    cu_seqlens_q: Tensor  # int32 [B + 1] offsets of each request's new tokens in the packed batch
    logits_indices: Tensor  # int64 [S] rows whose next token is sampled this step
    is_decode: bool  # every request brings exactly one new token
    kv_pool: KVPool
    cos_sin_cache: Tensor  # float32 [max_positions, head_dim]
