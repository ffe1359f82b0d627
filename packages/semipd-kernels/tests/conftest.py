"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on CPU through the Triton
interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is created, so it is set here, and only without a
GPU (setting it on a GPU machine would turn every other package's kernels into the slow interpreter too).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
