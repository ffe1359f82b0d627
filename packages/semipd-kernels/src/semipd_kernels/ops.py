"""The one entry point the runtime calls: same names and signatures as `semipd_kernels.reference`.

Backend choice, so the runtime never branches on the device:
  "auto"  (default) Triton when the tensors are on CUDA and triton imports, the torch reference otherwise;
  "triton" always Triton (on CPU tensors this needs TRITON_INTERPRET=1 set before triton is imported);
  "torch"  always the reference.
The initial value comes from the env var SEMIPD_KERNEL_BACKEND; `set_backend` changes it at run time.
Linear layers stay on cuBLAS unless SEMIPD_SKINNY_GEMM=1 (or `set_skinny_gemm(True)`) sends those of at most 16
rows to the GEMV-shaped Triton kernel (`triton/skinny_gemm.py`, which times its configs and cuBLAS once per shape
and keeps the fastest; off until a GPU run shows it beats cuBLAS).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from semipd_kernels import reference

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "SEMIPD_KERNEL_BACKEND"

# op name -> module under semipd_kernels.triton that implements it with the same signature
_TRITON_MODULES = {
    "linear": "skinny_gemm",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "silu_and_mul": "activation",
    "apply_rotary": "rotary",
    "store_kv": "kv_store",
    "rotary_store_kv": "rotary_kv",
    "decode_attention": "decode_attention",
    "prefill_attention": "prefill_attention",
    "sample": "sampling",
    "apply_token_bitmask": "token_bitmask",
    "apply_penalties": "penalties",
}


def _validate(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r} (from set_backend or ${ENV_VAR})")
    return name


_backend = _validate(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
_skinny = os.environ.get("SEMIPD_SKINNY_GEMM", "0").strip() not in ("", "0")
SKINNY_MAX_ROWS = 16  # triton/skinny_gemm.MAX_ROWS (not imported here: triton loads only when a kernel is picked)
_triton_cache: dict[str, Callable[..., Any] | None] = {}


def set_backend(name: str) -> None:
    """Select "auto", "triton" or "torch" for all later calls."""
    global _backend
    _backend = _validate(name)


def get_backend() -> str:
    return _backend


def set_skinny_gemm(enabled: bool) -> None:
    """Route linear layers of at most 16 rows (decode batches) to the GEMV-shaped Triton kernel."""
    global _skinny
    _skinny = bool(enabled)


def skinny_gemm_enabled() -> bool:
    return _skinny


def _triton_impl(op: str) -> Callable[..., Any] | None:
    """The Triton function for op, or None when triton (or that kernel) is not importable here."""
    if op not in _triton_cache:
        try:
            module = importlib.import_module(f"semipd_kernels.triton.{_TRITON_MODULES[op]}")
            _triton_cache[op] = getattr(module, op)
        except ImportError:
            _triton_cache[op] = None
    return _triton_cache[op]


def backend_for(op: str, tensor: Tensor) -> str:
    """Which backend ("triton" or "torch") runs `op` for inputs living where `tensor` lives."""
    if _backend == "torch":
        return "torch"
    if _backend == "triton":
        if _triton_impl(op) is None:
            raise RuntimeError(f"backend 'triton' was forced but semipd_kernels.triton cannot provide {op}")
        return "triton"
    return "triton" if tensor.is_cuda and _triton_impl(op) is not None else "torch"


def _pick(op: str, tensor: Tensor) -> Callable[..., Any]:
    if backend_for(op, tensor) == "triton":
        impl = _triton_impl(op)
        assert impl is not None
        return impl
    return getattr(reference, op)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias): cuBLAS, or with `set_skinny_gemm` the Triton GEMV-shaped kernel for <= 16 rows."""
    if _skinny and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1]:
        return _pick("linear", x)(x, weight, bias)
    return reference.linear(x, weight, bias)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _pick("rms_norm", x)(x, weight, eps)


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _pick("fused_add_rms_norm", x)(x, residual, weight, eps)


def silu_and_mul(x: Tensor) -> Tensor:
    return _pick("silu_and_mul", x)(x)


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, base: float, rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    # Built once at start-up; the same torch code serves both backends.
    return reference.rope_cos_sin_cache(head_dim, max_positions, base, rope_scaling, device=device)


def apply_rotary(q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> tuple[Tensor, Tensor]:
    return _pick("apply_rotary", q)(q, k, positions, cos_sin_cache)


def store_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    _pick("store_kv", k)(k, v, k_cache, v_cache, slot_mapping)


def rotary_store_kv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin_cache: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    """apply_rotary + store_kv in one launch: returns rotated q; rotated k and v go to their cache slots."""
    return _pick("rotary_store_kv", q)(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, page_table: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    return _pick("decode_attention", q)(q, k_cache, v_cache, page_table, seq_lens, scale)


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_table: Tensor,
    cu_seqlens_q: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    return _pick("prefill_attention", q)(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, scale)


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    seeds: Tensor,
    steps: Tensor,
) -> Tensor:
    return _pick("sample", logits)(logits, temperature, top_k, top_p, min_p, seeds, steps)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor) -> None:
    """Grammar masks, in place: -inf for the tokens bitmask[i] bans in row rows[i] of logits."""
    _pick("apply_token_bitmask", logits)(logits, bitmask, rows)


def apply_penalties(
    logits: Tensor,
    token_counts: Tensor,
    rows: Tensor,
    presence: Tensor,
    frequency: Tensor,
    repetition: Tensor,
) -> Tensor:
    return _pick("apply_penalties", logits)(logits, token_counts, rows, presence, frequency, repetition)
