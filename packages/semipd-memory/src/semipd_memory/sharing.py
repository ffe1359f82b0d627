"""Share named tensors with another process without copying them.

`export_tensors({name: tensor})` returns a `SharedTensorsHandle`: plain frozen dataclasses of ints, strings and
bytes, so it can be pickled (multiprocessing spawn args) or encoded with msgspec (ZMQ messages).
`import_tensors(handle)` in another process returns tensors over the *same* memory: writes on either side are seen
by the other.

- CUDA: torch's CUDA IPC (`UntypedStorage._share_cuda_` / `_new_shared_cuda`, what torch.multiprocessing uses).
  IPC works on whole cudaMalloc blocks, and the caching allocator packs several storages into one block, so each
  storage travels as (block handle, byte offset of the storage in the block, size); torch caches the opened block
  per process, so storages that share a block map it once.
- CPU: torch's file-system shared memory (`_share_filename_cpu_`): the storage's bytes move into a /dev/shm file
  *in place* (the owner's tensors, parameters and views keep working and now live in shared memory) and the
  importer maps that file.

The owner keeps every exported tensor alive (a module-level registry) until `release_export(handle)`: CUDA IPC
memory must stay allocated in the exporting process for as long as importers use it. The handle records the owner
(pid, process start time, boot id) and the device UUID, so that opening it after the owner died, on another
machine, or in a process that cannot see that GPU fails with a clear `SharedMemoryError` instead of a crash.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


class SharedMemoryError(RuntimeError):
    """A handle that cannot be opened here (owner gone, other machine, device not visible, mapping failed)."""


@dataclass(frozen=True)
class OwnerInfo:
    pid: int
    start_time: int  # process start time in clock ticks since boot (tells a reused pid apart); 0 if unknown
    boot_id: str  # tells another machine (or a reboot) apart
    hostname: str


@dataclass(frozen=True)
class SharedStorage:
    nbytes: int
    # CPU: torch's shared-memory file and the socket of the torch_shm_manager that tracks it
    shm_manager: bytes = b""
    shm_filename: bytes = b""
    # CUDA: IPC handle of the whole cudaMalloc block and where this storage starts inside it
    cuda_ipc_handle: bytes = b""
    cuda_offset_bytes: int = 0
    cuda_ref_counter_handle: bytes = b""
    cuda_ref_counter_offset: int = 0
    cuda_event_handle: bytes = b""  # empty: no event to wait on
    cuda_event_sync_required: bool = False


@dataclass(frozen=True)
class SharedTensor:
    name: str
    storage: int  # index into SharedTensorsHandle.storages; -1 for a tensor with no bytes
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset, in elements


@dataclass(frozen=True)
class SharedTensorsHandle:
    export_id: str
    device_type: str  # "cpu" or "cuda"
    device_index: int  # the owner's index (-1 on CPU); importers find the GPU by uuid, not by index
    device_uuid: str
    owner: OwnerInfo
    storages: tuple[SharedStorage, ...]
    tensors: tuple[SharedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.storages)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


# export_id -> the exported tensors: keeps the owner's memory alive while importers may use it
_EXPORTS: dict[str, dict[str, Tensor]] = {}
# export_id -> storages this (importing) process opened: a second import of one handle maps nothing new (CUDA IPC
# allows one mapping of a block per process, and its ref counter must be released once per export)
_IMPORTED: dict[str, list[torch.UntypedStorage]] = {}


def export_tensors(tensors: Mapping[str, Tensor]) -> SharedTensorsHandle:
    """Share `tensors` (all on one device) with other processes; returns plain-data handle. Nothing is copied on
    CUDA; on CPU each storage moves once into shared memory, in place."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> Tensor, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError("tensors is empty: nothing to export")
    device: torch.device | None = None
    first = ""
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{name!r}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_nested:
            raise ValueError(f"tensors[{name!r}] must be a dense strided tensor, got layout {t.layout}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"tensors[{name!r}] is on {t.device}; only cpu and cuda tensors can be shared")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(
                f"tensors[{name!r}] is on {t.device} but tensors[{first!r}] is on {device}; export each device "
                "separately"
            )
    assert device is not None
    storages: list[SharedStorage] = []
    # one entry per storage (tied weights, views share it); keyed by the StorageImpl, whose data_ptr changes when
    # a CPU storage moves into shared memory
    storage_index: dict[int, int] = {}
    entries: list[SharedTensor] = []
    for name, t in tensors.items():
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            index = -1
        else:
            key = storage._cdata
            if key not in storage_index:
                storage_index[key] = len(storages)
                storages.append(_share_cuda(storage) if device.type == "cuda" else _share_cpu(storage))
            index = storage_index[key]
        entries.append(SharedTensor(name, index, _dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()),
                                    int(t.storage_offset())))
    handle = SharedTensorsHandle(
        export_id=uuid.uuid4().hex,
        device_type=device.type,
        device_index=-1 if device.type == "cpu" else _cuda_index(device),
        device_uuid=_cuda_uuid(_cuda_index(device)) if device.type == "cuda" else "",
        owner=_this_owner(),
        storages=tuple(storages),
        tensors=tuple(entries),
    )
    _EXPORTS[handle.export_id] = {name: t.detach() for name, t in tensors.items()}
    return handle


