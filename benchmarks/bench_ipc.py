"""Two-process sharing on the GPU through semipd-memory (CUDA IPC); prints JSON lines, writes all rows to --out.

    python benchmarks/bench_ipc.py --out $OUT/bench_ipc.json            # GPU (CUDA IPC)
    python benchmarks/bench_ipc.py --device cpu --layers 1 --shape tiny  # smoke run on CPU (shared memory)

1. kv_pages: process B writes K/V into the pages process A allocated; A reads exactly those values back, nothing
   outside them changed, A frees only after B's done reply; B sees A's writes made after the export.
2. weights_logits: a small random module exported by A, rebuilt by B with SharedModelWeights: same logits (exact),
   B's torch.cuda.memory_allocated() grows by < 1% of the weights, and B sees A's in-place weight updates.
3. export_import_8b: an 8B-shaped (Llama-3.1-8B) set of bf16 weight tensors: export time in A, import and
   module-binding time in B (goal < 1 s), B's memory growth (< 1% of the weights), contents checked in B.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semipd_memory import (
    KVPool,
    PageAllocator,
    SharedMemoryError,
    SharedModelWeights,
    bind_tensors,
    export_tensors,
    import_tensors,
    release_import,
)

# name -> (vocab, hidden, intermediate, layers, heads, kv_heads, head_dim)
SHAPES = {
    "llama-3.1-8b": (128256, 4096, 14336, 32, 32, 8, 128),
    "tiny": (512, 128, 256, 2, 4, 2, 32),
}


class LlamaShapedWeights(nn.Module):
    """Only the parameter tree of a Llama model (no forward): what an importer binds 8B of shared weights to."""

    def __init__(self, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, hd: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.q_proj = nn.Linear(hidden, heads * hd, bias=False)
            layer.k_proj = nn.Linear(hidden, kv_heads * hd, bias=False)
            layer.v_proj = nn.Linear(hidden, kv_heads * hd, bias=False)
            layer.o_proj = nn.Linear(heads * hd, hidden, bias=False)
            layer.gate_proj = nn.Linear(hidden, inter, bias=False)
            layer.up_proj = nn.Linear(hidden, inter, bias=False)
            layer.down_proj = nn.Linear(inter, hidden, bias=False)
            layer.input_norm = nn.Parameter(torch.ones(hidden))
            layer.post_norm = nn.Parameter(torch.ones(hidden))
            self.layers.append(layer)
        self.norm = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


class SmallNet(nn.Module):
    """A small random LM-like module for the logits check (tied head, a buffer)."""

    def __init__(self, vocab: int = 1000, dim: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.register_buffer("gain", torch.linspace(0.5, 1.5, dim))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head((h + self.mlp(h)) * self.gain)


def kv_values(rid: int, n: int, page_shape: tuple[int, ...], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rid + layer)
    k = torch.randn((n, *page_shape), generator=g)
    return k, -2.0 * k + rid


# --- process B ------------------------------------------------------------------------------------------------
def child(conn: Connection, device: str) -> None:
    cuda = device == "cuda"
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # create the context now: not part of the import time
    state: dict[str, Any] = {}

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    def used_on_device() -> int:
        if not cuda:
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    handles = []  # every handle this process imported, released before exit
    while (msg := conn.recv()) is not None:
        cmd, kw = msg
        if "handle" in kw:
            handles.append(kw["handle"])
        try:
            if cmd == "open_kv":
                state["pool"] = KVPool.from_buffer(import_tensors(kw["handle"])["kv"], **kw["shape"])
                out: Any = None
            elif cmd == "write_pages":
                pool: KVPool = state["pool"]
                idx = torch.tensor(kw["pages"], device=pool.device)
                for layer in range(pool.num_layers):
                    k, v = kv_values(kw["rid"], len(kw["pages"]), (pool.page_size, pool.num_kv_heads, pool.head_dim),
                                     layer)
                    pool.k(layer)[idx] = k.to(pool.device, pool.dtype)
                    pool.v(layer)[idx] = v.to(pool.device, pool.dtype)
                if cuda:
                    torch.cuda.synchronize()  # "done" means written
                out = kw["rid"]
            elif cmd == "read_pages":
                pool = state["pool"]
                idx = torch.tensor(kw["pages"], device=pool.device)
                out = (pool.k(kw["layer"])[idx].float().cpu().numpy(), pool.v(kw["layer"])[idx].float().cpu().numpy())
            elif cmd == "load_small":
                before = allocated()
                state["small"] = SharedModelWeights.load(kw["handle"], SmallNet)
                out = allocated() - before
            elif cmd == "forward_small":
                with torch.no_grad():
                    out = state["small"](torch.tensor(kw["ids"], device=device)).float().cpu().numpy()
            elif cmd == "load_big":
                before, before_dev = allocated(), used_on_device()
                t0 = time.perf_counter()
                tensors = import_tensors(kw["handle"])
                t1 = time.perf_counter()
                state["big"] = bind_tensors(lambda: LlamaShapedWeights(*kw["shape"]), tensors)
                t2 = time.perf_counter()
                growth, dev_growth = allocated() - before, used_on_device() - before_dev
                # one element per tensor is checked: a full compare would allocate large temporaries
                ok = all(t.flatten()[[0, -1]].eq(float(kw["fills"][n])).all().item() for n, t in tensors.items())
                out = dict(import_s=t1 - t0, bind_s=t2 - t1, allocated_growth=growth,
                           device_used_growth=dev_growth, contents_ok=ok)
            elif cmd == "export":
                state["exported"] = torch.arange(kw["numel"], dtype=torch.float32, device=device)
                out = export_tensors({"x": state["exported"]})
            elif cmd == "try_import":
                try:
                    tensors = import_tensors(kw["handle"])
                    out = f"opened: sum={float(tensors['x'].sum())}"
                except SharedMemoryError as e:
                    out = f"SharedMemoryError: {e}"
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", out))
        except Exception as e:  # noqa: BLE001 - any failure goes back to the parent as an error row
            conn.send(("error", f"{type(e).__name__}: {e}"))
    # release what we mapped before exiting, so the owner's IPC ref counters drop to zero
    state.clear()
    for handle in handles:
        release_import(handle)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()


class Child:
    def __init__(self, device: str, env: dict[str, str] | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=child, args=(theirs, device), daemon=True)
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})  # spawn children take the parent's environment at start
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        theirs.close()

    def __call__(self, cmd: str, **kw: Any) -> Any:
        self.conn.send((cmd, kw))
        if not self.conn.poll(300):
            raise TimeoutError(f"child did not answer {cmd}")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"child {cmd}: {value}")
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=30)


# --- process A ------------------------------------------------------------------------------------------------
def check_kv(b: Child, device: str) -> dict:
    shape = dict(num_layers=4, num_pages=64, page_size=16, num_kv_heads=8, head_dim=128)
    alloc = PageAllocator(64, 16, max_requests=8, max_pages_per_request=16, device=device)
    pool = KVPool(**shape, dtype=torch.bfloat16, device=device)
    handle = export_tensors({"kv": pool.buffer})
    b("open_kv", handle=handle, shape=shape)
    pool.k(2)[63] = 1.25  # after the export: B must see it
    k, v = b("read_pages", layer=2, pages=[63])
    sees_later_writes = bool((k == 1.25).all() and (v == 0).all())
    pool.k(2)[63] = 0
    slots = {rid: alloc.alloc(n) for rid, n in ((1, 5), (2, 3), (3, 7))}
    pages = {rid: alloc.pages(s) for rid, s in slots.items()}
    alloc.free_deferred(slots[2], "prefill")  # aborted while B writes: parked until done
    parked_held = True
    for rid in (1, 2, 3):
        assert b("write_pages", rid=rid, pages=pages[rid]) == rid
        if rid == 2:
            parked_held = alloc.num_parked_pages == 3
            alloc.writer_done("prefill")
    page_shape = (16, 8, 128)
    exact = True
    written = torch.zeros(64, dtype=torch.bool, device=device)
    for rid in (1, 2, 3):
        idx = torch.tensor(pages[rid], device=device)
        written[idx] = True
        for layer in range(4):
            want_k, want_v = kv_values(rid, len(pages[rid]), page_shape, layer)
            exact &= torch.equal(pool.k(layer)[idx].cpu(), want_k.to(torch.bfloat16))
            exact &= torch.equal(pool.v(layer)[idx].cpu(), want_v.to(torch.bfloat16))
    untouched_zero = bool((pool.buffer[:, :, ~written] == 0).all())
    for rid in (1, 3):
        alloc.free(slots[rid])
    alloc.check_integrity()
    ok = exact and untouched_zero and sees_later_writes and parked_held and alloc.num_free_pages == 64
    return dict(check="kv_pages", ok=ok, exact=exact, untouched_zero=untouched_zero,
                importer_sees_later_writes=sees_later_writes, parked_until_done=parked_held)


def check_small_weights(b: Child, device: str) -> dict:
    torch.manual_seed(0)
    model = SmallNet().to(device=device, dtype=torch.bfloat16).eval()
    weights = SharedModelWeights(model)
    growth = b("load_small", handle=weights.handle)
    ids = [[1, 7, 42, 999], [3, 3, 500, 0]]
    with torch.no_grad():
        want = model(torch.tensor(ids, device=device)).float().cpu().numpy()
        same = bool((b("forward_small", ids=ids) == want).all())
        model.mlp[0].weight.mul_(-1.0)  # in place in A: B computes with it without any message
        want2 = model(torch.tensor(ids, device=device)).float().cpu().numpy()
    shared = bool((b("forward_small", ids=ids) == want2).all()) and not bool((want2 == want).all())
    frac = growth / weights.nbytes
    return dict(check="weights_logits", ok=same and shared and frac < 0.01, same_logits=same,
                sees_weight_updates=shared, weight_bytes=weights.nbytes, importer_allocated_growth=growth,
                growth_fraction=frac)


def check_8b(b: Child, device: str, shape_name: str, layers: int | None) -> dict:
    shape = list(SHAPES[shape_name])
    if layers is not None:
        shape[3] = layers
    with torch.device("meta"):
        template = LlamaShapedWeights(*shape)
    tensors: dict[str, torch.Tensor] = {}
    fills: dict[str, float] = {}
    t0 = time.perf_counter()
    for i, (name, p) in enumerate(template.named_parameters()):
        fills[name] = float(i % 13 + 1)
        tensors[name] = torch.full(p.shape, fills[name], dtype=torch.bfloat16, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    alloc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = SharedModelWeights(tensors)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = b("load_big", handle=weights.handle, shape=shape, fills=fills)
    round_trip_s = time.perf_counter() - t0
    frac = got["allocated_growth"] / weights.nbytes
    total_s = export_s + got["import_s"] + got["bind_s"]
    return dict(check="export_import_8b", shape=shape_name, layers=shape[3], num_tensors=len(tensors),
                weight_gib=weights.nbytes / 2**30, alloc_s=alloc_s, export_s=export_s, **got,
                handle_send_and_load_s=round_trip_s, export_import_bind_s=total_s,
                growth_fraction=frac, ok=got["contents_ok"] and frac < 0.01 and total_s < 1.0)


def check_errors(device: str) -> dict:
    """A handle opened where its memory cannot be: after the owner died, and (CUDA) where its GPU is hidden."""
    owner = Child(device)
    try:
        handle = owner("export", numel=4096)
        live = import_tensors(handle)
        opened_live = bool(torch.equal(live["x"].cpu(), torch.arange(4096, dtype=torch.float32)))
        del live
        release_import(handle)  # unmapped while the owner lives: no warning from torch at exit
        hidden = ""
        if device == "cuda":
            blind = Child("cpu", env={"CUDA_VISIBLE_DEVICES": ""})
            try:
                hidden = blind("try_import", handle=handle)
            finally:
                blind.close()
        owner.kill()
        try:
            import_tensors(handle)
            dead = "opened (wrong)"
        except SharedMemoryError as e:
            dead = f"SharedMemoryError: {e}"
    finally:
        owner.close()
    ok = opened_live and dead.startswith("SharedMemoryError") and "has exited" in dead
    if device == "cuda":
        ok &= hidden.startswith("SharedMemoryError") and "no CUDA device" in hidden
    return dict(check="errors", ok=ok, opened_while_alive=opened_live, after_owner_died=dead, gpu_hidden=hidden)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="override the layer count of --shape")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu for a smoke run)")
    rows: list[dict] = []
    info = dict(check="env", torch=torch.__version__, device=args.device, pid=os.getpid(),
                gpu=torch.cuda.get_device_name() if args.device == "cuda" else "",
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    b = Child(args.device)
    try:
        checks = (lambda: info, lambda: check_kv(b, args.device), lambda: check_small_weights(b, args.device),
                  lambda: check_8b(b, args.device, args.shape, args.layers))
        for run_check in checks:
            row = run_check()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        b.close()
    row = check_errors(args.device)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    failed = [r["check"] for r in rows if r.get("ok") is False]
    print("FAILED: " + ", ".join(failed) if failed else "all checks ok", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
