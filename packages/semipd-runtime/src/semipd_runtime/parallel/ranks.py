"""The ranks other than 0: each is a process that holds its shard of the model and of the KV pool and runs
every step rank 0's scheduler broadcasts (`Forward`, `Sample`, ...), so that its collectives meet rank 0's.

Two process groups: the model's (NCCL on GPU, gloo on CPU; its timeout bounds a collective with a dead rank)
and a gloo control group for the step messages, with a long timeout since a rank waits there while the engine
idles."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from semipd_memory import KVPool
from semipd_runtime.capacity import kv_pages_for
from semipd_runtime.config import EngineConfig
from semipd_runtime.cpu_threads import share_cpu_threads
from semipd_runtime.messages import CoreSampling
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.config import ModelConfig
from semipd_runtime.models.loader import load_model
from semipd_runtime.parallel.shard import TensorParallel, role_group
from semipd_runtime.partition import SmPartition, create_partition
from semipd_runtime.penalties import PenaltyPlan
from semipd_runtime.sampler import Sampler
from semipd_runtime.zmq_channel import ignore_terminal_interrupt

log = logging.getLogger(__name__)

# NVLink multicast stays off in every rank (a program using it can take a shared host's GPUs out of service)
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
CONTROL_TIMEOUT = timedelta(days=7)


# --- what rank 0 broadcasts, in the order its core calls the model ----------------------------------------
@dataclass(slots=True)
class Forward:
    """A `ModelRunner.forward` call; the page table follows as a tensor broadcast on the model's group."""

    chunks: list[list[int]]
    starts: list[int]
    sample_rows: list[int]
    uses_prev: bool  # placeholders read the tokens this rank sampled in the step before
    table_shape: tuple[int, int]
    table_dtype: str


@dataclass(slots=True)
class Sample:
    params: list[CoreSampling]
    steps: list[int]
    plan: PenaltyPlan | None = None


@dataclass(slots=True)
class WarmUp:
    max_tokens: int
    max_batch: int


@dataclass(slots=True)
class Capture:
    """Capture the decode CUDA graphs (their all-reduces pair with rank 0's)."""


@dataclass(slots=True)
class Stop:
    reason: str = field(default="shutdown")


RankMsg = Forward | Sample | WarmUp | Capture | Stop


def rank_device(device: str, rank: int) -> torch.device:
    """cuda[:N] -> rank r on cuda:N+r; cpu stays cpu."""
    d = torch.device(device)
    if d.type != "cuda":
        return d
    return torch.device("cuda", (d.index or 0) + rank)


@dataclass(frozen=True, slots=True)
class Role:
    """One role's groups (decode, or semi-PD's prefill): `tp.group` carries its model collectives and
    page tables, `control` its step messages."""

    tp: TensorParallel
    control: Any


@dataclass(frozen=True, slots=True)
class Roles:
    decode: Role  # its tp is the model's (the default group)
    prefill: Role | None  # semi-PD: the prefill threads' own groups


def init_group(
    rank: int, size: int, init_file: str, device: torch.device, timeout_s: float, semi_pd: bool = False
) -> Roles:
    """Join the ranks' rendezvous (a file: no port to pick); every rank creates the same groups in the same
    order."""
    os.environ.update(MULTICAST_OFF)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks are the parallelism: each takes its share of the cores, not all of them
        share_cpu_threads(device.type, size)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )
    if dist.get_world_size() != size:
        raise RuntimeError(
            f"rank {rank} joined a group of {dist.get_world_size()} ranks, expected tp_size={size}"
        )
    decode = Role(TensorParallel(rank, size, dist.group.WORLD), dist.new_group(backend="gloo",
                                                                             timeout=CONTROL_TIMEOUT))
    prefill = None
    if semi_pd:
        group = dist.new_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        prefill = Role(TensorParallel(rank, size, group), control)
    return Roles(decode, prefill)


