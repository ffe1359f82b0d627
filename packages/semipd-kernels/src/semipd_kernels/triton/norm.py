"""RMSNorm and residual-add + RMSNorm: one program per row, the whole row in registers (hidden <= 16k)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from semipd_kernels import checks

MAX_HIDDEN = 16384


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    x_stride, res_stride, out_stride, sum_stride,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # round the sum to the storage dtype first: the normalised value must match the returned residual
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor | None]:
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"x's last dim {hidden} exceeds the Triton RMSNorm limit {MAX_HIDDEN}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res2 = _rows(residual) if residual is not None else x2
    summed = torch.empty_like(out) if residual is not None else out
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2, res2, weight, out, summed,
            x2.stride(0), res2.stride(0), out.stride(0), summed.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )
    return out.view(x.shape), (summed.view(x.shape) if residual is not None else None)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    checks.check_norm(x, weight)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    checks.check_norm(x, weight)
    checks.check_same_shape("residual", residual, "x", x)
    out, summed = _launch(x, residual, weight, eps)
    assert summed is not None
    return out, summed
