"""The prefill worker as its own process (`none` and `mps` backends): it maps the decode worker's weights and KV
pool through semipd-memory handles (CUDA IPC on GPU, shared memory on CPU) and copies neither."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from semipd_runtime.config import EngineConfig
from semipd_runtime.messages import FromPrefill, PrefillBatch, PrefillReady, Shutdown, ToPrefill
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.partition import SmPartition, environment
from semipd_runtime.prefill_worker import PrefillWorker, prefill_loop

if TYPE_CHECKING:
    from semipd_runtime.core import EngineCore

log = logging.getLogger(__name__)


def run_prefill_process(
    cfg: EngineConfig, model_cfg: ModelConfig, weights_handle: Any, kv_handle: Any, kv_shape: dict[str, Any],
    in_addr: str, out_addr: str, sm_count: int, log_level: int,
) -> None:
    from semipd_memory import KVPool, bind_tensors, import_tensors

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s prefill %(name)s: %(message)s")
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(in_addr)
    push.connect(out_addr)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToPrefill)
    parent = os.getppid()
    try:
        weights = import_tensors(weights_handle)
        kv_buffer = import_tensors(kv_handle)["kv"]
        model = bind_tensors(lambda: LlamaForCausalLM(model_cfg), weights)
        kv_pool = KVPool.from_buffer(kv_buffer, **kv_shape)
        runner = ModelRunner(model, kv_pool, cfg.scheduler.page_size, cfg.max_model_len)
        worker = PrefillWorker(runner, cfg.scheduler.max_prefill_tokens)
        worker.warm_up()  # before ready: a standby takes batches only once its kernels are compiled
        tensors = list(weights.values()) + [kv_buffer]
        all_shared = all(t.is_cuda or t.is_shared() for t in tensors)
        mapped = sum(t.numel() * t.element_size() for t in tensors)
        push.send(enc.encode(PrefillReady(sm_count, os.getpid(), mapped, all_shared)))

        def recv() -> ToPrefill:
            while not pull.poll(500):
                if os.getppid() != parent:
                    return Shutdown()
            return dec.decode(pull.recv())

        prefill_loop(worker, recv, lambda m: push.send(enc.encode(m)))
    finally:
        push.close(linger=1000)
        pull.close(linger=0)
        ctx.term()


class ProcessPrefillChannel:
    def __init__(self, core: EngineCore, partition: SmPartition) -> None:
        from semipd_memory import export_tensors

        cfg = core.cfg
        self._dir = tempfile.TemporaryDirectory(prefix="semipd-prefill-")
        in_addr, out_addr = f"ipc://{self._dir.name}/in", f"ipc://{self._dir.name}/out"
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.bind(in_addr)
        self.pull.bind(out_addr)
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromPrefill)
        # handles keep the exported memory alive on this side for as long as the channel lives
        self._weights_handle = export_tensors({n: p.data for n, p in core.model.named_parameters()})
        self._kv_handle = export_tensors({"kv": core.kv_pool.buffer})
        kv_shape = dict(num_layers=core.kv_pool.num_layers, num_pages=core.kv_pool.num_pages,
                        page_size=core.kv_pool.page_size, num_kv_heads=core.kv_pool.num_kv_heads,
                        head_dim=core.kv_pool.head_dim)
        self.proc = mp.get_context("spawn").Process(
            target=run_prefill_process,
            args=(cfg, core.model.config, self._weights_handle, self._kv_handle, kv_shape, in_addr, out_addr,
                  partition.sm_count["prefill"], logging.getLogger().getEffectiveLevel()),
            name="semipd-prefill", daemon=True)
        with environment(partition.process_env("prefill")):
            self.proc.start()

    @property
    def alive(self) -> bool:
        return self.proc.is_alive()

    def send(self, batch: PrefillBatch) -> None:
        # a PUSH socket blocks while no peer is connected: never block on a dead worker (the core detects the
        # death through `alive` and fails the batch)
        data = self.enc.encode(batch)
        while True:
            try:
                self.push.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                if not self.proc.is_alive():
                    return
                time.sleep(0.001)

    def poll(self, timeout_s: float) -> list[FromPrefill]:
        out: list[FromPrefill] = []
        if self.pull.poll(int(timeout_s * 1000)):
            while True:
                try:
                    out.append(self.dec.decode(self.pull.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return out

    def close(self) -> None:
        if self.proc.is_alive():
            self.push.send(self.enc.encode(Shutdown()))
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        self._dir.cleanup()
