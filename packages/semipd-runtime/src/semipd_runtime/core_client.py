"""Run an EngineCore next to the front end: in a thread (offline use) or in its own process over ZMQ (server).

Both speak the typed messages of `messages.py`; outputs reach the front end through `on_output`, called from a
background thread of the front end."""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from semipd_runtime.config import EngineConfig
from semipd_runtime.core import EngineCore
from semipd_runtime.core_factory import create_core
from semipd_runtime.partition import environment
from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    CoreFailure,
    CoreReady,
    FromCore,
    Repartition,
    Shutdown,
    StatsRequest,
    StepOutput,
    ToCore,
)

log = logging.getLogger(__name__)


OutputCallback = Callable[[FromCore], None]


def core_loop(core: EngineCore, get: Callable[[bool], list[ToCore]], emit: OutputCallback) -> None:
    """Drain control messages, step while there is work, report every step; block when idle."""
    idle_reported = False
    while True:
        for msg in get(not (core.has_work() or core.pending)):
            if isinstance(msg, AddRequest):
                core.add_request(msg)
            elif isinstance(msg, AbortRequest):
                core.abort(msg.rid, msg.reason)
            elif isinstance(msg, StatsRequest):
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

    def _get(self, block: bool) -> list[ToCore]:
        msgs: list[ToCore] = []
        try:
            msgs.append(self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait())
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


def run_core_process(cfg: EngineConfig, in_addr: str, out_addr: str, log_level: int) -> None:
    """Entry point of the core process: load, report ready, serve until Shutdown or the parent is gone."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s core %(name)s: %(message)s")
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(in_addr)
    push.connect(out_addr)
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
    parent = os.getppid()

    def emit(msg: FromCore) -> None:
        push.send(enc.encode(msg))

    def get(block: bool) -> list[ToCore]:
        msgs: list[ToCore] = []
        while not msgs:
            if pull.poll(200 if block else 0):
                while True:
                    try:
                        msgs.append(dec.decode(pull.recv(zmq.NOBLOCK)))
                    except zmq.Again:
                        break
            if os.getppid() != parent:  # orphaned: the front end died without telling us
                return [Shutdown()]
            if not block:
                break
        return msgs

    try:
        core = create_core(cfg)
        emit(CoreReady(core.stats(), cfg.scheduler.page_size, cfg.max_model_len))
        core_loop(core, get, emit)
    except Exception as e:
        log.exception("engine core failed")
        emit(CoreFailure(f"engine core failed: {e!r}"))
    finally:
        push.close(linger=1000)
        pull.close(linger=0)
        ctx.term()


class ProcessCoreClient:
    """The core runs in a child process; a reader thread here receives its outputs and watches it live."""

    def __init__(self, cfg: EngineConfig, on_output: OutputCallback, startup_timeout_s: float = 600.0,
                 env: dict[str, str] | None = None) -> None:
        self.on_output = on_output
        self._dir = tempfile.TemporaryDirectory(prefix="semipd-")
        in_addr, out_addr = f"ipc://{self._dir.name}/in", f"ipc://{self._dir.name}/out"
        self.ctx = zmq.Context()
        self.push, self.pull = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.bind(in_addr)
        self.pull.bind(out_addr)
        self._send_lock = threading.Lock()
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        self.proc = mp.get_context("spawn").Process(
            target=run_core_process,
            args=(cfg, in_addr, out_addr, logging.getLogger().getEffectiveLevel()),
            name="semipd-core",
            daemon=False,  # it starts its own child (the semi-PD prefill worker); it exits when we do (ppid watch)
        )
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
        waited = 0.0
        while waited < timeout_s:
            if self.pull.poll(200):
                return self.dec.decode(self.pull.recv())
            waited += 0.2
            if not self.proc.is_alive():
                return CoreFailure(f"engine core process exited with code {self.proc.exitcode} during startup")
        return CoreFailure(f"engine core process did not start within {timeout_s:.0f}s")

    def _read(self) -> None:
        while True:
            if self.pull.poll(100):
                msg = self.dec.decode(self.pull.recv())
                self.on_output(msg)
                if isinstance(msg, CoreFailure):
                    break
                continue
            if not self.proc.is_alive():
                if not self._closing:
                    self.on_output(CoreFailure(f"engine core process died (exit code {self.proc.exitcode})"))
                break
        self.alive = False

    def send(self, msg: ToCore) -> None:
        data = self.enc.encode(msg)
        with self._send_lock:
            while True:  # a PUSH socket blocks while its peer is gone: never hang on a dead core
                try:
                    self.push.send(data, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    if not self.proc.is_alive():
                        return  # the reader thread reports the death to every waiting request
                    time.sleep(0.001)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        atexit.unregister(self.close)
        if self.proc.is_alive():
            try:
                self.send(Shutdown())
            except zmq.ZMQError:
                pass
            self.proc.join(timeout=10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout=5)
        if hasattr(self, "reader"):
            self.reader.join(timeout=2)
        self.push.close(linger=0)
        self.pull.close(linger=0)
        self.ctx.term()
        self._dir.cleanup()
        self.alive = False
