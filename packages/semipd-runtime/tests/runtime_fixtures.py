"""Helpers the runtime tests share: per-module fixtures for a random-weight model and random prompts, the base
CoreConfig of a small CPU core, and the CPU stand-in for captured decode graphs. (The `model` fixture that
loads a module's `model_dir` lives in conftest.py.)"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime_parity_random import write_random_model

from semipd_runtime.core import CoreConfig, EngineCore
from semipd_runtime.cuda_graph import DecodeGraphRunner


def random_model_fixture(name: str, kind: str = "llama-tied", seed: int = 0) -> Callable[..., Path]:
    """A module-scoped `model_dir` fixture: a random-weight checkpoint of `kind` (test_runtime_parity_random's
    CONFIGS) written once per module into a temp folder named after `name`. Assign it to `model_dir`."""

    @pytest.fixture(scope="module")
    def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        d = tmp_path_factory.mktemp(name)
        write_random_model(kind, d, seed=seed)
        return d

    return model_dir


def prompts_fixture(seed: int, lengths: Sequence[int]) -> Callable[..., list[list[int]]]:
    """A module-scoped `prompts` fixture: one prompt of random ids in [3, 256) per length, drawn from `seed`.
    Assign it to `prompts`."""

    @pytest.fixture(scope="module")
    def prompts() -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lengths]

    return prompts


def core_config(path: Path, **kw: Any) -> CoreConfig:
    """What every small test core has in common (the random model at `path` on CPU in fp32, no EOS ids,
    4-token pages); `kw` sets the rest and may override these."""
    base: dict[str, Any] = dict(model_path=str(path), device="cpu", dtype="float32", eos_token_ids=[],
                                page_size=4)
    return CoreConfig(**{**base, **kw})


def eager_decode_graphs(core: EngineCore, max_bs: int) -> None:
    """Give `core`'s runner the CPU stand-in for captured decode graphs: same static buffers and padding, run
    eagerly."""
    r = core.runner
    r.graphs = DecodeGraphRunner(r.model, r.kv_pool, r.cos_sin_cache, r.page_size,
                                 core.allocator.req_to_page.shape[1], max_bs=max_bs, replay=False)
