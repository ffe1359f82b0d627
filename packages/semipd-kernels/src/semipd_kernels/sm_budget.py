"""How many SMs the calling thread's kernels may use: kernels that size their grid from the SM count (split-KV
decode attention, the persistent GEMM) read it here, so inside a green-context partition they plan for the SMs
that partition was granted rather than the whole device. Thread-local: the two roles of a threaded semi-PD
worker each set their own."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_local = threading.local()


@contextmanager
def sm_budget(num_sms: int | None) -> Iterator[None]:
    """Kernels launched by this thread inside the block plan for `num_sms` SMs (None: the device's)."""
    if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"num_sms must be a positive int or None, got {num_sms!r}")
    prev = getattr(_local, "num_sms", None)
    _local.num_sms = num_sms
    try:
        yield
    finally:
        _local.num_sms = prev


def current_sm_budget() -> int | None:
    """The SM budget set by the innermost `sm_budget` block of this thread, None outside any."""
    return getattr(_local, "num_sms", None)
