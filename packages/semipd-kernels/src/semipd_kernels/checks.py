"""Argument checks shared by both backends: shapes and dtypes only (never values, which would sync the host).

Every failure is a ValueError that names the offending argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_dim(name: str, t: Tensor, ndim: int) -> None:
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_dtype(name: str, t: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in dtypes:
        _fail(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        _fail(f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")


def check_same_device(names_tensors: list[tuple[str, Tensor]]) -> None:
    first_name, first = names_tensors[0]
    for name, t in names_tensors[1:]:
        if t.device != first.device:
            _fail(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_norm(x: Tensor, weight: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        _fail(f"x must be a tensor with at least 1 dim, got {getattr(x, 'shape', type(x))}")
    check_dtype("x", x, _FLOAT_DTYPES)
    check_dim("weight", weight, 1)
    if weight.shape[0] != x.shape[-1]:
        _fail(f"weight has {weight.shape[0]} elements but x's last dim is {x.shape[-1]}")


def check_silu_and_mul(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() < 1:
        _fail("x must be a tensor with at least 1 dim")
    check_dtype("x", x, _FLOAT_DTYPES)
    if x.shape[-1] % 2:
        _fail(f"x's last dim must be even (gate and up halves), got {x.shape[-1]}")


def check_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
    check_dim("q", q, 3)
    check_dim("k", k, 3)
    check_dim("positions", positions, 1)
    check_dim("cos_sin_cache", cos_sin_cache, 2)
    check_dtype("q", q, _FLOAT_DTYPES)
    check_dtype("k", k, _FLOAT_DTYPES)
    check_dtype("positions", positions, _INDEX_DTYPES)
    t, _, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        _fail(f"k shape {tuple(k.shape)} must be [T={t}, Hk, D={d}] to match q {tuple(q.shape)}")
    if positions.shape[0] != t:
        _fail(f"positions has {positions.shape[0]} entries, q has {t} tokens")
    if d % 2 or cos_sin_cache.shape[1] != d:
        _fail(f"cos_sin_cache must be [max_positions, {d}] for head_dim {d}, "
              f"got {tuple(cos_sin_cache.shape)}")
    check_same_device([("q", q), ("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache)])


def check_cache_pair(k_cache: Tensor, v_cache: Tensor) -> None:
    check_dim("k_cache", k_cache, 4)
    check_same_shape("v_cache", v_cache, "k_cache", k_cache)
    if k_cache.dtype != v_cache.dtype:
        _fail(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {k_cache.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not c.is_contiguous():
            _fail(f"{name} must be contiguous [num_pages, page_size, Hk, D]")


def check_store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    check_dim("k", k, 3)
    check_same_shape("v", v, "k", k)
    check_cache_pair(k_cache, v_cache)
    check_dim("slot_mapping", slot_mapping, 1)
    check_dtype("slot_mapping", slot_mapping, _INDEX_DTYPES)
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        _fail(f"k heads/dim {tuple(k.shape[1:])} must match k_cache's [Hk, D] {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape[0] != k.shape[0]:
        _fail(f"slot_mapping has {slot_mapping.shape[0]} entries, k has {k.shape[0]} tokens")
    check_same_device(
        [("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)]
    )


def _check_attention_common(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor) -> None:
    check_dim("q", q, 3)
    check_dtype("q", q, _FLOAT_DTYPES)
    check_cache_pair(k_cache, v_cache)
    check_dim("page_table", page_table, 2)
    check_dtype("page_table", page_table, _INDEX_DTYPES)
    hq, d = q.shape[1], q.shape[2]
    hk, dk = k_cache.shape[2], k_cache.shape[3]
    if d != dk:
        _fail(f"q head_dim {d} must equal k_cache head_dim {dk}")
    if hk == 0 or hq % hk:
        _fail(f"q heads ({hq}) must be a multiple of k_cache heads ({hk}) for GQA")


def check_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor) -> None:
    _check_attention_common(q, k_cache, v_cache, page_table)
    check_dim("seq_lens", seq_lens, 1)
    check_dtype("seq_lens", seq_lens, _INDEX_DTYPES)
    b = q.shape[0]
    if page_table.shape[0] != b or seq_lens.shape[0] != b:
        _fail(f"page_table rows ({page_table.shape[0]}) and seq_lens ({seq_lens.shape[0]}) "
              f"must equal batch {b}")
    check_same_device([("q", q), ("k_cache", k_cache), ("page_table", page_table), ("seq_lens", seq_lens)])


def check_prefill(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, cu_seqlens_q: Tensor, seq_lens: Tensor
) -> None:
    _check_attention_common(q, k_cache, v_cache, page_table)
    check_dim("cu_seqlens_q", cu_seqlens_q, 1)
    check_dtype("cu_seqlens_q", cu_seqlens_q, _INDEX_DTYPES)
    check_dim("seq_lens", seq_lens, 1)
    check_dtype("seq_lens", seq_lens, _INDEX_DTYPES)
    b = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != b + 1:
        _fail(f"cu_seqlens_q must have batch+1 = {b + 1} entries, got {cu_seqlens_q.shape[0]}")
    if page_table.shape[0] != b:
        _fail(f"page_table rows ({page_table.shape[0]}) must equal batch {b} (len(seq_lens))")
    check_same_device(
        [("q", q), ("k_cache", k_cache), ("page_table", page_table), ("cu_seqlens_q", cu_seqlens_q),
         ("seq_lens", seq_lens)]
    )


def check_sample(
    logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor, seeds: Tensor,
    steps: Tensor,
) -> None:
    check_dim("logits", logits, 2)
    check_dtype("logits", logits, _FLOAT_DTYPES)
    b = logits.shape[0]
    if logits.shape[1] == 0:
        _fail("logits must have a non-empty vocab dim")
    for name, t, dtypes in (
        ("temperature", temperature, (torch.float32,)),
        ("top_k", top_k, _INDEX_DTYPES),
        ("top_p", top_p, (torch.float32,)),
        ("min_p", min_p, (torch.float32,)),
        ("seeds", seeds, (torch.int64,)),
        ("steps", steps, (torch.int64,)),
    ):
        check_dim(name, t, 1)
        check_dtype(name, t, dtypes)
        if t.shape[0] != b:
            _fail(f"{name} has {t.shape[0]} entries, logits has {b} rows")
        if t.device != logits.device:
            _fail(f"{name} is on {t.device} but logits is on {logits.device}")


def check_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor) -> None:
    check_dim("logits", logits, 2)
    check_dtype("logits", logits, _FLOAT_DTYPES)
    check_dim("bitmask", bitmask, 2)
    check_dtype("bitmask", bitmask, (torch.int32,))
    check_dim("rows", rows, 1)
    check_dtype("rows", rows, _INDEX_DTYPES)
    if rows.shape[0] != bitmask.shape[0]:
        _fail(f"rows has {rows.shape[0]} entries, bitmask has {bitmask.shape[0]} rows")
    if logits.stride(-1) != 1:
        _fail("logits must be contiguous in the vocab dim (masked in place)")
    check_same_device([("logits", logits), ("bitmask", bitmask), ("rows", rows)])


def check_penalties(
    logits: Tensor, token_counts: Tensor, rows: Tensor, presence: Tensor, frequency: Tensor, repetition: Tensor
) -> None:
    check_dim("logits", logits, 2)
    check_dtype("logits", logits, _FLOAT_DTYPES)
    check_dim("token_counts", token_counts, 2)
    check_dtype("token_counts", token_counts, (torch.int32,))
    if token_counts.shape[1] != logits.shape[1]:
        _fail(f"token_counts has {token_counts.shape[1]} columns, logits has a vocab of {logits.shape[1]}")
    b = logits.shape[0]
    for name, t, dtypes in (
        ("rows", rows, _INDEX_DTYPES),
        ("presence", presence, (torch.float32,)),
        ("frequency", frequency, (torch.float32,)),
        ("repetition", repetition, (torch.float32,)),
    ):
        check_dim(name, t, 1)
        check_dtype(name, t, dtypes)
        if t.shape[0] != b:
            _fail(f"{name} has {t.shape[0]} entries, logits has {b} rows")
    check_same_device([("logits", logits), ("token_counts", token_counts), ("rows", rows),
                       ("presence", presence), ("frequency", frequency), ("repetition", repetition)])