def import_tensors(handle: SharedTensorsHandle) -> dict[str, Tensor]:
    """Map the tensors of `handle` into this process (same memory as the owner's). In the owner process itself
    the original tensors are returned."""
    if not isinstance(handle, SharedTensorsHandle):
        raise TypeError(f"handle must be a SharedTensorsHandle, got {type(handle).__name__}")
    here = _this_owner()
    if handle.owner.boot_id != here.boot_id:
        raise SharedMemoryError(
            f"handle {handle.export_id[:8]} was exported on another machine or boot "
            f"({handle.owner.hostname}, boot {handle.owner.boot_id[:8]}); shared memory is per machine"
        )
    if handle.owner.pid == here.pid and handle.owner.start_time == here.start_time:
        if handle.export_id not in _EXPORTS:
            raise SharedMemoryError(f"handle {handle.export_id[:8]} was released by this (owner) process")
        return dict(_EXPORTS[handle.export_id])
    _check_owner_alive(handle)
    if handle.device_type == "cuda":
        device = torch.device("cuda", _local_cuda_index(handle))
        opened = _IMPORTED.get(handle.export_id) or [_open_cuda(s, device.index, handle) for s in handle.storages]
    elif handle.device_type == "cpu":
        device = torch.device("cpu")
        opened = _IMPORTED.get(handle.export_id) or [_open_cpu(s, handle) for s in handle.storages]
    else:
        raise SharedMemoryError(f"handle has unknown device_type {handle.device_type!r}")
    _IMPORTED[handle.export_id] = opened
    out: dict[str, Tensor] = {}
    for entry in handle.tensors:
        dtype = _dtype(entry.dtype)
        t = torch.empty(0, dtype=dtype, device=device)
        if entry.storage >= 0:
            t.set_(opened[entry.storage], entry.offset, entry.shape, entry.stride)
        else:
            t = torch.empty_strided(entry.shape, entry.stride, dtype=dtype, device=device)
        out[entry.name] = t
    return out


def release_export(handle: SharedTensorsHandle) -> None:
    """Owner side: stop keeping the exported tensors alive (only once no importer uses them any more)."""
    if _EXPORTS.pop(handle.export_id, None) is None:
        raise ValueError(f"handle {handle.export_id[:8]} is not a live export of this process")


def release_import(handle: SharedTensorsHandle) -> None:
    """Importer side: forget the mapping of `handle` (it goes away once the tensors built on it are gone)."""
    _IMPORTED.pop(handle.export_id, None)


def live_exports() -> int:
    """How many exports this process keeps alive."""
    return len(_EXPORTS)


# Short names used in the design notes.
export = export_tensors
import_ = import_tensors


