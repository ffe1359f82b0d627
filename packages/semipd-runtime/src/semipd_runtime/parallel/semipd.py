"""Semi-PD under tensor parallelism: every rank runs a prefill worker beside its decode role, on the same
weights and KV shard. Rank 0's prefill worker is the executor's (`SharedPoolPrefill`), a thread whose runner
and sampler broadcast each prefill forward to the other ranks' prefill threads (`ranks.py`); those all-reduce
among themselves in their own process group while the decode ranks use theirs.

One split for all ranks: the split chosen at startup. Moving it (`Engine.repartition`, the slo policy) would
start a second prefill generation on rank 0 while the first finishes its batches, and both would broadcast on
the one prefill group, so a new split is refused (the executor counts a failed re-partition and keeps the
split)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from semipd_runtime.config import EngineConfig
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.parallel.shard import role_group
from semipd_runtime.partition import SmPartition, create_partition, partition_class
from semipd_runtime.prefill_worker import PrefillWorker, ThreadPrefillChannel
from semipd_runtime.repartition import PrefillChannel
from semipd_runtime.shared_pool_prefill import SharedPoolPrefill

if TYPE_CHECKING:
    from semipd_runtime.core import EngineCore


def check_semi_pd(cfg: EngineConfig) -> None:
    """What semi-PD under TP does not run yet, named before any rank starts."""
    if cfg.slo_policy is not None:
        raise ValueError("partition_policy='slo' with tp_size > 1 is not supported yet (the split is static)")
    if partition_class(cfg.semi_pd.sm_partition).prefill_placement("thread") != "thread":
        raise ValueError(f"sm_partition={cfg.semi_pd.sm_partition!r} runs prefill as a process; with "
                         f"tp_size > 1 the prefill worker must be a thread (sm_partition none or green)")


def prefill_executor_factory(cfg: EngineConfig, ranks: Any, make_runner: Callable[..., Any],
                             make_sampler: Callable[..., Any]) -> Callable[[EngineCore], SharedPoolPrefill]:
    """The core's executor: `SharedPoolPrefill` whose worker thread broadcasts through `ranks` (the prefill
    role's channel) with `make_runner(runner, ranks)` / `make_sampler(sampler, ranks)` wrapped around its
    own."""
    index = torch.device(cfg.device).index or 0
    part = create_partition(cfg.semi_pd.sm_partition, *cfg.shares, device_index=index)

    def make_executor(core: EngineCore) -> SharedPoolPrefill:
        def make_channel(p: SmPartition, generation: int) -> PrefillChannel:
            if generation > 0:
                raise RuntimeError("a new SM split (or a restarted prefill worker) is not supported with "
                                   "tp_size > 1 yet")
            runner = ModelRunner(core.model, core.kv_pool, cfg.scheduler.page_size, cfg.max_model_len)
            worker = PrefillWorker(make_runner(runner, ranks), cfg.scheduler.max_prefill_tokens,
                                   cfg.model.eos_token_ids)
            worker.sampler = make_sampler(worker.sampler, ranks)
            role_context = p.role_context_factory("prefill")

            @contextmanager
            def in_role() -> Iterator[None]:
                with role_context(), role_group(ranks.tp.group):
                    yield

            return ThreadPrefillChannel(worker, in_role, p.sm_count["prefill"], warm_up=True)

        executor = SharedPoolPrefill(make_channel, part, cfg.scheduler.max_prefill_tokens,
                                     core.drop_decode_graphs, max_restarts=0)
        executor.on_split = core._split_changed
        return executor

    return make_executor
