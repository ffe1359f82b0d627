"""SM partition backends: how the prefill and decode roles are confined to their share of the GPU's SMs.

| backend | roles run as | confinement |
|---|---|---|
| `green` | threads of one process | disjoint SM groups (driver API, below), entered as torch ExternalStreams |
| `mps`   | processes | MPS daemon + CUDA_MPS_ACTIVE_THREAD_PERCENTAGE per process (a cap, not a disjoint set) |
| `none`  | processes (or threads on CPU) | none: time-sliced by the driver |

Green contexts: cuDevSmResourceSplitByCount -> cuDevResourceGenerateDesc -> cuGreenCtxCreate ->
cuGreenCtxStreamCreate. torch's own `GreenContext.create` carves each context from the whole device (the two
overlap), so it is not used.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


class SmPartition:
    """Base: no confinement. `role_context(role)` is entered by the thread running that role.

    The class also says where the roles run and what moves: `prefill_placement` (thread or process),
    `core_process_env` (the decode role's environment when it is a process of its own), and
    `decode_share_moves` (False: a new split can move only the prefill share)."""

    kind = "none"
    placement: str | None = None  # forced placement of the prefill role ("thread" / "process"), None: a choice
    decode_share_moves = True
    needs_core_process = False  # the decode role (the engine core) must be a process started with its env

    @classmethod
    def prefill_placement(cls, requested: str) -> str:
        return cls.placement or requested

    @classmethod
    def check_available(cls) -> None:
        """Raise with instructions when this backend cannot run here (checked before anything starts)."""

    @classmethod
    def core_process_env(cls, decode_percent: float) -> dict[str, str]:
        """Environment the engine core process (the decode role) must start with."""
        return {}

    def __init__(self, prefill_percent: float, decode_percent: float, device_index: int = 0) -> None:
        for name, v in (("prefill_sm_percent", prefill_percent), ("decode_sm_percent", decode_percent)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 100:
                raise ValueError(f"{name} must be a number in [1, 100], got {v!r}")
        self.percent = {"prefill": prefill_percent, "decode": decode_percent}
        self.sm_count = {"prefill": 0, "decode": 0}

    @property
    def split(self) -> tuple[float, float]:
        return (float(self.percent["prefill"]), float(self.percent["decode"]))

    def resplit(self, prefill_percent: float, decode_percent: float) -> SmPartition:
        """A new partition of the same kind at another split; this one stays valid until closed (the roles
        leave it between steps, then the caller closes it)."""
        return type(self)(prefill_percent, decode_percent)

    def role_context_factory(self, role: str) -> Callable[[], AbstractContextManager[Any]]:
        return nullcontext

    def stream_key(self, role: str) -> int | None:
        """The CUDA stream `role` runs on in this partition (its handle), None when it is the process's own."""
        return None

    def process_env(self, role: str) -> dict[str, str]:
        """Environment a process running `role` must start with."""
        return {}

    @property
    def keeps_streams(self) -> bool:
        """True when close() leaves this split's streams alive (state keyed by them stays valid)."""
        return False

    def close(self) -> None:
        pass

    def close_all(self) -> None:
        """Free everything this partition and the splits built from it hold (engine shutdown)."""
        self.close()


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """os.environ updated for the block (a spawned process copies it: MPS reads its percentage at CUDA init)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _device_sm_count() -> int:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 0


class MpsPartition(SmPartition):
    kind = "mps"
    placement = "process"  # every role is a process started with its SM percentage
    decode_share_moves = False  # the decode process's cap was read at its CUDA init
    needs_core_process = True

    @classmethod
    def check_available(cls) -> None:
        check_mps_daemon()

    @classmethod
    def core_process_env(cls, decode_percent: float) -> dict[str, str]:
        return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(max(1, round(decode_percent)))}

    def __init__(self, prefill_percent: float, decode_percent: float, device_index: int = 0,
                 check_daemon: bool = True) -> None:
        super().__init__(prefill_percent, decode_percent)
        if check_daemon:
            check_mps_daemon()
        total = _device_sm_count()
        own = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
        if own:  # this process is itself capped: the device reports only its share of the SMs
            total = round(total * 100 / float(own))
        self.sm_count = {r: round(total * self.percent[r] / 100) for r in ROLES}  # a cap, as MPS applies it

    def resplit(self, prefill_percent: float, decode_percent: float) -> SmPartition:
        # the decode worker's cap was read at its CUDA init and cannot move: only a new prefill process (started
        # with the new percentage) changes anything, so the decode side keeps its percentage
        if decode_percent != self.percent["decode"]:
            log.info("mps: decode keeps its start cap %s%% (asked %s%%); only the prefill cap moves",
                     self.percent["decode"], decode_percent)
        return MpsPartition(prefill_percent, self.percent["decode"], check_daemon=False)

    def process_env(self, role: str) -> dict[str, str]:
        return self.core_process_env(self.percent[role])


def check_mps_daemon() -> None:
    """Raise with instructions if no MPS control daemon answers."""
    ctl = shutil.which("nvidia-cuda-mps-control")
    hint = ("start it with `nvidia-cuda-mps-control -d` (as root; stop with `echo quit | nvidia-cuda-mps-control`)"
            " or use --sm-partition green")
    if ctl is None:
        raise RuntimeError(f"--sm-partition mps needs the MPS control daemon, but nvidia-cuda-mps-control is not "
                           f"installed; {hint}")
    try:
        r = subprocess.run([ctl], input="get_default_active_thread_percentage\n", capture_output=True, text=True,
                           timeout=5)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"the MPS control daemon does not answer; {hint}") from e
    if r.returncode != 0:
        raise RuntimeError(f"the MPS control daemon is not running ({r.stderr.strip() or r.stdout.strip()}); {hint}")


class GreenPartition(SmPartition):
    """Two disjoint SM groups of one device, each with its own stream; the roles are threads."""

    kind = "green"
    placement = "thread"  # green contexts isolate only inside one process

    def __init__(self, prefill_percent: float, decode_percent: float, device_index: int = 0,
                 family: dict[int, GreenPartition] | None = None) -> None:
        super().__init__(prefill_percent, decode_percent)
        self._device_index = device_index
        # every split built from this one, by decode SMs asked: a split the policy returns to reuses its
        # contexts, streams and so the CUDA graphs captured on them (no re-capture stall on the way back)
        self._family: dict[int, GreenPartition] = {} if family is None else family
        import torch
        from cuda.bindings import driver as cu  # shipped with torch's CUDA wheels

        self._cu = cu
        torch.cuda.init()
        torch.zeros(1, device=f"cuda:{device_index}")  # make torch's primary context current first
        self._dev = self._ok(cu.cuDeviceGet(device_index))
        full = self._ok(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        total = full.sm.smCount
        self._total = total
        want_decode = self._decode_sms_asked(decode_percent)
        groups, _, rest = self._ok(cu.cuDevSmResourceSplitByCount(1, full, 0, want_decode))
        self._contexts: list[Any] = []
        self._streams: dict[str, Any] = {}
        for role, res in (("decode", groups[0]), ("prefill", rest)):
            desc = self._ok(cu.cuDevResourceGenerateDesc([res], 1))
            ctx = self._ok(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            stream = self._ok(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            self._contexts.append(ctx)
            self._streams[role] = torch.cuda.ExternalStream(int(stream))
            self.sm_count[role] = int(res.sm.smCount)
        self._family.setdefault(want_decode, self)
        if prefill_percent + decode_percent < 100:
            log.info("green partition: prefill takes every SM decode does not (%d)", self.sm_count["prefill"])
        log.info("green partition granted: decode %d SMs, prefill %d SMs (of %d)",
                 self.sm_count["decode"], self.sm_count["prefill"], total)

    def _ok(self, r: Any) -> Any:
        err, *rest = r if isinstance(r, tuple) else (r,)
        if err != self._cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    def role_context_factory(self, role: str) -> Callable[[], AbstractContextManager[Any]]:
        import torch

        from semipd_kernels import sm_budget

        stream, sms = self._streams[role], self.sm_count[role] or None

        @contextmanager
        def enter() -> Iterator[None]:
            # kernels that size their grid by SM count plan for this partition's SMs, not the device's
            with torch.cuda.stream(stream), sm_budget(sms):
                yield

        return enter

    def stream_key(self, role: str) -> int | None:
        return int(self._streams[role].cuda_stream)

    def _decode_sms_asked(self, decode_percent: float) -> int:
        return max(1, round(self._total * decode_percent / 100))

    def resplit(self, prefill_percent: float, decode_percent: float) -> SmPartition:
        # new contexts carved from the whole device again: while the old pair drains they overlap it briefly
        cached = self._family.get(self._decode_sms_asked(decode_percent))
        if cached is not None:
            cached.percent = {"prefill": prefill_percent, "decode": decode_percent}
            return cached
        return GreenPartition(prefill_percent, decode_percent, self._device_index, self._family)  # joins it

    @property
    def keeps_streams(self) -> bool:
        """close() leaves the contexts alive (kept for a later return to this split)."""
        return True

    def close(self) -> None:
        """A generation is done with this split: its contexts stay for a later return (close_all frees them)."""

    def close_all(self) -> None:
        for part in {id(p): p for p in (*self._family.values(), self)}.values():
            part._destroy()
        self._family.clear()

    def _destroy(self) -> None:
        # The contexts are retired, not destroyed: a tensor last used on one of their streams records an event
        # on that stream when it is freed, and after cuGreenCtxDestroy that aborts the process ("context is
        # destroyed", seen at interpreter exit after core.close() on the H200). Tensors outlive close() in
        # ways no one controls (a caller's reference, garbage collection), so the driver frees the contexts
        # at process exit instead; they are SM views of the primary context and hold no memory of their own.
        for stream in self._streams.values():
            stream.synchronize()  # work still queued on a context finishes before it is let go
        _RETIRED.append((self._contexts[:], list(self._streams.values())))
        self._contexts.clear()
        self._streams.clear()


_RETIRED: list[tuple[list[object], list[object]]] = []  # closed green contexts and streams, kept to process exit


PARTITIONS: dict[str, type[SmPartition]] = {"none": SmPartition, "green": GreenPartition, "mps": MpsPartition}


def partition_class(kind: str) -> type[SmPartition]:
    try:
        return PARTITIONS[kind]
    except KeyError:
        raise ValueError(f"sm_partition must be one of {', '.join(PARTITIONS)}; got {kind!r}") from None


def create_partition(kind: str, prefill_percent: float, decode_percent: float,
                     device_index: int = 0) -> SmPartition:
    """device_index: the GPU whose SMs are split (a tensor-parallel rank's own)."""
    return partition_class(kind)(prefill_percent, decode_percent, device_index=device_index)
