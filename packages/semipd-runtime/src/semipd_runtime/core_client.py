"""Run an EngineCore next to the front end: in a thread (offline use) or in its own process over ZMQ (server).

Both speak the typed messages of `messages.py`; outputs reach the front end through `on_output`, called from a
background thread of the front end."""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable

import zmq

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    CoreFailure,
    CoreReady,
    FromCore,
    Repartition,
    RoomRejected,
    Shutdown,
    StatsRequest,
    StepOutput,
    ToCore,
)
from semipd_runtime.partition import environment
from semipd_runtime.zmq_channel import ChannelAddrs, ZmqChannel, ignore_terminal_interrupt, parent_alive

log = logging.getLogger(__name__)


OutputCallback = Callable[[FromCore], None]


def core_loop(core: EngineCore, get: Callable[[float | None], list[ToCore]], emit: OutputCallback) -> None:
    """Drain control messages, step while there is work, report every step; block when idle. get(timeout_s):
    0 = only what is queued, None = wait as long as the channel waits."""
    idle_reported = False
    while True:
        idle = not (core.has_work() or core.pending)
        # a PD prefill's network thread cannot wake an idle core: look at what it received every 50 ms
        for msg in get((0.05 if core.kv_sender is not None else None) if idle else 0.0):
            if isinstance(msg, AddRequest):
                core.add_request(msg)
            elif isinstance(msg, AbortRequest):
                core.abort(msg.rid, msg.reason)
            elif isinstance(msg, RoomRejected):
                if core.kv_sender is not None:
                    for room in msg.rooms:
                        core.kv_sender.reject(room, msg.error)
            elif isinstance(msg, StatsRequest):
                if msg.flush_cache:
                    core.cache.evict(core.cache.num_evictable_pages)
                emit(StepOutput([], core.stats()))
            elif isinstance(msg, Repartition):
                core.repartition(msg.prefill_percent, msg.decode_percent)  # no-op without an SM split
            elif isinstance(msg, Shutdown):
                core.close()
                return
        if core.has_work() or core.pending:
            events = core.step()
            emit(StepOutput(events, core.stats()))
            idle_reported = False
        elif not idle_reported:
            stats = core.stats()
            try:  # cheap, catches leaks early: when idle every page is free or cached-evictable
                with core.decode_context():  # reads the page table on the stream that wrote it
                    core.allocator.check_integrity()  # covers the radix cache's tree and refcounts too
                if core.allocator.num_used_pages:
                    stats.integrity_error = f"{core.allocator.num_used_pages} pages held while idle"
            except AssertionError as e:
                stats.integrity_error = str(e) or "integrity check failed"
            if stats.integrity_error:
                log.error("allocator integrity: %s", stats.integrity_error)
            emit(StepOutput([], stats))
            idle_reported = True


class ThreadCoreClient:
    """The core runs in a daemon thread of this process."""

    def __init__(self, cfg: EngineConfig, on_output: OutputCallback) -> None:
        self.inbox: queue.Queue[ToCore] = queue.Queue()
        self.on_output = on_output
        self.core = create_core(cfg)
        self.alive = True
        on_output(CoreReady(self.core.stats(), cfg.scheduler.page_size, cfg.max_model_len))
        self.thread = threading.Thread(target=self._run, name="semipd-core", daemon=True)
        self.thread.start()

    def _get(self, timeout_s: float | None) -> list[ToCore]:
        msgs: list[ToCore] = []
        try:
            msgs.append(self.inbox.get(timeout=timeout_s or 0.5) if timeout_s != 0 else self.inbox.get_nowait())
            while True:
                msgs.append(self.inbox.get_nowait())
        except queue.Empty:
            return msgs

    def _run(self) -> None:
        try:
            core_loop(self.core, self._get, self.on_output)
        except Exception as e:  # surfaced to every waiting request as EngineDeadError
            log.exception("engine core failed")
            self.on_output(CoreFailure(f"engine core failed: {e!r}"))
        finally:
            self.alive = False

    def send(self, msg: ToCore) -> None:
        self.inbox.put(msg)

    def close(self) -> None:
        if self.alive:
            self.inbox.put(Shutdown())
            self.thread.join(timeout=10)


def run_core_process(cfg: EngineConfig, addrs: ChannelAddrs, log_level: int) -> None:
    """Entry point of the core process: load, report ready, serve until Shutdown or the parent is gone."""
    ignore_terminal_interrupt()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s core %(name)s: %(message)s")
    chan: ZmqChannel[FromCore, ToCore] = ZmqChannel.connect(addrs, ToCore, peer_alive=parent_alive())

    def emit(msg: FromCore) -> None:
        chan.send(msg)  # dropped once the front end is gone: get() then tells the loop to stop

    def get(timeout_s: float | None) -> list[ToCore]:
        msgs = chan.recv_all(timeout_s)
        if not msgs and not chan.peer_alive():  # orphaned: the front end died without telling us
            return [Shutdown()]
        return msgs

    try:
        core = create_core(cfg)
        emit(CoreReady(core.stats(), cfg.scheduler.page_size, cfg.max_model_len))
        core_loop(core, get, emit)
    except Exception as e:
        log.exception("engine core failed")
        emit(CoreFailure(f"engine core failed: {e!r}"))
    finally:
        chan.close(linger_s=1.0)


class ProcessCoreClient:
    """The core runs in a child process; a reader thread here receives its outputs and watches it live."""

    def __init__(self, cfg: EngineConfig, on_output: OutputCallback, startup_timeout_s: float = 600.0,
                 env: dict[str, str] | None = None) -> None:
        self.on_output = on_output
        self.chan: ZmqChannel[ToCore, FromCore] = ZmqChannel.bind(FromCore, prefix="semipd")
        self.proc = mp.get_context("spawn").Process(
            target=run_core_process,
            args=(cfg, self.chan.addrs, logging.getLogger().getEffectiveLevel()),
            name="semipd-core",
            daemon=False,  # it starts its own child (the semi-PD prefill worker); it exits when we do (ppid watch)
        )
        self.chan.peer_alive = self.proc.is_alive
        with environment(env or {}):  # spawn copies os.environ: MPS reads its percentage at CUDA init
            self.proc.start()
        self.alive = True
        self._closing = False
        atexit.register(self.close)
        first = self._wait_first(startup_timeout_s)
        on_output(first)
        if isinstance(first, CoreFailure):
            self.alive = False
            raise RuntimeError(first.message)
        self.reader = threading.Thread(target=self._read, name="semipd-core-reader", daemon=True)
        self.reader.start()

    def _wait_first(self, timeout_s: float) -> FromCore:
        first = self.chan.recv(timeout_s)
        if first is not None:
            return first
        if not self.proc.is_alive():
            return CoreFailure(f"engine core process exited with code {self.proc.exitcode} during startup")
        return CoreFailure(f"engine core process did not start within {timeout_s:.0f}s")

    def _read(self) -> None:
        while True:
            msg = self.chan.recv()  # None only once the core process is gone and everything it sent is read
            if msg is None:
                if not self._closing:
                    self.on_output(CoreFailure(f"engine core process died (exit code {self.proc.exitcode})"))
                break
            self.on_output(msg)
            if isinstance(msg, CoreFailure):
                break
        self.alive = False

    def send(self, msg: ToCore) -> None:
        self.chan.send(msg)  # dropped if the core is dead: the reader thread reports that to every request

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        if hasattr(self, "reader"):
            self.reader.join(timeout=2)
        self.chan.close()
        self.alive = False
