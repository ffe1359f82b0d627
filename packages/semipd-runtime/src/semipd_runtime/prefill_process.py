"""The prefill worker as its own process (`none` and `mps` backends): it maps the decode worker's weights and KV
pool through semipd-memory handles (CUDA IPC on GPU, shared memory on CPU) and copies neither."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from typing import TYPE_CHECKING, Any

from semipd_runtime.config import EngineConfig
from semipd_runtime.cpu_threads import share_cpu_threads
from semipd_runtime.messages import FromPrefill, PrefillBatch, PrefillReady, Shutdown, ToPrefill
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.partition import SmPartition, environment
from semipd_runtime.prefill_worker import PrefillWorker, prefill_loop
from semipd_runtime.zmq_channel import ChannelAddrs, ZmqChannel, ignore_terminal_interrupt, parent_alive

if TYPE_CHECKING:
    from semipd_runtime.core import EngineCore

log = logging.getLogger(__name__)


def run_prefill_process(
    cfg: EngineConfig, model_cfg: ModelConfig, weights_handle: Any, kv_handle: Any, kv_shape: dict[str, Any],
    addrs: ChannelAddrs, sm_count: int, log_level: int,
) -> None:
    from semipd_memory import KVPool, bind_tensors, import_tensors

    ignore_terminal_interrupt()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s prefill %(name)s: %(message)s")
    chan: ZmqChannel[FromPrefill, ToPrefill] = ZmqChannel.connect(addrs, ToPrefill, peer_alive=parent_alive())
    share_cpu_threads(cfg.device, 2)  # prefill here, decode in the core's process, at the same time
    try:
        weights = import_tensors(weights_handle)
        kv_buffer = import_tensors(kv_handle)["kv"]
        model = bind_tensors(lambda: LlamaForCausalLM(model_cfg), weights)
        kv_pool = KVPool.from_buffer(kv_buffer, **kv_shape)
        runner = ModelRunner(model, kv_pool, cfg.scheduler.page_size, cfg.max_model_len)
        worker = PrefillWorker(runner, cfg.scheduler.max_prefill_tokens, cfg.model.eos_token_ids)
        worker.warm_up()  # before ready: a standby takes batches only once its kernels are compiled
        tensors = list(weights.values()) + [kv_buffer]
        all_shared = all(t.is_cuda or t.is_shared() for t in tensors)
        mapped = sum(t.numel() * t.element_size() for t in tensors)
        chan.send(PrefillReady(sm_count, os.getpid(), mapped, all_shared))

        def recv() -> ToPrefill:
            msg = chan.recv()  # None: the decode worker is gone
            return Shutdown() if msg is None else msg

        def send(msg: FromPrefill) -> None:
            chan.send(msg)

        prefill_loop(worker, recv, send)
    finally:
        chan.close(linger_s=1.0)


class ProcessPrefillChannel:
    def __init__(self, core: EngineCore, partition: SmPartition) -> None:
        from semipd_memory import export_tensors

        cfg = core.cfg
        self.chan: ZmqChannel[ToPrefill, FromPrefill] = ZmqChannel.bind(FromPrefill, prefix="semipd-prefill")
        # handles keep the exported memory alive on this side for as long as the channel lives
        self._weights_handle = export_tensors({n: p.data for n, p in core.model.named_parameters()})
        self._kv_handle = export_tensors({"kv": core.kv_pool.buffer})
        kv_shape = {"num_layers": core.kv_pool.num_layers, "num_pages": core.kv_pool.num_pages,
                    "page_size": core.kv_pool.page_size, "num_kv_heads": core.kv_pool.num_kv_heads,
                    "head_dim": core.kv_pool.head_dim}
        self.proc = mp.get_context("spawn").Process(
            target=run_prefill_process,
            args=(cfg, core.model.config, self._weights_handle, self._kv_handle, kv_shape, self.chan.addrs,
                  partition.sm_count["prefill"], logging.getLogger().getEffectiveLevel()),
            name="semipd-prefill", daemon=True)
        self.chan.peer_alive = self.proc.is_alive
        share_cpu_threads(cfg.device, 2)  # this process decodes while the prefill process runs
        with environment(partition.process_env("prefill")):
            self.proc.start()

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def send(self, batch: PrefillBatch) -> None:
        self.chan.send(batch)  # dropped if the worker is dead: the core sees `alive` go False and fails the batch

    def poll(self, timeout_s: float) -> list[FromPrefill]:
        return self.chan.recv_all(timeout_s)

    def close(self) -> None:
        if self.proc.is_alive():
            self.chan.send(Shutdown())
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self.chan.close()
