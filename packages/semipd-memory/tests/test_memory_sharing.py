"""Sharing tensors across processes on CPU: plain-data handles, in-place shared memory, and two real processes
(spawned) that write and read the same KV pages and weights."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from semipd_memory import (
    KVPool,
    OwnerInfo,
    PageAllocator,
    SharedMemoryError,
    SharedModelWeights,
    SharedTensorsHandle,
    export_tensors,
    import_tensors,
    release_export,
)

sys.path.insert(0, str(Path(__file__).parent))  # spawn children inherit sys.path: they import the worker by name
import memory_ipc_worker as ipc


# --- one process ----------------------------------------------------------------------------------------------
def test_handle_is_plain_data_and_storages_are_shared_once() -> None:
    base = torch.arange(12, dtype=torch.float32)
    other = torch.ones(3, dtype=torch.bfloat16)
    handle = export_tensors({"base": base, "view": base[2:10:3], "other": other, "empty": torch.empty(0, 5)})
    assert len(handle.storages) == 2 and handle.nbytes == 12 * 4 + 3 * 2
    assert handle.names == ["base", "view", "other", "empty"]
    view = handle.tensors[1]
    assert (view.storage, view.offset, view.shape, view.stride, view.dtype) == (0, 2, (3,), (3,), "float32")
    assert handle.tensors[3].storage == -1
    assert pickle.loads(pickle.dumps(handle)) == handle
    msgspec = pytest.importorskip("msgspec")
    for codec in (msgspec.msgpack, msgspec.json):
        assert codec.decode(codec.encode(handle), type=SharedTensorsHandle) == handle
    release_export(handle)


def test_cpu_export_moves_storage_into_shared_memory_in_place() -> None:
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    before = lin(x).detach()
    weight_obj = lin.weight
    handle = export_tensors({n: p.detach() for n, p in lin.named_parameters()})
    assert lin.weight is weight_obj and lin.weight.is_shared() and lin.bias.is_shared()
    assert torch.equal(lin(x).detach(), before)
    # in the owner itself, import gives back the very same memory
    mine = import_tensors(handle)
    assert mine["weight"].data_ptr() == lin.weight.data_ptr()
    release_export(handle)
    with pytest.raises(SharedMemoryError, match="released"):
        import_tensors(handle)
    with pytest.raises(ValueError, match="not a live export"):
        release_export(handle)


def test_export_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="mapping of name"):
        export_tensors([torch.ones(2)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        export_tensors({})
    with pytest.raises(TypeError, match=r"tensors\['a'\] must be a torch.Tensor"):
        export_tensors({"a": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"tensors\['m'\] is on meta"):
        export_tensors({"m": torch.empty(2, device="meta")})
    with pytest.raises(TypeError, match="SharedTensorsHandle"):
        import_tensors({"export_id": "x"})  # type: ignore[arg-type]


def _foreign(handle: SharedTensorsHandle, **owner: object) -> SharedTensorsHandle:
    return dataclasses.replace(handle, owner=dataclasses.replace(handle.owner, **owner))


def test_handle_from_another_machine_or_dead_owner_fails_clearly() -> None:
    handle = export_tensors({"x": torch.zeros(4)})
    try:
        with pytest.raises(SharedMemoryError, match="another machine"):
            import_tensors(_foreign(handle, boot_id="0000-other-boot", hostname="elsewhere"))
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        with pytest.raises(SharedMemoryError, match=f"owner \\(pid {gone.pid}\\).*has exited"):
            import_tensors(_foreign(handle, pid=gone.pid, start_time=1))
    finally:
        release_export(handle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a process without CUDA")
def test_cuda_handle_in_a_process_without_cuda_fails_clearly() -> None:
    handle = export_tensors({"x": torch.zeros(4)})
    try:
        from semipd_memory.sharing import _process_start_time

        parent = OwnerInfo(pid=_parent_pid(), start_time=_process_start_time(_parent_pid()) or 0,
                           boot_id=handle.owner.boot_id, hostname=handle.owner.hostname)
        cuda = dataclasses.replace(handle, device_type="cuda", device_index=0, device_uuid="GPU-1234", owner=parent)
        with pytest.raises(SharedMemoryError, match="no CUDA device"):
            import_tensors(cuda)
    finally:
        release_export(handle)


def _parent_pid() -> int:
    import os

    return os.getppid()


# --- two processes --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker() -> Iterator[ipc.Worker]:
    w = ipc.Worker()
    yield w
    w.close()


SHAPE = dict(num_layers=2, num_pages=16, page_size=4, num_kv_heads=2, head_dim=8)


def test_two_process_kv_pages_written_by_b_read_by_a(worker: ipc.Worker) -> None:
    """B (prefill) writes K/V into pages A (the owner) allocated; A sees exactly those values, only there;
    A frees a request's pages only after B's done message."""
    alloc = PageAllocator(SHAPE["num_pages"], SHAPE["page_size"], max_requests=4, max_pages_per_request=8)
    pool = KVPool(**SHAPE, dtype=torch.float32)
    handle = export_tensors({"kv": pool.buffer})
    assert worker.call("open_kv", handle=handle, shape=SHAPE) == "cpu"
    # A writes after the export: B must see it (shared, not copied)
    pool.k(1)[15] = 3.5
    k, v = worker.call("read_pages", layer=1, pages=[15])
    assert np.all(k == 3.5) and np.all(v == 0)
    pool.k(1)[15] = 0

    slots = {rid: alloc.alloc(n) for rid, n in ((1, 3), (2, 2), (3, 4))}
    assert None not in slots.values()
    pages = {rid: alloc.pages(s) for rid, s in slots.items()}  # type: ignore[arg-type]
    # request 2 is aborted while B writes: its pages are parked, not freed, until B says done
    alloc.free_deferred(slots[2], "prefill")  # type: ignore[arg-type]
    used_in_flight = alloc.num_used_pages
    grab = alloc.alloc(alloc.num_free_pages)  # everything A can still hand out
    assert grab is not None and not set(alloc.pages(grab)) & {p for ps in pages.values() for p in ps}
    alloc.free(grab)
    for rid in (1, 2, 3):
        assert worker.call("write_pages", rid=rid, pages=pages[rid]) == rid  # the "done" message
        if rid == 2:
            assert alloc.num_used_pages == used_in_flight  # nothing was freed before done
            alloc.writer_done("prefill")
        alloc.check_integrity()

    page_shape = (SHAPE["page_size"], SHAPE["num_kv_heads"], SHAPE["head_dim"])
    written = torch.zeros(SHAPE["num_pages"], dtype=torch.bool)
    for rid in (1, 3):
        idx = torch.tensor(pages[rid])
        written[idx] = True
        for layer in range(SHAPE["num_layers"]):
            want_k, want_v = ipc.kv_values(rid, len(pages[rid]), page_shape, layer)
            assert torch.equal(pool.k(layer)[idx], want_k) and torch.equal(pool.v(layer)[idx], want_v)
    written[torch.tensor(pages[2])] = True  # written too, but its request was aborted: values don't matter
    untouched = pool.buffer[:, :, ~written]
    assert untouched.numel() > 0 and bool((untouched == 0).all()), "B wrote outside the pages it was given"

    for rid in (1, 3):
        alloc.free(slots[rid])  # type: ignore[arg-type]
    alloc.check_integrity()
    assert alloc.num_free_pages == alloc.num_pages
    release_export(handle)


def test_two_process_weights_same_logits_and_shared(worker: ipc.Worker) -> None:
    torch.manual_seed(0)
    model = ipc.tiny_lm().eval()
    weights = SharedModelWeights(model)
    # the tied head is one storage: TinyLM's weights are embed + 2 blocks + 2 buffers
    assert weights.nbytes == sum(t.untyped_storage().nbytes() for t in
                                 {t.untyped_storage().data_ptr(): t for t in weights.tensors.values()}.values())
    assert worker.call("load_module", handle=weights.handle, factory=ipc.tiny_lm) == 0
    ids = [[1, 5, 9, 63], [0, 2, 4, 8]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).numpy()
        got = worker.call("forward", ids=ids)
        assert np.array_equal(got, want)
        model.blocks[0][0].weight.mul_(2.0)  # in place in the owner: the importer computes with it at once
        model.embed.weight[5] = 1.0  # tied: changes the head as well
        want2 = model(torch.tensor(ids)).numpy()
    assert not np.allclose(want2, want)
    assert np.array_equal(worker.call("forward", ids=ids), want2)
    weights.close()


def test_importer_maps_a_handle_once_and_sees_later_writes(worker: ipc.Worker) -> None:
    a = torch.zeros(1000, dtype=torch.float64)
    b = torch.full((7, 3), 2.0)
    handle = export_tensors({"a": a, "a_tail": a[900:], "b": b})
    a += 1.5  # after the export, in place
    b[0] = 5.0
    first = worker.call("import", handle=handle)
    assert first["shared"] and first["sums"] == {"a": 1500.0, "a_tail": 150.0, "b": 2.0 * 18 + 15.0}
    assert first["ptrs"]["a_tail"] == first["ptrs"]["a"] + 900 * 8  # one mapping, views keep their offsets
    a[:] = 0
    second = worker.call("import", handle=handle)
    assert second["ptrs"] == first["ptrs"] and second["sums"]["a"] == 0.0
    release_export(handle)


@pytest.mark.slow  # real owner and importer processes, waiting out the owner's death
def test_import_after_owner_died_fails_clearly() -> None:
    owner = ipc.Worker()
    try:
        handle = owner.call("export", numel=1000, device="cpu")
        got = import_tensors(handle)  # alive: fine, and really shared
        assert torch.equal(got["x"], torch.arange(1000, dtype=torch.float32)) and got["x"].is_shared()
        del got
        owner.kill()
        with pytest.raises(SharedMemoryError, match=f"owner \\(pid {handle.owner.pid}\\).*has exited"):
            import_tensors(handle)
    finally:
        owner.close()
