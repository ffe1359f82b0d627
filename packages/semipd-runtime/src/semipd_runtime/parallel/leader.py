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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.grammar import TokenBitmask
from semipd_runtime.messages import CoreSampling, EngineStats, TokenLogprobMsg
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import load_model
from semipd_runtime.parallel.ranks import (
    MULTICAST_OFF,
    Capture,
    Forward,
    RankMsg,
    Role,
    Roles,
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
from semipd_runtime.parallel.semipd import check_semi_pd, prefill_executor_factory
from semipd_runtime.parallel.shard import check_tp_size
from semipd_runtime.partition import environment
from semipd_runtime.penalties import PenaltyPlan
from semipd_runtime.prefill_executor import PrefillTiming
from semipd_runtime.request import Request
from semipd_runtime.sampler import SampledTokens, Sampler
from semipd_runtime.scheduler import Scheduler

log = logging.getLogger(__name__)


class RankDiedError(RuntimeError):
    pass


class RankGroup:
    """Rank 0's handle on the other ranks' processes: whether they live, and stopping them."""

    def __init__(self, procs: list[BaseProcess], roles: Roles, tmpdir: str) -> None:
        self.procs, self.roles, self.tmpdir = procs, roles, tmpdir
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

    def channel(self, role: Role) -> RankChannel:
        return RankChannel(self, role)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # the prefill threads first: a rank's decode role exits the process once stopped
        roles = [r for r in (self.roles.prefill, self.roles.decode) if r is not None]
        stopped = True
        for role in roles:
            try:
                self.channel(role).send(Stop())
            except Exception as e:  # noqa: BLE001 - a dead rank, a broken group: the processes are killed below
                log.warning("tensor-parallel ranks not stopped cleanly: %s", e)
                stopped = False
                break
        for p in self.procs:
            p.join(timeout=10 if stopped else 0)  # the rest of a broken group waits for a step that never comes
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class RankChannel:
    """One role's step broadcast to the other ranks (decode: the core's steps; semi-PD prefill: its
    batches)."""

    def __init__(self, ranks: RankGroup, role: Role) -> None:
        self.ranks, self.tp, self.control = ranks, role.tp, role.control

    def send(self, msg: RankMsg) -> None:
        """A rank already gone fails the step at once (no collective with it)."""
        why = self.ranks.dead()
        if why:
            raise RankDiedError(why)
        broadcast_msg(msg, self.control)


class LeaderRunner:
    """A runner on rank 0: broadcasts each forward (with its page-table rows) to its role's ranks, then runs
    it here. Duck-types the `ModelRunner` surface the core and the prefill worker use."""

    def __init__(self, inner: ModelRunner, ranks: RankChannel) -> None:
        self.inner, self.ranks = inner, ranks
        self.model, self.kv_pool, self.device = inner.model, inner.kv_pool, inner.device
        self.graphs, self.page_size = inner.graphs, inner.page_size
        self.page_table_from_rows = inner.page_table_from_rows

    def forward(self, chunks: list[list[int]], starts: list[int], page_table: Tensor, sample_rows: list[int],
                prev_tokens: Tensor | None = None) -> Tensor:
        table = page_table.contiguous()
        dtype = str(table.dtype).removeprefix("torch.")
        uses_prev = prev_tokens is not None
        shape = (table.shape[0], table.shape[1])
        self.ranks.send(Forward(chunks, starts, sample_rows, uses_prev, shape, dtype))
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

    def __init__(self, inner: Sampler, ranks: RankChannel) -> None:
        self.inner, self.ranks = inner, ranks

    def sample(self, logits: Tensor, params: list[CoreSampling], steps: list[int],
               plan: PenaltyPlan | None = None, bitmask: TokenBitmask | None = None) -> SampledTokens:
        # the core refuses grammars under TP: the other ranks would need the masks to sample the same tokens
        assert bitmask is None, "structured output is not supported with tensor parallelism"
        # the plan too: every rank keeps the same penalty state, so that it samples the same tokens
        self.ranks.send(Sample(no_logprobs(params), steps, plan))
        return self.inner.sample(logits, params, steps, plan)

    def __call__(self, logits: Tensor, params: list[CoreSampling], steps: list[int],
                 plan: PenaltyPlan | None = None,
                 bitmask: TokenBitmask | None = None) -> tuple[list[int], list[TokenLogprobMsg | None]]:
        return self.sample(logits, params, steps, plan, bitmask).read()


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


def sweep_stale_rendezvous(root: str | None = None) -> list[str]:
    """Remove rendezvous directories (semipd-tp-<pid>-*) whose leader is gone: a SIGKILLed leader cannot remove
    its own. Returns what was removed."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob("semipd-tp-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def create_tp_core(cfg: EngineConfig) -> EngineCore:
    """Rank 0's core (tp_size > 1), with the other ranks started and serving its steps; semi-PD: a prefill
    worker thread here and on every rank, all-reducing among themselves (`parallel/semipd.py`)."""
    size = cfg.parallel.tp_size
    check_tp_size(ModelConfig.from_dir(cfg.model_path), size, cfg.device)
    semi_pd = cfg.semi_pd.mode == "semi-pd"
    if semi_pd:
        check_semi_pd(cfg)
    sweep_stale_rendezvous()
    tmpdir = tempfile.mkdtemp(prefix=f"semipd-tp-{os.getpid()}-")
    rendezvous = os.path.join(tmpdir, "rendezvous")
    procs = start_ranks(cfg, rendezvous)
    try:
        device = rank_device(cfg.device, 0)
        roles = init_group(0, size, rendezvous, device, cfg.parallel.tp_timeout_s, semi_pd)
        ranks = RankGroup(procs, roles, tmpdir)
        tp = roles.decode.tp
        model = load_model(cfg.model_path, device, getattr(torch, cfg.dtype), cfg.model.load_format, tp)
        pages = agree_num_pages(cfg, model.config, tp, device)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=str(device)),
                                  scheduler=dataclasses.replace(cfg.scheduler, num_pages=pages))
        make_executor = None
        if roles.prefill is not None:
            make_executor = prefill_executor_factory(cfg, ranks.channel(roles.prefill), LeaderRunner,
                                                     LeaderSampler)
        core = EngineCore(cfg, model=model, make_executor=make_executor, observers=[RankWatch(ranks)])
        core.on_close.append(ranks.close)
        decode = ranks.channel(roles.decode)
        core.runner = LeaderRunner(core.runner, decode)  # type: ignore[assignment]
        core.sampler = LeaderSampler(core.sampler, decode)  # type: ignore[assignment]
        core.warm_up()
        if core.runner.graphs is not None:
            decode.send(Capture())
            core.capture_cuda_graphs()
    except BaseException:
        for p in procs:
            p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    log.info("tensor parallel: %d ranks (pids %s), %d KV heads per rank%s", size, ranks.pids,
             model.config.num_kv_heads, ", semi-PD" if semi_pd else "")
    return core
