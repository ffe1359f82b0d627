"""Build the engine core an EngineConfig asks for: one `EngineCore`, given the prefill executor of its mode (unified:
`LocalPrefill`; semi-PD: `SharedPoolPrefill` with its SM partition) and, under the slo policy, the SLO observer."""

from __future__ import annotations

import logging
import sys

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.partition import SmPartition, _device_sm_count, create_partition, partition_class
from semipd_runtime.prefill_process import ProcessPrefillChannel
from semipd_runtime.prefill_worker import PrefillWorker, ThreadPrefillChannel
from semipd_runtime.repartition import PrefillChannel
from semipd_runtime.shared_pool_prefill import SharedPoolPrefill
from semipd_runtime.slo_control import SloController, SloObserver
from semipd_runtime.slo_profile import seed_from_profile

log = logging.getLogger(__name__)


def create_core(
    cfg: EngineConfig, partition: SmPartition | None = None, model: LlamaForCausalLM | None = None
) -> EngineCore:
    """`model`: an already built model (benchmarks with random weights); otherwise loaded from cfg.model_path."""
    if cfg.parallel.tp_size > 1:
        from semipd_runtime.parallel.leader import create_tp_core  # torch.distributed only when asked for

        if model is not None or partition is not None:
            raise ValueError("tp_size > 1 loads its own shards: pass no model or partition")
        return create_tp_core(cfg)
    pd_mode = cfg.semi_pd.disaggregation_mode
    if pd_mode == "decode":  # prompts are prefilled by a prefill instance: its KV arrives here (Mooncake)
        from semipd_runtime.pd_factory import make_remote_prefill

        core = EngineCore(cfg, model=model, make_executor=lambda c: make_remote_prefill(cfg, c))
        core.warm_up()
        core.capture_cuda_graphs()
        return core
    if pd_mode == "prefill":
        from semipd_runtime.pd_factory import attach_kv_sender

        core = _create_core(cfg, partition, model)
        try:
            attach_kv_sender(cfg, core)
        except BaseException:
            core.close()
            raise
        return core
    return _create_core(cfg, partition, model)


def _device_index(device: str) -> int:
    """cuda:N -> N; "cuda" and the CPU -> 0."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def _create_core(cfg: EngineConfig, partition: SmPartition | None, model: LlamaForCausalLM | None) -> EngineCore:
    if cfg.semi_pd.mode == "unified":
        core = EngineCore(cfg, model=model)
        core.warm_up()
        core.capture_cuda_graphs()
        return core
    prefill_pct, decode_pct = cfg.shares
    split: tuple[float, float] = (prefill_pct, decode_pct)
    slo = None
    kind = partition_class(cfg.semi_pd.sm_partition)
    settings = cfg.slo_policy
    if settings is not None:
        # candidates on the device's SM granularity (a nominal 100 "SMs" without a GPU); where the decode share
        # cannot move (MPS: the decode process keeps the cap it started with), only the prefill share is a choice
        fixed = None if kind.decode_share_moves else decode_pct
        # disjoint splits: prefill runs on what decode leaves, so the decode share is the split
        start = split if fixed is not None else (100.0 - decode_pct, float(decode_pct))
        # a new split is a new prefill thread (green contexts: 3-8 ms) or a new prefill process (MPS, or the none
        # backend's process placement: 10-40 s): the policy follows the load closely only in the first case
        cheap = kind.prefill_placement(cfg.semi_pd.prefill_placement) == "thread"
        pcfg = settings.partitioner_config(_device_sm_count() or 100, start, fixed, cfg.scheduler.max_prefill_tokens,
                                           max_decode_batch=cfg.scheduler.max_running_requests, cheap_moves=cheap)
        assert pcfg.initial_split is not None
        split = partition.split if partition is not None else pcfg.initial_split
        slo = SloController(settings, pcfg)
    # the instance's own GPU (--base-gpu-id), not GPU 0: a green context made on another device than the model's
    part = partition or create_partition(cfg.semi_pd.sm_partition, *split, device_index=_device_index(cfg.device))
    placement = part.prefill_placement(cfg.semi_pd.prefill_placement)

    def make_executor(core: EngineCore) -> SharedPoolPrefill:
        def make_channel(part: SmPartition, generation: int) -> PrefillChannel:
            if placement == "thread":
                # the two roles share one GIL: at the default 5 ms switch interval a decode step waiting for the
                # GIL behind the prefill thread's Python can stall for whole intervals (suspected cause of a
                # measured p99 ITL of 46 ms against a p50 of 8 ms under green:50; benchmarks/RESULTS.md)
                sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
                runner = ModelRunner(core.model, core.kv_pool, cfg.scheduler.page_size, cfg.max_model_len)
                worker = PrefillWorker(runner, cfg.scheduler.max_prefill_tokens, cfg.model.eos_token_ids)
                return ThreadPrefillChannel(worker,
                                            part.role_context_factory("prefill"), part.sm_count["prefill"],
                                            warm_up=generation == 0)
            return ProcessPrefillChannel(core, part)

        executor = SharedPoolPrefill(make_channel, part, cfg.scheduler.max_prefill_tokens, core.drop_decode_graphs)
        executor.on_split = core._split_changed
        return executor

    observers = [SloObserver(slo)] if slo is not None else []
    core = EngineCore(cfg, model=model, make_executor=make_executor, observers=observers)
    core.warm_up()  # eager decode above the graph sizes (the prefill worker warms its own shapes)
    core.capture_cuda_graphs()  # inside the decode partition (a later split captures its own on first use)
    moves = "" if slo is None else (" (cheap moves: follows the load)" if slo.partitioner.config.cheap_moves
                                    else " (a process per split: moves rarely)")
    log.info("semi-PD: partition %s, prefill as %s; SMs granted prefill=%d decode=%d; policy %s%s", part.kind,
             placement, part.sm_count["prefill"], part.sm_count["decode"], "slo" if slo else "static", moves)
    if slo is not None:
        assert isinstance(core.executor, SharedPoolPrefill)
        try:
            seed_from_profile(core, core.executor, slo, part.kind)
        except BaseException:
            core.close()  # no prefill worker left behind when startup fails
            raise
    return core
