"""Rank 0 of a tensor-parallel engine: the engine core process itself. It starts the other ranks, loads its
own shard, and composes the core it builds: the core's runner and sampler are wrapped so that each call is
first broadcast to the other ranks (`ranks.py`), which run the same forward and sample the same tokens. The
scheduler, allocator and prefix cache exist once, here; the page-table rows of each step travel with it.

A rank that dies fails the engine: the next step finds its process gone (or a collective with it fails within
`tp_timeout_s`), and while idle the health stats say so (`RankWatch`)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.messages import CoreSampling, EngineStats
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import load_model
from semipd_runtime.parallel.ranks import (
    MULTICAST_OFF,
    Capture,
    Forward,
    RankMsg,
    Sample,
    Stop,
    WarmUp,
    agree_num_pages,
    broadcast_msg,
    init_group,
    no_logprobs,
    rank_device,
    run_rank,
)
from semipd_runtime.parallel.shard import TensorParallel, check_tp_size
from semipd_runtime.partition import environment
from semipd_runtime.prefill_executor import PrefillTiming
from semipd_runtime.request import Request
from semipd_runtime.sampler import SampledTokens, Sampler
from semipd_runtime.scheduler import Scheduler

log = logging.getLogger(__name__)


class RankDiedError(RuntimeError):
    pass


class RankGroup:
    """Rank 0's handle on the other ranks: their processes, the control group, the step broadcast."""

    def __init__(self, procs: list[BaseProcess], tp: TensorParallel, control: Any, tmpdir: str) -> None:
        self.procs, self.tp, self.control, self.tmpdir = procs, tp, control, tmpdir
        self.closed = False

    @property
    def pids(self) -> list[int]:
        return [p.pid or 0 for p in self.procs]

    def dead(self) -> str:
        """Why a rank is gone ("" while all live)."""
        for rank, p in enumerate(self.procs, start=1):
            if p.exitcode is not None:
                return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return ""

    def send(self, msg: RankMsg) -> None:
        """Broadcast a step to the other ranks; a rank already gone fails it at once (no collective with
        it)."""
        why = self.dead()
        if why:
            raise RankDiedError(why)
        broadcast_msg(msg, self.control)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.send(Stop())
        except Exception as e:  # noqa: BLE001 - a dead rank or a broken group: the processes are killed below
            log.warning("tensor-parallel ranks not stopped cleanly: %s", e)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class LeaderRunner:
    """The core's runner on rank 0: broadcasts each forward (with its page-table rows), then runs it here."""

    def __init__(self, inner: ModelRunner, ranks: RankGroup) -> None:
        self.inner, self.ranks = inner, ranks
        self.model, self.kv_pool, self.device, self.graphs = (
            inner.model,
            inner.kv_pool,
            inner.device,
            inner.graphs,
        )

    def forward(
        self,
        chunks: list[list[int]],
        starts: list[int],
        page_table: Tensor,
        sample_rows: list[int],
        prev_tokens: Tensor | None = None,
    ) -> Tensor:
        table = page_table.contiguous()
        self.ranks.send(
            Forward(
                chunks,
                starts,
                sample_rows,
                prev_tokens is not None,
                tuple(table.shape),
                str(table.dtype).removeprefix("torch."),
            )
        )
        dist.broadcast(table, src=0, group=self.ranks.tp.group)
        return self.inner.forward(chunks, starts, table, sample_rows, prev_tokens)

    def warm_up(self, max_tokens: int, max_batch: int, sample: Any = None) -> float:
        """The other ranks run the same warm-up forwards; every rank samples with a plain Sampler there (the
        core's would broadcast)."""
        self.ranks.send(WarmUp(max_tokens, max_batch))
        return self.inner.warm_up(max_tokens, max_batch, Sampler())


class LeaderSampler:
    """The core's sampler on rank 0: the other ranks sample the same rows (they read the tokens as
    placeholders of the next step), without logprobs."""

    def __init__(self, inner: Sampler, ranks: RankGroup) -> None:
        self.inner, self.ranks = inner, ranks

    def sample(self, logits: Tensor, params: list[CoreSampling], steps: list[int]) -> SampledTokens:
        self.ranks.send(Sample(no_logprobs(params), steps))
        return self.inner.sample(logits, params, steps)


class RankWatch:
    """A CoreObserver that marks the engine unhealthy once a rank is gone (the server's health check reads
    it)."""

    def __init__(self, ranks: RankGroup) -> None:
        self.ranks = ranks

    def fill_stats(self, stats: EngineStats) -> None:
        why = self.ranks.dead()
        if why and stats.healthy:
            stats.healthy, stats.health_error = False, why

    def after_step(self, scheduler: Scheduler, now: float) -> tuple[float, float] | None:
        return None

    def on_arrival(self, req: Request, now: float) -> None: ...
    def on_first_token(self, req: Request, now: float) -> None: ...
    def on_finish(self, req: Request) -> None: ...
    def on_abort(self, rid: str) -> None: ...
    def on_decode_step(self, batch: int, context_tokens: int, share: float, seconds: float) -> None: ...
    def on_prefill(self, timing: PrefillTiming) -> None: ...
    def on_split(self, split: tuple[float, float], switched: bool) -> None: ...


def start_ranks(cfg: EngineConfig, init_file: str) -> list[BaseProcess]:
    """Ranks 1..tp_size-1 as daemon processes (they die with this one), multicast off in their environment."""
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    with environment(MULTICAST_OFF):
        for rank in range(1, cfg.parallel.tp_size):
            p = ctx.Process(
                target=run_rank,
                name=f"semipd-tp-rank{rank}",
                daemon=True,
                args=(rank, cfg, init_file, os.getpid(), logging.getLogger().getEffectiveLevel()),
            )
            p.start()
            procs.append(p)
    return procs


def create_tp_core(cfg: EngineConfig) -> EngineCore:
    """Rank 0's core (tp_size > 1, unified mode), with the other ranks started and serving its steps."""
    size = cfg.parallel.tp_size
    check_tp_size(ModelConfig.from_dir(cfg.model_path), size, cfg.device)
    tmpdir = tempfile.mkdtemp(prefix="semipd-tp-")
    procs = start_ranks(cfg, os.path.join(tmpdir, "rendezvous"))
    try:
        device = rank_device(cfg.device, 0)
        tp, control = init_group(
            0, size, os.path.join(tmpdir, "rendezvous"), device, cfg.parallel.tp_timeout_s
        )
        ranks = RankGroup(procs, tp, control, tmpdir)
        model = load_model(cfg.model_path, device, getattr(torch, cfg.dtype), cfg.model.load_format, tp)
        pages = agree_num_pages(cfg, model.config, tp, device)
        cfg = dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, device=str(device)),
            scheduler=dataclasses.replace(cfg.scheduler, num_pages=pages),
        )
        core = EngineCore(cfg, model=model, observers=[RankWatch(ranks)])
        core.on_close.append(ranks.close)
        core.runner = LeaderRunner(core.runner, ranks)  # type: ignore[assignment]
        core.sampler = LeaderSampler(core.sampler, ranks)  # type: ignore[assignment]
        core.warm_up()
        if core.runner.graphs is not None:
            ranks.send(Capture())
            core.capture_cuda_graphs()
    except BaseException:
        for p in procs:
            p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    log.info(
        "tensor parallel: %d ranks (pids %s), %d KV heads per rank",
        size,
        ranks.pids,
        model.config.num_kv_heads,
    )
    return core
