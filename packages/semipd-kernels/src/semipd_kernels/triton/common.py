"""Small pieces shared by the Triton kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (the CPU test path)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would silently run as tf32 on the GPU; keep them exact (tests, fp32 models)
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (interpreter only): the Triton 3.9 interpreter multiplies bf16
    operands as raw uint16 bit patterns, so they are widened to fp32 there; compiled kernels keep bf16
    MMAs."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)
