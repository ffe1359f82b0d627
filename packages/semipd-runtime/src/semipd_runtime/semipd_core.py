"""SemiPDCore: the decode worker of semi-PD mode. It owns the scheduler and the page allocator, reserves pages for
admitted requests and ships them as prefill batches to the prefill worker, runs decode steps that never wait for a
prefill step, and adds a request to its decode batch when the prefill worker reports its first token.

Pages of a request aborted while its prefill runs are parked (deferred free) until the prefill worker reports the
batch done, or is declared dead.

With the radix cache, dispatch shares the longest cached prefix (the pool is shared: a prefix one request
left there is reused without any transfer) and the prefill worker computes only the tokens after it; a
finished request leaves its full pages in the cache (`Scheduler.finish`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

from semipd_runtime.core import CoreConfig, EngineCore
from semipd_runtime.messages import (
    EngineStats,
    FromPrefill,
    PrefillBatch,
    PrefillDone,
    PrefillFailed,
    PrefillItem,
    PrefillReady,
    TokenEvent,
)
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.request import Request, RequestStatus

log = logging.getLogger(__name__)
PREFILL_WRITER = "prefill"


class PrefillChannel(Protocol):
    alive: bool

    def send(self, batch: PrefillBatch) -> None: ...
    def poll(self, timeout_s: float) -> list[FromPrefill]: ...
    def close(self) -> None: ...


class SemiPDCore(EngineCore):
    def __init__(
        self,
        cfg: CoreConfig,
        make_channel: Callable[[SemiPDCore], PrefillChannel],
        model: LlamaForCausalLM | None = None,
        decode_context: Callable[[], AbstractContextManager[object]] = nullcontext,
        sm_split: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__(cfg, model)
        self.decode_context = decode_context
        self.prefilling: dict[str, Request] = {}
        self.batches: dict[int, list[Request]] = {}  # in flight at the prefill worker
        self.parked: dict[str, int] = {}  # rid -> slot of requests aborted while prefilling
        self.next_batch = 0
        self.max_batches_in_flight = 2  # one running, one queued behind it: the prefill worker never idles
        self.prefill_error = ""
        self.prefill_sm, self.decode_sm = sm_split
        self.prefill_info = PrefillReady()
        self.channel = make_channel(self)

    # --- requests -------------------------------------------------------------------------------------------
    def abort(self, rid: str, reason: str = "abort", error: str | None = None, status: int = 0) -> None:
        req = self.requests.get(rid)
        if req is not None and req.status is RequestStatus.PREFILLING:
            self.requests.pop(rid)
            self.prefilling.pop(rid)
            assert req.slot is not None
            self.allocator.free_deferred(req.slot, PREFILL_WRITER)
            self.parked[rid] = req.slot
            req.slot, req.status, req.finish_reason = None, RequestStatus.FINISHED, reason
            self.pending.append(TokenEvent(rid, [], None, reason, error, status))
            return
        super().abort(rid, reason, error, status)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.prefilling) or bool(self.batches)

    def stats(self) -> EngineStats:
        s = super().stats()
        s.num_running += len(self.prefilling)
        s.prefill_sm, s.decode_sm = self.prefill_sm, self.decode_sm
        s.healthy, s.health_error = not self.prefill_error, self.prefill_error
        s.prefill_pid = self.prefill_info.pid
        return s

    # --- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        self.expire()
        events, self.pending = self.pending, []
        with self.decode_context():
            decode = self.scheduler.schedule_decode()
            # nothing to decode: wait a little for the prefill worker instead of spinning
            wait = 0.02 if decode is None and self.batches else 0.0
            events += self._collect(self.channel.poll(wait))
            self._dispatch_prefill()
            if decode is None:
                decode = self.scheduler.schedule_decode()
            if decode is not None:
                events += self.run_batch(decode)
        if self.batches and not self.channel.alive and not self.prefill_error:
            events += self._prefill_died("prefill worker died")
        events += self.pending
        self.pending = []
        return events

    def _dispatch_prefill(self) -> None:
        waiting = self.scheduler.waiting
        if self.prefill_error:
            while waiting:  # no prefill worker: these can never start
                self._fail(waiting[0], f"prefill worker unavailable: {self.prefill_error}", 503)
            return
        if len(self.batches) >= self.max_batches_in_flight or not waiting:
            return
        budget = max(self.cfg.max_prefill_tokens, 1)
        items: list[PrefillItem] = []
        reqs: list[Request] = []
        while waiting and budget > 0:
            req = waiting[0]
            if self.scheduler.num_running + len(self.prefilling) >= self.cfg.max_running_requests:
                break
            if items and req.seq_len > budget:
                break
            slot = self.scheduler.admit(req)  # sets req.num_computed to the cached prefix
            if slot is None:
                break
            waiting.popleft()
            req.slot, req.status, req.state_since = slot, RequestStatus.PREFILLING, time.monotonic()
            self.prefilling[req.rid] = req
            items.append(PrefillItem(req.rid, req.token_slice(0, req.seq_len), self.allocator.pages(slot),
                                     req.sampling, len(req.output_ids), req.num_computed))
            reqs.append(req)
            budget -= req.num_uncomputed
        if items:
            self.batches[self.next_batch] = reqs
            self.channel.send(PrefillBatch(self.next_batch, items))
            self.next_batch += 1

    def _collect(self, msgs: list[FromPrefill]) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for msg in msgs:
            if isinstance(msg, PrefillReady):
                self.prefill_sm = msg.sm_count or self.prefill_sm
                self.prefill_info = msg
            elif isinstance(msg, PrefillFailed):
                events += self._prefill_died(msg.message)
            elif isinstance(msg, PrefillDone):
                events += self._prefill_done(msg)
        return events

    def _prefill_done(self, msg: PrefillDone) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        results = {r.rid: r for r in msg.results}
        for req in self.batches.pop(msg.batch_id, []):
            if req.rid in self.parked:  # aborted meanwhile: the writer is done now, release its pages
                self.allocator.writer_done(self.parked.pop(req.rid))
                continue
            res = results[req.rid]
            self.prefilling.pop(req.rid)
            req.num_computed = req.seq_len
            req.status, req.state_since = RequestStatus.RUNNING, time.monotonic()
            self.scheduler.running.append(req)
            events.append(self.accept_token(req, res.token_id, res.logprob))
        return events

    def _prefill_died(self, message: str) -> list[TokenEvent]:
        """Fail what the prefill worker held, release parked pages, keep decoding what is running."""
        log.error("%s; failing %d prefilling requests", message, len(self.prefilling))
        self.prefill_error = message
        self.batches.clear()
        self.allocator.writer_dead(PREFILL_WRITER)
        self.parked.clear()
        for req in list(self.prefilling.values()):
            self._fail(req, message, 503)
        self._dispatch_prefill()  # fails the waiting ones too
        return []

    def _fail(self, req: Request, message: str, status: int) -> None:
        if req.status is RequestStatus.PREFILLING:
            self.prefilling.pop(req.rid, None)
            if req.slot is not None:
                self.allocator.free(req.slot)
                req.slot = None
            req.status = RequestStatus.FINISHED
        elif req.status is not RequestStatus.FINISHED:
            self.scheduler.finish(req, "abort")
        req.finish_reason = "abort"
        self.requests.pop(req.rid, None)
        self.pending.append(TokenEvent(req.rid, [], None, "abort", message, status))

    def close(self) -> None:
        self.channel.close()
