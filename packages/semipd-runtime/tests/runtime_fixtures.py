"""Helpers the runtime tests share: per-module fixtures for a random-weight model and random prompts, the base
EngineConfig of a small CPU core, and the CPU stand-in for captured decode graphs. (The `model` fixture that
loads a module's `model_dir` lives in conftest.py.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from test_runtime_parity_random import write_random_model

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.cuda_graph import DecodeGraphRunner
from semipd_runtime.messages import Shutdown
from semipd_runtime.prefill_process import ProcessPrefillChannel
from semipd_runtime.prefill_worker import ThreadPrefillChannel
from semipd_runtime.shared_pool_prefill import SharedPoolPrefill
from semipd_runtime.slo_control import SloController, SloObserver, SloSettings


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


def core_config(path: Path, slo: SloSettings | None = None, **kw: Any) -> EngineConfig:
    """What every small test core has in common (the random model at `path` on CPU in fp32, no EOS ids,
    4-token pages); `kw` (knob names) sets the rest and may override these; `slo` replaces the SLO section."""
    base: dict[str, Any] = dict(model_path=str(path), device="cpu", dtype="float32", eos_token_ids=[],
                                page_size=4)
    cfg = EngineConfig.from_knobs(**{**base, **kw})
    return cfg if slo is None else dataclasses.replace(cfg, slo=slo)


def eager_decode_graphs(core: EngineCore, max_bs: int) -> None:
    """Give `core`'s runner the CPU stand-in for captured decode graphs: same static buffers and padding, run
    eagerly."""
    r = core.runner
    r.graphs = DecodeGraphRunner(r.model, r.kv_pool, r.cos_sin_cache, r.page_size,
                                 core.allocator.req_to_page.shape[1], max_bs=max_bs, replay=False)


def shared_pool(core: EngineCore) -> SharedPoolPrefill:
    """The semi-PD executor of `core` (fails the test for any other core)."""
    assert isinstance(core.executor, SharedPoolPrefill), f"not a semi-PD core: {type(core.executor).__name__}"
    return core.executor


def slo_controller(core: EngineCore) -> SloController | None:
    """The SLO controller watching `core`, if any."""
    return next((o.controller for o in core.observers if isinstance(o, SloObserver)), None)


def kill_prefill_worker(core: EngineCore) -> None:
    """The current prefill worker dies: a process is killed; a thread (which can't be) stops serving."""
    channel = shared_pool(core).router.current.channel
    if isinstance(channel, ProcessPrefillChannel):
        channel.proc.kill()
        channel.proc.join(timeout=10)
    else:
        assert isinstance(channel, ThreadPrefillChannel)
        channel.inbox.put(Shutdown())
        channel.thread.join(timeout=10)
