"""What each tensor-parallel rank holds of a model: its query heads, its KV heads (replicated when there are
fewer KV heads than ranks), its slice of the MLP and of the vocabulary; and the collectives the sharded layers
call.

The layout is Megatron's: QKV and gate-up are split by output rows (column-parallel), O and down by input
columns (row-parallel, an all-reduce after them), the embedding and LM head by vocabulary rows."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from semipd_runtime.models.config import ModelConfig

_role = threading.local()


@contextmanager
def role_group(group: Any) -> Iterator[None]:
    """The model's collectives issued by this thread go to `group`: under semi-PD the prefill role (a thread
    on every rank) all-reduces among the prefill ranks while the decode role uses its own group."""
    prev = getattr(_role, "group", None)
    _role.group = group
    try:
        yield
    finally:
        _role.group = prev


@dataclass(frozen=True, slots=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; `group` carries the model's collectives (NCCL on GPU,
    gloo on CPU). A model built without one (tp=None) runs no collective at all."""

    rank: int
    size: int
    group: Any = None  # torch.distributed ProcessGroup

    @property
    def current_group(self) -> Any:
        """This thread's role's group (`role_group`), else `group`."""
        return getattr(_role, "group", None) or self.group

    def all_reduce(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.current_group)
        return x

    def vocab_range(self, vocab: int) -> tuple[int, int, int]:
        """(first id, end id, rows per rank): ranks hold equal padded slices; the last may hold padding
        rows."""
        per = -(-vocab // self.size)
        start = min(self.rank * per, vocab)
        return start, min(start + per, vocab), per

    def gather_vocab(self, logits: Tensor, vocab: int) -> Tensor:
        """[S, per] slices of every rank -> the full [S, vocab] logits, the same on every rank (so every rank
        samples the same token from the same seed)."""
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        dist.all_gather(parts, logits.contiguous(), group=self.current_group)
        return torch.cat(parts, dim=-1)[:, :vocab]


def check_tp_size(cfg: ModelConfig, tp_size: int, device: str | None = None) -> None:
    """Raise ValueError naming what cannot be split `tp_size` ways (or what is missing to run that many
    ranks)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    fits = [n for n in range(1, cfg.num_heads + 1) if _splits(cfg, n)]
    hint = f" (tp_size that fit this model: {', '.join(map(str, fits))})"
    if cfg.num_heads % tp_size:
        raise ValueError(
            f"tp_size={tp_size} cannot split the model's {cfg.num_heads} query heads evenly" + hint
        )
    kv = cfg.num_kv_heads
    if kv % tp_size and tp_size % kv:
        raise ValueError(
            f"tp_size={tp_size} cannot split the model's {kv} KV heads (they must divide evenly, or "
            f"be fewer than the ranks and divide tp_size to be replicated)" + hint
        )
    if cfg.intermediate_size % tp_size:
        raise ValueError(
            f"tp_size={tp_size} cannot split the MLP's {cfg.intermediate_size} columns evenly" + hint
        )
    world = os.environ.get("WORLD_SIZE")
    if world is not None and world.isdigit() and int(world) not in (1, tp_size):
        raise ValueError(
            f"WORLD_SIZE={world} in the environment does not match tp_size={tp_size} (semipd starts "
            f"its own rank processes: run it as one process, not under torchrun)"
        )
    if device is not None and device.startswith("cuda"):
        first = int(device.split(":")[1]) if ":" in device else 0
        have = torch.cuda.device_count()
        if first + tp_size > have:
            raise ValueError(f"tp_size={tp_size} needs {tp_size} GPUs from {device}, but {have} are visible")


def _splits(cfg: ModelConfig, n: int) -> bool:
    kv = cfg.num_kv_heads
    return cfg.num_heads % n == 0 and (kv % n == 0 or n % kv == 0) and cfg.intermediate_size % n == 0


def shard_config(cfg: ModelConfig, tp: TensorParallel | None) -> ModelConfig:
    """The rank's view of the model: its heads, KV heads and MLP width (the vocabulary stays whole: the
    sharded embedding and LM head take their slice from `tp`). The KV pool built from it holds this rank's
    heads."""
    if tp is None or tp.size == 1:
        return cfg
    check_tp_size(cfg, tp.size)
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // tp.size,
        num_kv_heads=max(1, cfg.num_kv_heads // tp.size),
        intermediate_size=cfg.intermediate_size // tp.size,
    )


def _kv_heads(cfg: ModelConfig, tp: TensorParallel) -> tuple[int, int]:
    """(first KV head, count) of the rank: its query heads' KV heads."""
    kv = cfg.num_kv_heads
    if kv >= tp.size:
        return tp.rank * (kv // tp.size), kv // tp.size
    return tp.rank // (tp.size // kv), 1  # replicated: ranks sharing a KV head hold the same copy


def shard_hf_tensor(cfg: ModelConfig, tp: TensorParallel, name: str, t: Tensor) -> Tensor:
    """The rank's slice of an HF-named tensor of the full model `cfg` (replicated tensors come back whole)."""
    hd, module = cfg.head_dim, name.rsplit(".", 1)[0]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        start, end, per = tp.vocab_range(cfg.vocab_size)
        part = t[start:end]
        if end - start < per:  # padding rows: never looked up, their logits are cut off after the gather
            part = torch.cat([part, part.new_zeros(per - (end - start), *part.shape[1:])])
        return part
    if module.endswith("self_attn.q_proj"):
        n = cfg.num_heads // tp.size
        return t[tp.rank * n * hd : (tp.rank + 1) * n * hd]
    if module.endswith(("self_attn.k_proj", "self_attn.v_proj")):
        first, n = _kv_heads(cfg, tp)
        return t[first * hd : (first + n) * hd]
    if module.endswith(("mlp.gate_proj", "mlp.up_proj")):
        n = cfg.intermediate_size // tp.size
        return t[tp.rank * n : (tp.rank + 1) * n]
    if module.endswith("self_attn.o_proj"):
        n = cfg.num_heads // tp.size * hd
        return t[:, tp.rank * n : (tp.rank + 1) * n]
    if module.endswith("mlp.down_proj"):
        n = cfg.intermediate_size // tp.size
        return t[:, tp.rank * n : (tp.rank + 1) * n]
    return t
