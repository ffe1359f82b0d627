"""RemotePrefill: the decode instance's prefill executor. Prompts are prefilled by a prefill instance, and their
KV arrives in pages reserved here (`PrefillExecutor`, prefill_executor.py).

Each admitted request is its own batch (writer `remote-prefill-K`): the network thread looks the prefill up at
its bootstrap server (cached; the KV layouts must match), sends it the room's page indices (KvRequest), and
waits for its KvStatus: KV landed with the first token and logprob (the request decodes from there), or failed.
Until then the transfer engine may write the pages, so an aborted request stays parked under its writer; the
prefill is told (RoomAbort) and its answer, a dead heartbeat or the waiting timeout releases it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import msgspec
import zmq

from semipd_runtime.kv_transfer import MooncakeTransport
from semipd_runtime.messages import EngineStats
from semipd_runtime.pd_bootstrap import advertised_host, alive, lookup
from semipd_runtime.pd_types import KvLayout, KvRequest, KvStatus, PdEnv, RankInfo, RoomAbort
from semipd_runtime.prefill_executor import PrefillReport
from semipd_runtime.request import Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    req: Request
    writer: str
    addr: tuple[str, int]
    sent_at: float
    pages: list[int]  # where the KV lands (staged copies go there once it has)
    abort_sent: bool = False
    timed_out: bool = False  # failed to the client; pages still parked until the prefill answers


class RemotePrefill:
    in_step = False
    error = ""
    split = (100.0, 100.0)
    in_transition = False

    def __init__(self, transport: MooncakeTransport, layout: KvLayout, host: str, default_port: int,
                 page_size: int, max_running: int, env: PdEnv | None = None) -> None:
        self.env = env or PdEnv.load()
        self.transport, self.layout, self.page_size = transport, layout, page_size
        self.default_port = default_port
        self.max_running = max_running
        self.pending: dict[str, _Pending] = {}  # by room key; core thread only
        self.results: queue.Queue[KvStatus] = queue.Queue()  # from the network thread
        self.jobs: queue.Queue[tuple[tuple[str, int], KvRequest | RoomAbort]] = queue.Queue()
        self.next_batch = 0
        self.failures = 0
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.notify = f"tcp://{advertised_host(host)}:{self.pull.bind_to_random_port(f'tcp://{host}')}"
        self.dead: set[tuple[str, int]] = set()  # prefills whose heartbeat failed (set by the network thread)
        self._stop = threading.Event()
        self.net = threading.Thread(target=self._net_loop, name="remote-prefill-net", daemon=True)
        self.net.start()

    @property
    def busy(self) -> bool:
        return bool(self.pending)

    def token_budget(self) -> int:
        return 1  # one request per batch: each has its own writer, reported when its KV lands

    def next_writer(self) -> str:
        return f"remote-prefill-{self.next_batch}"

    def submit(self, requests: list[Request], pages: list[list[int]]) -> None:
        for req, p in zip(requests, pages):
            b = req.bootstrap
            assert b is not None, f"{req.rid}: a decode instance needs a bootstrap room"
            writer = self.next_writer()
            self.next_batch += 1
            addr = (b.host, b.port or self.default_port)
            start = req.num_computed // self.page_size  # leading pages the prefix cache holds here already
            n = -(-len(req.prompt_ids) // self.page_size)
            self.pending[b.room] = _Pending(req, writer, addr, time.monotonic(), p[start:n])
            self.jobs.put((addr, KvRequest(b.room, self.transport.session, self.notify, self.transport.base,
                                           self.transport.num_pages, start, p[start:n])))

    def poll(self, timeout_s: float) -> list[PrefillReport]:
        reports: list[PrefillReport] = []
        try:
            status = self.results.get(timeout=timeout_s) if timeout_s > 0 else self.results.get_nowait()
            while True:
                reports += self._landed(status)
                status = self.results.get_nowait()
        except queue.Empty:
            pass
        now = time.monotonic()
        for key, p in list(self.pending.items()):
            waited = now - p.sent_at
            if p.addr in self.dead:
                reports.append(self._fail(key, f"prefill instance {p.addr[0]}:{p.addr[1]} is unreachable", 503))
            elif waited > 2 * self.env.waiting_timeout_s:  # not even the abort was answered: give the pages back
                reports.append(self._fail(key, "the prefill instance never answered (abort unanswered)", 502))
            elif waited > self.env.waiting_timeout_s and not p.timed_out:
                # the request fails now, but its pages stay parked under its writer: a transfer may still be
                # landing in them. The prefill's answer to the abort (or its death) releases them.
                p.timed_out = True
                if not p.abort_sent:
                    p.abort_sent = True
                    self.jobs.put((p.addr, RoomAbort(key, self.notify)))
                self.failures += 1
                log.warning("room %s (%s): KV did not land within %.0fs", key, p.req.rid, self.env.waiting_timeout_s)
                reports.append(PrefillReport("", [p.req], error=f"KV transfer timed out after "
                                             f"{self.env.waiting_timeout_s:.0f}s", status=502))
            elif p.req.status is RequestStatus.FINISHED and not p.abort_sent:
                p.abort_sent = True  # aborted here: the prefill stops; its answer releases the pages
                self.jobs.put((p.addr, RoomAbort(key, self.notify)))
        return reports

    def _landed(self, status: KvStatus) -> list[PrefillReport]:
        p = self.pending.pop(status.room, None)
        if p is None:
            return []
        if p.timed_out:  # failed to the client already: the answer only releases the pages
            return [PrefillReport(p.writer, [p.req])]
        if not status.ok:
            self.failures += 1
            return [PrefillReport(p.writer, [p.req], error=status.error or "prefill failed", status=502)]
        self.transport.landed(p.pages)
        return [PrefillReport(p.writer, [p.req], {p.req.rid: (status.token_id, status.logprob)})]

    def _fail(self, key: str, why: str, code: int) -> PrefillReport:
        p = self.pending.pop(key)
        self.failures += not p.timed_out
        log.warning("room %s (%s): %s", key, p.req.rid, why)
        return PrefillReport(p.writer, [p.req], error=why, status=code)

    def decode_context(self) -> AbstractContextManager[object]:
        return nullcontext()

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        return False

    def fill_stats(self, s: EngineStats) -> None:
        s.pd_transfer_failures = self.failures
        s.pd_bootstrap_queue = len(self.pending)

    # --- network thread: bootstrap lookups, page indices out, statuses in, heartbeats ----------------------
    def _net_loop(self) -> None:
        enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(KvStatus)
        pushes: dict[str, zmq.Socket] = {}
        ranks: dict[tuple[str, int], RankInfo] = {}
        beats: dict[tuple[str, int], tuple[float, int]] = {}  # addr -> (last beat, consecutive failures)
        while not self._stop.is_set():
            while self.pull.poll(0):
                try:
                    self.results.put(dec.decode(self.pull.recv(zmq.NOBLOCK)))
                except (zmq.Again, msgspec.DecodeError) as e:
                    log.warning("bad status from a prefill instance: %s", e)
            try:
                addr, msg = self.jobs.get(timeout=0.005)
            except queue.Empty:
                addr = None
            if addr is not None:
                info = ranks.get(addr)
                if info is None:  # an abort too: a prefill that restarted answers it; one that is gone fails the room
                    info = self._lookup(addr, msg.room)
                    if info is not None:
                        ranks[addr] = info
                        beats[addr] = (time.monotonic(), 0)
                if info is not None:
                    sock = pushes.get(info.endpoint)
                    if sock is None:
                        sock = pushes[info.endpoint] = self.ctx.socket(zmq.PUSH)
                        sock.setsockopt(zmq.LINGER, 0)
                        sock.connect(info.endpoint)
                    sock.send(enc.encode(msg))
            now = time.monotonic()
            for a, (last, fails) in list(beats.items()):
                if now - last < self.env.heartbeat_interval_s:
                    continue
                ok = alive(a[0], a[1], timeout_s=min(2.0, self.env.heartbeat_interval_s))
                fails = 0 if ok else fails + 1
                beats[a] = (time.monotonic(), fails)
                if fails >= self.env.heartbeat_max_failures:
                    log.error("prefill %s:%d missed %d heartbeats: failing its rooms", a[0], a[1], fails)
                    self.dead.add(a)
                    ranks.pop(a, None)  # looked up again (and alive again) on its next request
                    beats.pop(a, None)
                elif ok:
                    self.dead.discard(a)
        for sock in pushes.values():
            sock.close(linger=0)

    def _lookup(self, addr: tuple[str, int], room: str) -> RankInfo | None:
        deadline = time.monotonic() + min(self.env.bootstrap_timeout_s, 30.0)
        err = ""
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                info = lookup(addr[0], addr[1], timeout_s=2.0)[0]
            except (OSError, ValueError, msgspec.DecodeError) as e:
                err = str(e)
                time.sleep(0.2)  # the prefill may be starting: retry until the deadline
                continue
            bad = self.layout.mismatch(info.layout)
            if bad:
                self.results.put(KvStatus(room, False, error=f"prefill and decode KV layouts differ ({bad})"))
                return None
            self.dead.discard(addr)
            return info
        self.results.put(KvStatus(room, False, error=f"prefill bootstrap {addr[0]}:{addr[1]} unreachable: {err}"))
        return None

    def close(self) -> None:
        self._stop.set()
        self.net.join(timeout=2)
        self.pull.close(linger=0)
        self.ctx.term()
