"""CPU threads for engine processes that compute side by side on CPU."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, e.g. a container's CPU set)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def share_cpu_threads(device: str, ways: int) -> None:
    """On CPU, each of `ways` processes that compute at the same time takes its share of the cores for torch's
    intra-op pool. By default every process takes all of them, and on 2 cores a semi-PD engine's decode core and
    prefill process spun their OpenMP pools against each other: generation ran 4-6x slower than with the prefill
    worker as a thread. A user's OMP_NUM_THREADS wins; on CUDA the pool hardly matters and is left alone."""
    if not device.startswith("cpu") or "OMP_NUM_THREADS" in os.environ or ways < 1:
        return
    n = max(1, usable_cores() // ways)
    if torch.get_num_threads() != n:
        log.info("cpu: %d torch threads in this process (%d cores shared %d ways)", n, usable_cores(), ways)
        torch.set_num_threads(n)
