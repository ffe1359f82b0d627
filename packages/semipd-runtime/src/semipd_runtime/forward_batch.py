"""Batch metadata handed to the model: where each new token sits in the paged KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
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
    # mixed steps: the first num_decode requests bring one token each and run through the decode kernel (the
    # prefill kernel would give each of them a whole BLOCK_M-row tile); the rest use prefill_cu_seqlens_q
    num_decode: int = 0
    prefill_cu_seqlens_q: Tensor | None = None  # int32 [B - num_decode + 1], offsets from the first prefill token


def to_device(data: list[int] | list[float] | list[list[int]] | list[list[float]], dtype: torch.dtype,
              device: torch.device) -> Tensor:
    """A host list as a device tensor without a host sync. `torch.tensor(data, device=cuda)` copies from
    pageable memory and then waits for the stream (everything queued on it, e.g. the step in flight); a copy
    from pinned memory is queued instead, and the caching host allocator reuses the pinned block only once
    that copy is done."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_device_parts(parts: Sequence[Sequence[float]], dtype: torch.dtype,
                    device: torch.device) -> list[Tensor]:
    """Several host lists as device tensors through one copy (`to_device`). Each starts 16-byte aligned:
    Triton specializes a kernel on whether its pointers are, so a misaligned view would compile another."""
    per = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    flat: list[Any] = []
    offsets = []
    for part in parts:
        offsets.append(len(flat))
        flat += part
        flat += [0] * (-len(part) % per)
    buf = to_device(flat, dtype, device)
    return [buf[o : o + len(part)] for o, part in zip(offsets, parts)]


def fill_placeholders(ids: Tensor, prev_tokens: Tensor | None) -> Tensor:
    """ids with each placeholder -1 - j replaced by prev_tokens[j] (the step before's sampled tokens, still on
    the device: the host never waits for them)."""
    assert prev_tokens is not None and prev_tokens.numel() > 0, "placeholder ids without the step they come from"
    src = prev_tokens.index_select(0, (-1 - ids).clamp(0, prev_tokens.numel() - 1))
    return torch.where(ids < 0, src, ids)
