"""SemiPDCore: the decode worker of semi-PD mode. It owns the scheduler and the page allocator, reserves pages for
admitted requests and ships them as prefill batches to the prefill worker, runs decode steps that never wait for a
prefill step, and adds a request to its decode batch when the prefill worker reports its first token.

Pages of a request aborted while its prefill runs are parked (deferred free) until the prefill worker reports the
batch done, or is declared dead. Prefill workers come in generations (one per SM split, `repartition.py`): each
writes under its own writer name. With partition_policy "slo" the core feeds its step timings, arrivals and queue
to an SloController and applies the splits it decides (`slo_control.py`).

With the radix cache, dispatch shares the longest cached prefix (the pool is shared: a prefix one request
left there is reused without any transfer) and the prefill worker computes only the tokens after it; a
finished request leaves its full pages in the cache (`Scheduler.finish`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from semipd_runtime.core import CoreConfig, EngineCore, StepInFlight
from semipd_runtime.messages import (
    AddRequest,
    EngineStats,
    FromPrefill,
    PrefillBatch,
    PrefillDone,
    PrefillFailed,
    PrefillItem,
    PrefillReady,
    TokenEvent,
    TokenLogprobMsg,
)
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.partition import SmPartition
from semipd_runtime.repartition import PrefillChannel, PrefillGeneration, PrefillRouter
from semipd_runtime.request import Request, RequestStatus
from semipd_runtime.scheduler import ScheduledBatch
from semipd_runtime.slo_control import SloController

log = logging.getLogger(__name__)
__all__ = ["PrefillChannel", "SemiPDCore"]


class SemiPDCore(EngineCore):
    def __init__(
        self,
        cfg: CoreConfig,
        make_channel: Callable[[SemiPDCore, SmPartition, int], PrefillChannel],  # (core, split, generation)
        model: LlamaForCausalLM | None = None,
        partition: SmPartition | None = None,
        slo: SloController | None = None,
    ) -> None:
        super().__init__(cfg, model)
        partition = partition or SmPartition(cfg.prefill_sm_percent, cfg.decode_sm_percent)
        self.slo = slo
        self.prefilling: dict[str, Request] = {}
        self.batches: dict[int, list[Request]] = {}  # in flight at the prefill worker
        self.parked: dict[str, int] = {}  # rid -> slot of requests aborted while prefilling
        self.next_batch = 0
        self._decode_share: dict[int, float] = {}  # decode step -> decode SM share it was launched with
        self.max_batches_in_flight = 2  # one running, one queued behind it: the prefill worker never idles
        self.prefill_error = ""
        self.prefill_sm, self.decode_sm = partition.sm_count["prefill"], partition.sm_count["decode"]
        self.prefill_info = PrefillReady()
        self.channel = PrefillRouter(lambda part, gen: make_channel(self, part, gen), partition)
        self.channel.on_switch = self._on_switch
        self.channel.on_retire = self._on_retire
        self.decode_context = self.channel.decode_context  # the *current* split's decode context, per step

    def warm_up_tokens(self) -> int:
        return 1  # the decode side never prefills; its worker warms up the prefill shapes

    # --- SM split ---------------------------------------------------------------------------------------------
    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        """Move to a new (prefill %, decode %) split between steps; requests in flight continue. The split takes
        effect once the standby worker is ready (see `self.channel.split`). False: nothing to change."""
        started = self.channel.repartition(prefill_percent, decode_percent)
        if self.slo is not None and not self.channel.in_transition:
            self.slo.applied(self.channel.split, time.monotonic())  # unchanged or failed: tell the partitioner
        return started

    def _on_switch(self, old: PrefillGeneration, new: PrefillGeneration) -> None:
        self.decode_sm = new.partition.sm_count["decode"]
        if self.slo is not None and new.split != self.slo.split:
            self.slo.applied(new.split, time.monotonic())

    def _on_retire(self, partition: SmPartition) -> None:
        if partition.keeps_streams:  # kept for a return to this split: so are the graphs captured on it
            return
        key = partition.stream_key("decode")
        if key is not None and self.runner.graphs is not None:
            self.runner.graphs.drop(key)

    def add_request(self, msg: AddRequest) -> None:
        super().add_request(msg)
        if self.slo is not None and msg.rid in self.requests:
            self.slo.observe_arrival(msg.rid, len(msg.prompt_ids), time.monotonic())

    def _accepted(self, req: Request, i: int, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        event = super()._accepted(req, i, tok, lp)
        if self.slo is not None and event.finish_reason is not None:  # how long a decode slot stays taken
            self.slo.observe_finish(len(req.output_ids))
        return event

    # --- requests -------------------------------------------------------------------------------------------
    def abort(self, rid: str, reason: str = "abort", error: str | None = None, status: int = 0) -> None:
        if self.slo is not None:
            self.slo.forget(rid)
        req = self.requests.get(rid)
        if req is not None and req.status is RequestStatus.PREFILLING:
            self.requests.pop(rid)
            self.prefilling.pop(rid)
            assert req.slot is not None
            self.allocator.free_deferred(req.slot, self.channel.writer_of(rid))
            self.parked[rid] = req.slot
            req.slot, req.status, req.finish_reason = None, RequestStatus.FINISHED, reason
            self.pending.append(TokenEvent(rid, [], None, reason, error, status))
            return
        super().abort(rid, reason, error, status)

    def has_work(self) -> bool:
        return super().has_work() or bool(self.prefilling) or bool(self.batches) or self._repartitioning()

    def _repartitioning(self) -> bool:
        """A standby worker is starting or an old one is retiring: keep stepping (it switches / reaps them)."""
        return self.channel.in_transition or bool(self.channel.retiring)

    def stats(self) -> EngineStats:
        s = super().stats()
        s.num_running += len(self.prefilling)
        s.prefill_sm, s.decode_sm = self.prefill_sm, self.decode_sm
        s.healthy, s.health_error = not self.prefill_error, self.prefill_error
        s.prefill_pid = self.prefill_info.pid
        s.prefill_sm_percent, s.decode_sm_percent = self.channel.split
        s.repartitions, s.repartition_failures = self.channel.repartitions, self.channel.failures
        s.last_repartition_s = self.channel.last_latency_s
        if self.slo is not None:
            self.slo.fill_stats(s)
        return s

    # --- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Overlap mode: launch decode step N+1, resolve N (N+1 runs meanwhile), then talk to the prefill
        worker; prefill results carry real first tokens, so their requests join the next decode step."""
        self.expire()
        events, self.pending = self.pending, []
        overlap = self.cfg.overlap_schedule
        with self.decode_context():
            prev, self.inflight = self.inflight, None
            decode = self.scheduler.schedule_decode()
            if overlap and decode is not None:
                self.inflight, decode = self._launch_decode(decode, prev), None
            if prev is not None:  # before the poll: a split retired there has no step of ours in flight
                events += self._resolve_decode(prev)
            # nothing to decode: wait a little for the prefill worker instead of spinning
            idle = decode is None and self.inflight is None and prev is None
            wait = 0.02 if idle and (self.batches or self._repartitioning()) else 0.0
            events += self._collect(self.channel.poll(wait))
            self._dispatch_prefill()
            if decode is None and self.inflight is None:
                decode = self.scheduler.schedule_decode()
            if decode is not None:
                st = self._launch_decode(decode)
                if overlap:
                    self.inflight = st
                else:
                    events += self._resolve_decode(st)
        if self.slo is not None:
            self._slo_step()
        if self.batches and not self.channel.alive and not self.prefill_error:
            events += self._prefill_died("prefill worker died")
        events += self.pending
        self.pending = []
        return events

    def _launch_decode(self, decode: ScheduledBatch, prev: StepInFlight | None = None) -> StepInFlight:
        st = self.launch(decode, prev)
        self._decode_share[st.step] = self.channel.split[1] / 100
        return st

    def _resolve_decode(self, st: StepInFlight) -> list[TokenEvent]:
        events = self.resolve(st)
        share = self._decode_share.pop(st.step)
        if self.slo is not None:  # the step's own time (resolve measures it from when the one before ended)
            self.slo.observe_decode(st.num_requests, st.num_context, share, st.elapsed_s)
        return events

    def _slo_step(self) -> None:
        assert self.slo is not None
        waiting = [r.seq_len - r.num_computed for r in self.scheduler.waiting]
        running = self.scheduler.running
        self.slo.update_queue(waiting, len(running), sum(r.seq_len for r in running))
        decision = self.slo.decide(time.monotonic())
        if decision is not None and decision.changed:
            self.repartition(*decision.split)

    def _observe_prefill(self, msg: PrefillDone) -> None:
        reqs = self.batches.get(msg.batch_id)
        if self.slo is None or not reqs:
            return
        share = self.channel.generation_of_batch(msg.batch_id).split[0] / 100
        # num_computed is still the cached prefix here (set at admission; _prefill_done moves it to seq_len)
        self.slo.observe_prefill([r.seq_len - r.num_computed for r in reqs], [r.num_computed for r in reqs], share,
                                 msg.elapsed_s)
        now = time.monotonic()
        for r in reqs:
            if r.rid not in self.parked:
                self.slo.observe_first_token(r.rid, now)

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
            # tokens of a decode step in flight are resolved before dispatch (the worker gets real ids)
            assert not req.has_placeholder, f"{req.rid} dispatched with a token still in flight"
            if self.scheduler.num_running + len(self.prefilling) >= self.cfg.max_running_requests:
                break
            tokens = req.token_slice(0, req.seq_len)
            # the budget counts tokens to compute: a cached prefix is free (checked only when it matters)
            if items and req.seq_len > budget and req.seq_len - self.cache.cached_prefix_tokens(tokens) > budget:
                break
            slot = self.scheduler.admit(req)  # sets req.num_computed to the cached prefix
            if slot is None:
                break
            waiting.popleft()
            req.slot, req.status, req.state_since = slot, RequestStatus.PREFILLING, time.monotonic()
            self.prefilling[req.rid] = req
            items.append(PrefillItem(req.rid, tokens, self.allocator.pages(slot),
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
                self._observe_prefill(msg)
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
            self.cache.publish(req.slot, req.prompt_ids)  # written: later prefill batches share its prefix
            req.status, req.state_since = RequestStatus.RUNNING, time.monotonic()
            self.scheduler.running.append(req)
            events.append(self.accept_token(req, res.token_id, res.logprob))
        return events

    def _prefill_died(self, message: str) -> list[TokenEvent]:
        """Fail what the prefill worker held, release parked pages, keep decoding what is running."""
        log.error("%s; failing %d prefilling requests", message, len(self.prefilling))
        self.prefill_error = message
        self.batches.clear()
        for writer in self.channel.writers():
            self.allocator.writer_dead(writer)
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
