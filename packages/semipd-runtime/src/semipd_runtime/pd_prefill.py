"""The prefill instance's side of PD disaggregation: `KvSender`, attached to its (unified or semi-PD) core.

A request carrying a bootstrap room runs as usual up to its first token (its max_tokens is 1 here). At that
token its pages are parked in the allocator under the writer name `kv-send-<rid>`, so nothing reuses them while
the transfer engine reads them; once the decode instance's page indices for the room have arrived (KvRequest,
on a ZMQ socket registered at the bootstrap server), a transfer thread writes the pages into the decode's pool
with Mooncake and tells the decode (KvStatus, with the first token and its logprob). Done or failed, the writer
is released on the core's thread (`poll`). A room whose page indices do not come within the bootstrap timeout
fails; a room the decode aborts is dropped (and its request aborted here when still running)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import zmq

from semipd_runtime.kv_transfer import MooncakeTransport
from semipd_runtime.messages import EngineStats, TokenLogprobMsg
from semipd_runtime.pd_bootstrap import BootstrapServer, advertised_host, register
from semipd_runtime.pd_types import KvLayout, KvRequest, KvStatus, PdEnv, RankInfo, ToPrefillSide
from semipd_runtime.request import Request

log = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


@dataclass(slots=True)
class _Room:
    rid: str
    created: float
    dst: KvRequest | None = None
    src_pages: list[int] = field(default_factory=list)
    token: tuple[int, TokenLogprobMsg | None] | None = None  # set at the first token
    ready_at: float = 0.0
    writer: str = ""  # parked pages' writer while a transfer may read them
    failed: str = ""  # the request ended here without a first token
    started: bool = False
    aborted: bool = False  # by the decode
    abort_notify: str = ""  # where to answer the abort when no page indices came (a restarted prefill)


class KvSender:
    def __init__(self, transport: MooncakeTransport, layout: KvLayout, host: str, bootstrap_port: int,
                 page_size: int, env: PdEnv | None = None) -> None:
        self.env = env or PdEnv.load()
        self.transport, self.layout, self.page_size = transport, layout, page_size
        self.rooms: dict[str, _Room] = {}  # by room key; core thread only
        self.by_rid: dict[str, str] = {}
        self.inbox: queue.Queue[ToPrefillSide] = queue.Queue()  # from the network thread
        self.outbox: queue.Queue[tuple[str, KvStatus]] = queue.Queue()  # (decode notify endpoint, status)
        self.done: queue.Queue[tuple[str, KvStatus]] = queue.Queue()  # (room, status) from transfer threads
        self.pool = ThreadPoolExecutor(max(1, self.env.thread_pool_size), thread_name_prefix="kv-send")
        self.transfers = self.failures = self.bytes = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        zport = self.pull.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{advertised_host(host)}:{zport}"
        self.net = threading.Thread(target=self._net_loop, name="kv-send-net", daemon=True)
        self.net.start()
        self.server = BootstrapServer(host, bootstrap_port)
        register(advertised_host(host), self.server.port, RankInfo(0, transport.session, self.endpoint, layout))

    # --- core thread ----------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Pages parked for a transfer, a failure or an abort the decode has yet to hear: the core keeps polling
        (the decode's messages arrive on the network thread, which cannot wake an idle core)."""
        return not self.inbox.empty() or any(r.writer or r.aborted or (r.failed and not r.rid)
                                             for r in self.rooms.values())

    def track(self, req: Request, room: str) -> None:
        r = self.rooms.get(room)
        if r is not None and not r.rid:  # the decode's page indices (or its abort) came first: keep them
            r.rid = req.rid
        else:
            self.rooms[room] = _Room(req.rid, time.monotonic())
        self.by_rid[req.rid] = room

    def first_token(self, req: Request, tok: int, lp: TokenLogprobMsg | None, pages: list[int]) -> None:
        """req sampled its first token and ends now: keep its pages until the transfer has read them."""
        room = self.rooms.get(self.by_rid.get(req.rid, ""))
        if room is None:
            return
        n = -(-len(req.prompt_ids) // self.page_size)
        room.token, room.src_pages, room.ready_at = (tok, lp), pages[:n], time.monotonic()
        room.writer = req.writer = f"kv-send-{req.rid}"  # the scheduler parks its pages under this name

    def ended(self, rid: str, why: str) -> None:
        """rid ended before its first token (abort, rejection): its decode side learns it failed."""
        room = self.rooms.get(self.by_rid.get(rid, ""))
        if room is not None and room.token is None:
            room.failed = why

    def reject(self, key: str, why: str) -> None:
        """The front end turned room `key` away: its decode side hears it once its page indices arrive."""
        room = self.rooms.get(key)
        if room is None:
            room = self.rooms[key] = _Room("", time.monotonic())
        if room.token is None:
            room.failed = why

    def poll(self, timeout_s: float) -> tuple[list[str], list[str]]:
        """(writers whose pages nobody reads any more, rids the decode aborted that still run here)."""
        writers: list[str] = []
        abort_rids: list[str] = []
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            key = msg.room
            room = self.rooms.get(key)
            if room is None:  # the decode was faster than our front end: keep what it sent
                room = self.rooms[key] = _Room("", time.monotonic())
            if isinstance(msg, KvRequest):
                room.dst = msg
            else:
                room.aborted = True
                room.abort_notify = msg.notify
        try:
            key, status = self.done.get(timeout=timeout_s) if timeout_s > 0 and self.busy else self.done.get_nowait()
            self._finished(key, status, writers)
            while True:
                key, status = self.done.get_nowait()
                self._finished(key, status, writers)
        except queue.Empty:
            pass
        now = time.monotonic()
        for key, room in list(self.rooms.items()):
            if room.started:
                continue
            if room.aborted:
                if room.token is None and room.rid:
                    abort_rids.append(room.rid)
                notify = room.dst.notify if room.dst is not None else room.abort_notify
                if notify:  # the answer that releases the pages the decode kept for it
                    self.outbox.put((notify, KvStatus(key, False, error="aborted by the decode instance")))
                self._drop(key, room, writers)
            elif room.failed and room.dst is not None:
                self._notify(room.dst, KvStatus(key, False, error=f"prefill failed: {room.failed}"))
                self._drop(key, room, writers)
            elif room.token is not None and room.dst is not None:
                room.started = True
                self.pool.submit(self._transfer, key, room.dst, room.src_pages, room.token, room.ready_at)
            elif now - (room.ready_at or room.created) > self.env.bootstrap_timeout_s:
                log.warning("room %s: no page indices from the decode within %.0fs", key, self.env.bootstrap_timeout_s)
                self.failures += 1
                self._drop(key, room, writers)
        return writers, abort_rids

    def _finished(self, key: str, status: KvStatus, writers: list[str]) -> None:
        room = self.rooms.get(key)
        if status.ok:
            self.transfers += 1
            self.bytes += status.nbytes
            self.latency_sum += status.seconds
            self.latency_counts[sum(status.seconds > b for b in LATENCY_BUCKETS)] += 1
        else:
            self.failures += 1
        if room is not None:
            self._drop(key, room, writers)

    def _drop(self, key: str, room: _Room, writers: list[str]) -> None:
        if room.writer:
            writers.append(room.writer)
        self.rooms.pop(key, None)
        self.by_rid.pop(room.rid, None)

    def _notify(self, dst: KvRequest, status: KvStatus) -> None:
        self.outbox.put((dst.notify, status))

    def fill_stats(self, s: EngineStats) -> None:
        s.pd_transfers, s.pd_transfer_failures, s.pd_bytes = self.transfers, self.failures, self.bytes
        s.pd_latency_counts, s.pd_latency_sum = list(self.latency_counts), self.latency_sum
        s.pd_bootstrap_queue = sum(1 for r in self.rooms.values() if not r.started)

    # --- transfer threads -----------------------------------------------------------------------------------
    def _transfer(self, key: str, dst: KvRequest, src: list[int], token: tuple[int, TokenLogprobMsg | None],
                  ready_at: float) -> None:
        t0 = time.perf_counter()
        try:
            src_pages = src[dst.start_page:dst.start_page + len(dst.dst_pages)]
            if len(src_pages) != len(dst.dst_pages):
                raise ValueError(f"decode sent {len(dst.dst_pages)} pages from {dst.start_page}, prompt has {len(src)}")
            nbytes = self.transport.write_pages(dst.session, dst.base, dst.num_pages, src_pages, dst.dst_pages)
            status = KvStatus(key, True, token[0], token[1], nbytes=nbytes, seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the decode must hear back whatever happened
            log.warning("room %s: KV transfer failed: %s", key, e)
            status = KvStatus(key, False, error=f"KV transfer failed: {e}")
        self._notify(dst, status)
        self.done.put((key, status))

    # --- network thread -------------------------------------------------------------------------------------
    def _net_loop(self) -> None:
        dec = msgspec.msgpack.Decoder(ToPrefillSide)
        enc = msgspec.msgpack.Encoder()
        pushes: dict[str, zmq.Socket] = {}
        while not self._stop.is_set():
            if self.pull.poll(10):
                try:
                    self.inbox.put(dec.decode(self.pull.recv(zmq.NOBLOCK)))
                except (zmq.Again, msgspec.DecodeError) as e:
                    log.warning("bad message from a decode instance: %s", e)
            while True:
                try:
                    endpoint, status = self.outbox.get_nowait()
                except queue.Empty:
                    break
                sock = pushes.get(endpoint)
                if sock is None:
                    sock = pushes[endpoint] = self.ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.setsockopt(zmq.SNDHWM, 100_000)
                    sock.connect(endpoint)
                try:
                    sock.send(enc.encode(status), zmq.NOBLOCK)
                except zmq.Again:
                    log.warning("decode %s does not take statuses: room %s dropped", endpoint, status.room)
        for sock in pushes.values():
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        self.net.join(timeout=2)
        self.pull.close(linger=0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()
