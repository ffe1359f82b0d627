"""The other process of the two-process tests (and of benchmarks/bench_ipc.py): a small command server.

Run through multiprocessing spawn: the parent puts this directory on sys.path (spawn children inherit it) so that
`serve` and `tiny_lm` pickle by reference. Commands come as (name, kwargs) over a Pipe; the reply is
("ok", value) or ("error", "Type: message").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from torch import nn

from semipd_memory import KVPool, SharedModelWeights, SharedTensorsHandle, export_tensors, import_tensors


class TinyLM(nn.Module):
    """A small random LM-like module: embedding, two MLP blocks with a norm buffer, tied output head."""

    def __init__(self, vocab: int = 64, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
                                    for _ in range(2))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("inv_freq", torch.arange(dim, dtype=torch.float32), persistent=False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h) * self.scale
        return self.head(h + 1e-3 * self.inv_freq)


def tiny_lm() -> nn.Module:
    return TinyLM()


def kv_values(rid: int, num_pages: int, page_shape: tuple[int, ...], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the writer puts into a request's pages: deterministic, different per request, layer, K and V."""
    g = torch.Generator().manual_seed(1000 * rid + layer)
    k = torch.randn((num_pages, *page_shape), generator=g)
    return k, -2.0 * k + rid


class _State:
    def __init__(self) -> None:
        self.pool: KVPool | None = None
        self.module: nn.Module | None = None
        self.kept: dict[str, torch.Tensor] = {}


def _cmd_pid(st: _State) -> int:
    return os.getpid()


def _cmd_open_kv(st: _State, handle: SharedTensorsHandle, shape: dict[str, int]) -> str:
    st.pool = KVPool.from_buffer(import_tensors(handle)["kv"], **shape)
    return str(st.pool.device)


def _cmd_write_pages(st: _State, rid: int, pages: list[int]) -> int:
    assert st.pool is not None
    page_shape = (st.pool.page_size, st.pool.num_kv_heads, st.pool.head_dim)
    idx = torch.tensor(pages, dtype=torch.long, device=st.pool.device)
    for layer in range(st.pool.num_layers):
        k, v = kv_values(rid, len(pages), page_shape, layer)
        st.pool.k(layer)[idx] = k.to(st.pool.device, st.pool.dtype)
        st.pool.v(layer)[idx] = v.to(st.pool.device, st.pool.dtype)
    if st.pool.device.type == "cuda":
        torch.cuda.synchronize()
    return rid


def _cmd_read_pages(st: _State, layer: int, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
    # numpy pickles by value: nothing here should travel through torch's own sharing
    assert st.pool is not None
    idx = torch.tensor(pages, dtype=torch.long, device=st.pool.device)
    return st.pool.k(layer)[idx].float().cpu().numpy(), st.pool.v(layer)[idx].float().cpu().numpy()


def _cmd_import(st: _State, handle: SharedTensorsHandle) -> dict[str, Any]:
    """Import and report what we got (no tensors travel back: only sums, sharing flags and memory growth)."""
    before = torch.cuda.memory_allocated() if handle.device_type == "cuda" else 0
    tensors = import_tensors(handle)
    st.kept.update(tensors)
    after = torch.cuda.memory_allocated() if handle.device_type == "cuda" else 0
    return {"sums": {n: float(t.double().sum()) for n, t in tensors.items()},
            "shared": all(t.is_cuda or t.is_shared() for t in tensors.values()),
            "ptrs": {n: t.data_ptr() for n, t in tensors.items()},
            "allocated_growth": after - before}


def _cmd_load_module(st: _State, handle: SharedTensorsHandle, factory: Callable[[], nn.Module]) -> int:
    cuda = handle.device_type == "cuda"
    before = torch.cuda.memory_allocated() if cuda else 0
    st.module = SharedModelWeights.load(handle, factory)
    return (torch.cuda.memory_allocated() if cuda else 0) - before


@torch.no_grad()
def _cmd_forward(st: _State, ids: list[list[int]]) -> np.ndarray:
    assert st.module is not None
    device = next(st.module.parameters()).device
    return st.module(torch.tensor(ids, device=device)).float().cpu().numpy()


def _cmd_export(st: _State, numel: int, device: str) -> SharedTensorsHandle:
    st.kept = {"x": torch.arange(numel, dtype=torch.float32, device=device)}
    return export_tensors(st.kept)


COMMANDS: dict[str, Callable[..., Any]] = {
    "pid": _cmd_pid, "open_kv": _cmd_open_kv, "write_pages": _cmd_write_pages, "read_pages": _cmd_read_pages,
    "import": _cmd_import, "load_module": _cmd_load_module, "forward": _cmd_forward, "export": _cmd_export,
}


def serve(conn: Connection) -> None:
    state = _State()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        name, kwargs = msg
        try:
            conn.send(("ok", COMMANDS[name](state, **kwargs)))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the test with it
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Worker:
    """Parent side: a spawned process running `serve`."""

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def call(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> Any:
        status, value = self.call_raw(name, timeout_s, **kwargs)
        if status != "ok":
            raise RuntimeError(f"worker {name} failed: {value}")
        return value

    def call_raw(self, name: str, timeout_s: float = 120.0, **kwargs: Any) -> tuple[str, Any]:
        self.conn.send((name, kwargs))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"worker did not answer {name} within {timeout_s}s")
        return self.conn.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):
                self.conn.send(None)
            self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=10)
