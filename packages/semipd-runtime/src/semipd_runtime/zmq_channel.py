"""ZmqChannel: the one typed message pipe across a process boundary (engine front end <-> core process, decode
worker <-> prefill process).

A channel is a PUSH/PULL socket pair carrying msgspec msgpack. The parent binds (`ZmqChannel.bind`) and hands
`addrs` to the child it spawns, which connects (`ZmqChannel.connect`). Each end decodes exactly the union of
messages it is declared to receive. No call blocks on a dead peer: `send` and `recv` wait in slices and ask
`peer_alive` between them (the parent passes its `Process.is_alive`; a child passes `parent_alive()`, which turns
False once the process that started it is gone).

On Linux the sockets live in the abstract namespace (`ipc://@semipd-...`): the kernel drops the name with the
last descriptor, so nothing is left in /tmp even after a SIGKILL. Elsewhere they live in a temp directory that
`close` removes."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
import zmq

SendT = TypeVar("SendT")
RecvT = TypeVar("RecvT")

ABSTRACT_IPC = sys.platform.startswith("linux")


class ChannelAddrs(NamedTuple):
    """The two endpoints of a channel, named by direction (picklable: passed to a spawned child)."""

    to_child: str
    to_parent: str


def parent_alive() -> Callable[[], bool]:
    """In a child process: a liveness callable for its parent (call it first thing, while the parent lives).
    An orphan is re-parented, so a changed parent pid means the parent is gone."""
    parent = os.getppid()
    return lambda: os.getppid() == parent


def _always_alive() -> bool:
    return True


def ignore_terminal_interrupt() -> None:
    """In a child process: Ctrl-C in a terminal signals the whole process group, but the parent drains in-flight
    requests and then stops its children itself; a child dying of the SIGINT first would fail them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def new_addrs(prefix: str) -> tuple[ChannelAddrs, str | None]:
    """Fresh endpoints for a channel, and the directory holding them (None in the abstract namespace)."""
    if ABSTRACT_IPC:
        name = f"@{prefix}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return ChannelAddrs(f"ipc://{name}-in", f"ipc://{name}-out"), None
    d = tempfile.mkdtemp(prefix=f"{prefix}-")
    return ChannelAddrs(f"ipc://{d}/in", f"ipc://{d}/out"), d


class ZmqChannel(Generic[SendT, RecvT]):
    """One end of a typed channel: sends `SendT`, receives the msgspec union `recv_type` (RecvT).

    `send` is safe from several threads; receive from one thread only (a ZMQ socket is not thread-safe)."""

    def __init__(self, addrs: ChannelAddrs, recv_type: Any, *, parent_side: bool,
                 peer_alive: Callable[[], bool] = _always_alive, tmp_dir: str | None = None,
                 liveness_poll_s: float = 0.1) -> None:
        self.addrs = addrs
        self.peer_alive = peer_alive
        self.liveness_poll_s = liveness_poll_s
        self._tmp_dir = tmp_dir
        self._ctx = zmq.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        if parent_side:
            self._push.bind(addrs.to_child)
            self._pull.bind(addrs.to_parent)
        else:
            self._pull.connect(addrs.to_child)
            self._push.connect(addrs.to_parent)
        self._enc = msgspec.msgpack.Encoder()
        self._dec: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(recv_type)
        self._send_lock = threading.Lock()
        self.closed = False

    @classmethod
    def bind(cls, recv_type: Any, prefix: str = "semipd",
             peer_alive: Callable[[], bool] = _always_alive) -> ZmqChannel[SendT, RecvT]:
        """The parent's end, on fresh endpoints; set `peer_alive` once the child exists."""
        addrs, tmp_dir = new_addrs(prefix)
        try:
            return cls(addrs, recv_type, parent_side=True, peer_alive=peer_alive, tmp_dir=tmp_dir)
        except BaseException:
            if tmp_dir is not None:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            raise

    @classmethod
    def connect(cls, addrs: ChannelAddrs, recv_type: Any,
                peer_alive: Callable[[], bool] = _always_alive) -> ZmqChannel[SendT, RecvT]:
        """The child's end of the parent's `addrs`."""
        return cls(addrs, recv_type, parent_side=False, peer_alive=peer_alive)

    def send(self, msg: SendT) -> bool:
        """Queue `msg` for the peer; False (dropped) once the peer is gone. A PUSH socket has nowhere to put a
        message while its peer is not connected, so this waits for room, asking `peer_alive` between waits."""
        data = self._enc.encode(msg)
        with self._send_lock:
            while True:
                try:
                    self._push.send(data, zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    if not self.peer_alive():
                        return False
                    self._push.poll(int(self.liveness_poll_s * 1000), zmq.POLLOUT)

    def recv(self, timeout_s: float | None = None) -> RecvT | None:
        """The next message; None once `timeout_s` passed (None: no limit) or the peer is gone with nothing
        left to read (`peer_alive()` tells which)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = self.liveness_poll_s if deadline is None else min(self.liveness_poll_s,
                                                                          max(0.0, deadline - time.monotonic()))
            if self._pull.poll(int(wait_s * 1000)):
                return self._decode(self._pull.recv())
            if not self.peer_alive():
                # its last words may have arrived after the poll above timed out
                return self._decode(self._pull.recv()) if self._pull.poll(0) else None
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def recv_all(self, timeout_s: float | None = 0.0) -> list[RecvT]:
        """Everything queued, waiting up to `timeout_s` for the first message ([] on timeout or a gone peer)."""
        first = self.recv(timeout_s)
        if first is None:
            return []
        out = [first]
        while True:
            try:
                out.append(self._decode(self._pull.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    def pending(self) -> bool:
        """A message is waiting to be received (nothing is consumed)."""
        return bool(self._pull.poll(0))

    def _decode(self, data: bytes) -> RecvT:
        msg: RecvT = self._dec.decode(data)
        return msg

    def close(self, linger_s: float = 0.0) -> None:
        """Close both sockets (a child gives its last messages `linger_s` to leave) and remove any temp dir."""
        if self.closed:
            return
        self.closed = True
        self._push.close(linger=int(linger_s * 1000))
        self._pull.close(linger=0)
        self._ctx.term()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
