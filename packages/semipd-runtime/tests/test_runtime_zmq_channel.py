"""ZmqChannel: typed round trips (in one process and across a spawned child), the declared union enforced on
decode, and no call that hangs on a dead or never-connected peer."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
from pathlib import Path

import msgspec
import pytest
from zmq_channel_peer import echo_core, exit_at_once

from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    CoreFailure,
    CoreSampling,
    EngineStats,
    FromCore,
    PrefillBatch,
    Shutdown,
    StatsRequest,
    StepOutput,
    ToCore,
    TokenEvent,
)
from semipd_runtime.zmq_channel import ABSTRACT_IPC, ZmqChannel


def pair() -> tuple[ZmqChannel[ToCore, FromCore], ZmqChannel[FromCore, ToCore]]:
    parent: ZmqChannel[ToCore, FromCore] = ZmqChannel.bind(FromCore, prefix="semipd-test")
    child: ZmqChannel[FromCore, ToCore] = ZmqChannel.connect(parent.addrs, ToCore)
    return parent, child


def test_round_trip_of_typed_messages() -> None:
    parent, child = pair()
    try:
        sent: list[ToCore] = [AddRequest("a", [1, 2, 3], CoreSampling(temperature=0.5, stop_token_ids=[7])),
                              AbortRequest("a", "stop"), StatsRequest(), Shutdown()]
        for m in sent:
            assert parent.send(m)
        got: list[ToCore] = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            got += child.recv_all(1.0)
        assert got == sent and [type(m) for m in got] == [type(m) for m in sent]
        back = StepOutput([TokenEvent("a", [5], finish_reason="length")], EngineStats(num_running=1))
        assert child.send(back)
        deadline = time.monotonic() + 10
        while not parent.pending():  # a peek: the message stays queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert parent.pending() and parent.recv(10.0) == back and not parent.pending()
        assert parent.recv_all(0.0) == []  # nothing else queued, and a zero timeout does not wait
    finally:
        child.close()
        parent.close()


def test_decode_enforces_the_declared_union() -> None:
    parent, child = pair()
    try:
        wrong: ZmqChannel[PrefillBatch, ToCore] = ZmqChannel.connect(parent.addrs, ToCore)
        try:
            assert wrong.send(PrefillBatch(1, []))  # a message of another boundary, not in FromCore
            with pytest.raises(msgspec.ValidationError):
                parent.recv(10.0)
            assert child.send(CoreFailure("typed"))  # the channel still works after a bad message
            assert parent.recv(10.0) == CoreFailure("typed")
        finally:
            wrong.close()
    finally:
        child.close()
        parent.close()


def test_recv_times_out_and_stops_for_a_gone_peer() -> None:
    parent, child = pair()
    try:
        t0 = time.monotonic()
        assert child.recv(0.3) is None
        assert 0.25 <= time.monotonic() - t0 < 5
        assert parent.send(StatsRequest())
        child.peer_alive = lambda: False
        assert child.recv(10.0) == StatsRequest()  # what a dead peer sent is still delivered
        t0 = time.monotonic()
        assert child.recv(None) is None  # then: no wait for ever on a peer that is gone
        assert time.monotonic() - t0 < 5
    finally:
        child.close()
        parent.close()


@pytest.mark.skipif(not ABSTRACT_IPC, reason="abstract IPC names are Linux-only")
def test_endpoints_leave_nothing_on_disk() -> None:
    before = set(Path(tempfile.gettempdir()).glob("semipd-test-*"))
    parent, child = pair()
    try:
        assert all(a.startswith(f"ipc://@semipd-test-{os.getpid()}-") for a in parent.addrs)
        assert set(Path(tempfile.gettempdir()).glob("semipd-test-*")) == before
    finally:
        child.close()
        parent.close()


def test_across_a_spawned_process() -> None:
    chan: ZmqChannel[ToCore, FromCore] = ZmqChannel.bind(FromCore, prefix="semipd-test")
    proc = mp.get_context("spawn").Process(target=echo_core, args=(chan.addrs,), daemon=True)
    chan.peer_alive = proc.is_alive
    proc.start()
    try:
        for i in range(50):
            assert chan.send(AddRequest(f"r{i}", [i, i + 1], CoreSampling()))
        assert chan.send(AbortRequest("r3", "because"))
        got: list[FromCore] = []
        deadline = time.monotonic() + 60
        while len(got) < 51 and time.monotonic() < deadline:
            got += chan.recv_all(1.0)
        assert all(isinstance(m, StepOutput) for m in got) and len(got) == 51
        events = [m.events[0] for m in got if isinstance(m, StepOutput)]
        assert [e.token_ids for e in events[:50]] == [[i, i + 1] for i in range(50)]
        assert (events[50].finish_reason, events[50].error, events[50].status) == ("abort", "because", 499)
        assert chan.send(Shutdown())
        assert chan.recv(60.0) == CoreFailure("bye after 51")
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        chan.close()


@pytest.mark.parametrize("connect_first", [True, False])
def test_send_to_a_dead_peer_returns(connect_first: bool) -> None:
    """A PUSH socket without a live peer has nowhere to put messages; send must give up, not hang."""
    chan: ZmqChannel[ToCore, FromCore] = ZmqChannel.bind(FromCore, prefix="semipd-test")
    target = echo_core if connect_first else exit_at_once
    proc = mp.get_context("spawn").Process(target=target, args=(chan.addrs,), daemon=True)
    chan.peer_alive = proc.is_alive
    proc.start()
    try:
        if connect_first:  # connected and serving: then SIGKILLed mid-conversation
            assert chan.send(StatsRequest()) and chan.send(AddRequest("x", [1], CoreSampling()))
            assert isinstance(chan.recv(60.0), StepOutput)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        assert not proc.is_alive()
        t0 = time.monotonic()
        results = [chan.send(AddRequest(f"y{i}", [1] * 64, CoreSampling())) for i in range(5000)]
        assert time.monotonic() - t0 < 30
        assert results[-1] is False  # more than the socket's high-water mark: the rest were dropped
        assert chan.recv(None) is None  # and a reader learns the peer is gone instead of waiting for ever
    finally:
        chan.close()