# --- CUDA -----------------------------------------------------------------------------------------------------
def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _cuda_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def _share_cuda(storage: torch.UntypedStorage) -> SharedStorage:
    (_device, ipc_handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = storage._share_cuda_()
    return SharedStorage(
        nbytes=int(size_bytes), cuda_ipc_handle=bytes(ipc_handle), cuda_offset_bytes=int(offset_bytes),
        cuda_ref_counter_handle=bytes(ref_handle), cuda_ref_counter_offset=int(ref_offset),
        cuda_event_handle=bytes(event_handle) if event_handle else b"", cuda_event_sync_required=bool(event_sync),
    )


def _local_cuda_index(handle: SharedTensorsHandle) -> int:
    if not torch.cuda.is_available():
        raise SharedMemoryError(
            f"handle {handle.export_id[:8]} holds CUDA memory (GPU {handle.device_uuid}) but this process has no "
            "CUDA device"
        )
    for index in range(torch.cuda.device_count()):
        if _cuda_uuid(index) == handle.device_uuid:
            return index
    raise SharedMemoryError(
        f"handle {handle.export_id[:8]} lives on GPU {handle.device_uuid} (cuda:{handle.device_index} in the owner), "
        f"which this process cannot see (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
    )


def _open_cuda(s: SharedStorage, index: int, handle: SharedTensorsHandle) -> torch.UntypedStorage:
    torch.cuda.init()
    try:
        return torch.UntypedStorage._new_shared_cuda(
            index, s.cuda_ipc_handle, s.nbytes, s.cuda_offset_bytes, s.cuda_ref_counter_handle,
            s.cuda_ref_counter_offset, s.cuda_event_handle or None, s.cuda_event_sync_required,
        )
    except RuntimeError as e:
        raise SharedMemoryError(
            f"cannot map CUDA IPC memory of handle {handle.export_id[:8]} (owner pid {handle.owner.pid}): {e}"
        ) from e


# --- CPU ------------------------------------------------------------------------------------------------------
def _share_cpu(storage: torch.UntypedStorage) -> SharedStorage:
    manager, filename, size = storage._share_filename_cpu_()
    return SharedStorage(nbytes=int(size), shm_manager=bytes(manager), shm_filename=bytes(filename))


def _open_cpu(s: SharedStorage, handle: SharedTensorsHandle) -> torch.UntypedStorage:
    try:
        return torch.UntypedStorage._new_shared_filename_cpu(s.shm_manager, s.shm_filename, s.nbytes)
    except RuntimeError as e:
        raise SharedMemoryError(
            f"cannot map shared memory {s.shm_filename.decode(errors='replace')} of handle "
            f"{handle.export_id[:8]} (owner pid {handle.owner.pid}): {e}"
        ) from e


# --- owner identity -------------------------------------------------------------------------------------------
def _process_start_time(pid: int) -> int | None:
    """Start time of `pid` (clock ticks since boot) or None when no such process runs (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return 0
    # the command name may contain spaces and parentheses: fields start after the last ")"
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # exited, not yet reaped: its memory is already gone
        return None
    return int(fields[19])


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _this_owner() -> OwnerInfo:
    pid = os.getpid()
    return OwnerInfo(pid=pid, start_time=_process_start_time(pid) or 0, boot_id=_boot_id(),
                     hostname=socket.gethostname())


def _check_owner_alive(handle: SharedTensorsHandle) -> None:
    owner = handle.owner
    if os.path.isdir("/proc/self"):
        start = _process_start_time(owner.pid)
        alive = start is not None and (owner.start_time == 0 or start in (0, owner.start_time))
    else:
        try:
            os.kill(owner.pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    if not alive:
        raise SharedMemoryError(
            f"the owner (pid {owner.pid}) of handle {handle.export_id[:8]} has exited; its shared "
            f"{handle.device_type} memory is gone"
        )


# --- dtypes ---------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SharedMemoryError(f"handle names an unknown dtype {name!r}")
    return dtype


def handle_to_dict(handle: SharedTensorsHandle) -> dict:
    """The handle as nested plain dicts (e.g. for logging)."""
    return dataclasses.asdict(handle)
