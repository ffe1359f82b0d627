"""semipd_kernels: Triton kernels for paged attention and layer ops, each with a torch reference twin.

Call everything through `semipd_kernels.ops` (backend switch); `semipd_kernels.reference` holds the torch
twins.
"""

from __future__ import annotations

from semipd_kernels import ops, reference
from semipd_kernels.ops import get_backend, set_backend
from semipd_kernels.sm_budget import current_sm_budget, sm_budget

__all__ = ["current_sm_budget", "get_backend", "ops", "reference", "set_backend", "sm_budget"]
