"""Child-process ends for test_runtime_zmq_channel (importable by a spawned child: this folder is on sys.path)."""

from __future__ import annotations

from semipd_runtime.messages import (
    AbortRequest,
    AddRequest,
    CoreFailure,
    EngineStats,
    FromCore,
    Shutdown,
    StepOutput,
    ToCore,
    TokenEvent,
)
from semipd_runtime.zmq_channel import ChannelAddrs, ZmqChannel, parent_alive


def echo_core(addrs: ChannelAddrs) -> None:
    """A stand-in core: answers each AddRequest with its prompt as tokens, each abort with an abort event,
    and Shutdown with a CoreFailure before it exits; exits on its own once the parent is gone."""
    chan: ZmqChannel[FromCore, ToCore] = ZmqChannel.connect(addrs, ToCore, peer_alive=parent_alive())
    try:
        seen = 0
        while True:
            msg = chan.recv()
            if msg is None or isinstance(msg, Shutdown):
                chan.send(CoreFailure(f"bye after {seen}"))
                return
            seen += 1
            if isinstance(msg, AddRequest):
                ev = TokenEvent(msg.rid, msg.prompt_ids)
            elif isinstance(msg, AbortRequest):
                ev = TokenEvent(msg.rid, [], finish_reason="abort", error=msg.reason, status=499)
            else:
                continue
            chan.send(StepOutput([ev], EngineStats(num_running=seen)))
    finally:
        chan.close(linger_s=1.0)


def exit_at_once(addrs: ChannelAddrs) -> None:
    """A child that dies without ever connecting."""
