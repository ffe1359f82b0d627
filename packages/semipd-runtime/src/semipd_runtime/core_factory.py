"""Build the engine core a CoreConfig asks for: unified, or semi-PD with its prefill worker and SM partition."""

from __future__ import annotations

import logging
import sys

from semipd_runtime.core import CoreConfig, EngineCore
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.partition import SmPartition, _device_sm_count, create_partition
from semipd_runtime.prefill_worker import PrefillWorker, ThreadPrefillChannel
from semipd_runtime.semipd_core import PrefillChannel, SemiPDCore
from semipd_runtime.slo_control import SloController

log = logging.getLogger(__name__)


def prefill_placement(cfg: CoreConfig) -> str:
    """green needs threads (contexts isolate only inside one process); mps needs processes."""
    if cfg.sm_partition == "green":
        return "thread"
    if cfg.sm_partition == "mps":
        return "process"
    return cfg.prefill_placement


def create_core(
    cfg: CoreConfig, partition: SmPartition | None = None, model: LlamaForCausalLM | None = None
) -> EngineCore:
    """`model`: an already built model (benchmarks with random weights); otherwise loaded from cfg.model_path."""
    if cfg.mode == "unified":
        core = EngineCore(cfg, model=model)
        core.warm_up()
        core.capture_cuda_graphs()
        return core
    if cfg.mode != "semi-pd":
        raise ValueError(f"mode must be 'unified' or 'semi-pd', got {cfg.mode!r}")
    split: tuple[float, float] = (cfg.prefill_sm_percent, cfg.decode_sm_percent)
    slo = None
    if cfg.slo is not None and cfg.slo.policy == "slo":
        # candidates on the device's SM granularity (a nominal 100 "SMs" without a GPU); under MPS the decode
        # process keeps the cap it started with, so only the prefill share is a choice
        fixed = cfg.decode_sm_percent if cfg.sm_partition == "mps" else None
        # green and none split disjointly: prefill runs on what decode leaves, so the decode share is the split
        start = split if fixed is not None else (100.0 - cfg.decode_sm_percent, float(cfg.decode_sm_percent))
        pcfg = cfg.slo.partitioner_config(_device_sm_count() or 100, start, fixed, max(cfg.max_prefill_tokens, 1),
                                          max_decode_batch=cfg.max_running_requests)
        assert pcfg.initial_split is not None
        split = partition.split if partition is not None else pcfg.initial_split
        slo = SloController(cfg.slo, pcfg)
    part = partition or create_partition(cfg.sm_partition, *split)
    placement = prefill_placement(cfg)

    def make_channel(core: SemiPDCore, part: SmPartition, generation: int) -> PrefillChannel:
        if placement == "thread":
            # the two roles share one GIL: at the default 5 ms switch interval a decode step waiting for the GIL
            # behind the prefill thread's Python can stall for whole intervals (suspected cause of a measured p99
            # ITL of 46 ms against a p50 of 8 ms under green:50; benchmarks/RESULTS.md)
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
            runner = ModelRunner(core.model, core.kv_pool, cfg.page_size, cfg.max_model_len)
            return ThreadPrefillChannel(PrefillWorker(runner, cfg.max_prefill_tokens),
                                        part.role_context_factory("prefill"), part.sm_count["prefill"],
                                        warm_up=generation == 0)
        from semipd_runtime.prefill_process import ProcessPrefillChannel

        return ProcessPrefillChannel(core, part)

    core = SemiPDCore(cfg, make_channel, model=model, partition=part, slo=slo)
    core.warm_up()  # eager decode above the graph sizes (the prefill worker warms its own shapes)
    core.capture_cuda_graphs()  # inside the decode partition (a later split captures its own on first use)
    log.info("semi-PD: partition %s, prefill as %s; SMs granted prefill=%d decode=%d; policy %s", part.kind,
             placement, part.sm_count["prefill"], part.sm_count["decode"], "slo" if slo else "static")
    if slo is not None:
        from semipd_runtime.slo_profile import seed_from_profile

        try:
            seed_from_profile(core, slo, part.kind)
        except BaseException:
            core.close()  # no prefill worker left behind when startup fails
            raise
    return core