def agree_num_pages(cfg: EngineConfig, mcfg: ModelConfig, tp: TensorParallel, device: torch.device) -> int:
    """Every rank holds the same pages (one page table): the fewest any rank's memory allows."""
    mine = kv_pages_for(cfg, mcfg, getattr(torch, cfg.dtype), device)
    t = torch.tensor([mine], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


def broadcast_msg(msg: RankMsg | None, control: Any) -> RankMsg:
    box: list[Any] = [msg]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def no_logprobs(params: list[CoreSampling]) -> list[CoreSampling]:
    """Ranks other than 0 need the sampled tokens only."""
    return [msgspec.structs.replace(p, logprobs=None) if p.logprobs is not None else p for p in params]


class RankWorker:
    """Runs rank 0's broadcast steps on this rank's shard until `Stop`."""

    def __init__(self, runner: ModelRunner, role: Role) -> None:
        self.runner, self.tp, self.control = runner, role.tp, role.control
        self.sampler = Sampler()
        self.logits: torch.Tensor | None = None
        self.last_tokens: torch.Tensor | None = (
            None  # sampled by the latest Forward (None: it sampled nothing)
        )

    def serve(self) -> None:
        with role_group(self.tp.group):  # the model's all-reduces of this thread go to this role's group
            while True:
                msg = broadcast_msg(None, self.control)
                if isinstance(msg, Stop):
                    return
                self.handle(msg)

    @torch.inference_mode()
    def handle(self, msg: RankMsg) -> None:
        r = self.runner
        if isinstance(msg, Forward):
            table = torch.empty(msg.table_shape, dtype=getattr(torch, msg.table_dtype), device=r.device)
            dist.broadcast(table, src=0, group=self.tp.group)
            prev = self.last_tokens if msg.uses_prev else None
            assert prev is not None or not msg.uses_prev, (
                "rank 0 reads placeholders of a step that sampled nothing"
            )
            self.logits = r.forward(msg.chunks, msg.starts, table, msg.sample_rows, prev)
            self.last_tokens = None
        elif isinstance(msg, Sample):
            assert self.logits is not None
            self.last_tokens = self.sampler.sample(self.logits, msg.params, msg.steps, msg.plan).tokens
        elif isinstance(msg, WarmUp):
            r.warm_up(msg.max_tokens, msg.max_batch, Sampler())
        elif isinstance(msg, Capture) and r.graphs is not None:
            r.graphs.capture()


def _exit_when_orphaned(parent: int) -> None:
    """Rank 0 gone (killed without closing us): nothing will ever broadcast again."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(3)


def _serve_prefill(runner: ModelRunner, role: Role, part: SmPartition) -> None:
    """Semi-PD: this rank's prefill worker, a thread beside its decode role (same weights and KV shard), on
    its share of this rank's SMs."""
    try:
        with part.role_context_factory("prefill")():
            RankWorker(runner, role).serve()
    except BaseException:
        log.exception("prefill role failed")
        os._exit(4)  # rank 0 sees the rank gone rather than waiting on a collective


def run_rank(rank: int, cfg: EngineConfig, init_file: str, parent: int, log_level: int) -> None:
    """Entry point of rank `rank` (> 0): join the groups, load the shard, size the pool as rank 0 does,
    serve (semi-PD: a prefill thread and the decode role)."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s"
    )
    ignore_terminal_interrupt()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    device = rank_device(cfg.device, rank)
    semi_pd = cfg.semi_pd.mode == "semi-pd"
    roles = init_group(rank, cfg.parallel.tp_size, init_file, device, cfg.parallel.tp_timeout_s, semi_pd)
    tp = roles.decode.tp
    dtype = getattr(torch, cfg.dtype)
    model = load_model(cfg.model_path, device, dtype, cfg.model.load_format, tp)
    mcfg = model.config
    pages = agree_num_pages(cfg, mcfg, tp, device)
    pool = KVPool(
        mcfg.num_layers, pages, cfg.scheduler.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, device
    )
    ps, max_len = cfg.scheduler.page_size, cfg.max_model_len
    runner = ModelRunner(model, pool, ps, max_len, cuda_graph_max_bs=cfg.scheduler.graph_max_bs())
    log.info("rank %d/%d on %s: %d KV heads, %d pages", rank, tp.size, device, mcfg.num_kv_heads, pages)
    prefill, part = None, SmPartition(*cfg.shares)  # the base class: no SM split (unified)
    if roles.prefill is not None:  # the split rank 0 runs, on this rank's GPU
        part = create_partition(cfg.semi_pd.sm_partition, *cfg.shares, device_index=device.index or 0)
        prefill = threading.Thread(target=_serve_prefill, args=(ModelRunner(model, pool, ps, max_len),
                                   roles.prefill, part), daemon=True, name="semipd-tp-prefill")
        prefill.start()
    with part.role_context_factory("decode")():
        RankWorker(runner, roles.decode).serve()
    if prefill is not None:
        prefill.join(timeout=10)  # rank 0 stops it before the decode role
    dist.destroy_process_group()
