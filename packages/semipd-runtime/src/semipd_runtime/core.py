"""EngineCore: scheduler + model runner + sampler + a prefill executor behind a token-level API (no text, no
asyncio). Unified serving, semi-PD and later variants are the same core given another `PrefillExecutor`
(`prefill_executor.py`); the SLO controller watches through a `CoreObserver` hook.

The front end (`Engine`) talks to it in-process through a thread, or across a process boundary with the same
messages (`core_client.py`).

A step is launched (inputs built, forward and sampling queued on the device, a copy of the tokens to host
memory started) and later resolved (wait for that copy, accept the tokens, emit events). With
`overlap_schedule` the core schedules and launches step N+1 before it resolves step N, so the device is never
idle while the host schedules: tokens N samples are placeholders in N+1's inputs, filled on the device; a
request that turns out to stop at N had a row in N+1, discarded; pages released while a step that includes
their request is in flight come back when it resolves (`Scheduler.resolved`). A step whose sampled rows have
grammars resolves the step in flight early, between its own forward and its sampling (`CoreGrammars`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import cast

import torch

from semipd_memory import KVPool, PageAllocator, RadixCache
from semipd_runtime.capacity import check_fits, kv_pages_for
from semipd_runtime.config import EngineConfig
from semipd_runtime.errors import InvalidRequestError
from semipd_runtime.forward_batch import to_device
from semipd_runtime.grammar import CoreGrammars
from semipd_runtime.messages import AddRequest, EngineStats, TokenEvent, TokenLogprobMsg
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.models.llama import LlamaForCausalLM
from semipd_runtime.models.loader import load_model
from semipd_runtime.observer import CoreObserver
from semipd_runtime.pd_prefill import KvSender
from semipd_runtime.penalties import PenaltyRows
from semipd_runtime.prefill_executor import LocalPrefill, PrefillExecutor, PrefillReport
from semipd_runtime.request import Request, RequestStatus
from semipd_runtime.sampler import Sampler
from semipd_runtime.scheduler import ScheduledBatch, Scheduler
from semipd_runtime.step_in_flight import StepInFlight, finish_reason, reaches_length, record_event

log = logging.getLogger(__name__)


ExecutorFactory = Callable[["EngineCore"], PrefillExecutor]


class EngineCore:
    def __init__(self, cfg: EngineConfig, model: LlamaForCausalLM | None = None,
                 make_executor: ExecutorFactory | None = None, observers: Sequence[CoreObserver] = ()) -> None:
        """make_executor(core): how prompts are prefilled (default `LocalPrefill`: inside this core's steps); it
        is built last and may use the core's model, KV pool and runner."""
        self.cfg = cfg
        device = torch.device(cfg.device)
        dtype = getattr(torch, cfg.dtype)
        self.model = model if model is not None else load_model(cfg.model_path, device, dtype, cfg.model.load_format)
        mcfg = self.model.config
        num_pages = kv_pages_for(cfg, mcfg, dtype, device)
        max_pages_per_req = -(-cfg.max_model_len // cfg.scheduler.page_size)
        self.allocator = PageAllocator(
            num_pages, cfg.scheduler.page_size, cfg.scheduler.max_running_requests, max_pages_per_req, device=device
        )
        self.kv_pool = KVPool(
            mcfg.num_layers, num_pages, cfg.scheduler.page_size, mcfg.num_kv_heads, mcfg.head_dim, dtype, device
        )
        self.runner = ModelRunner(self.model, self.kv_pool, cfg.scheduler.page_size, cfg.max_model_len,
                                  cuda_graph_max_bs=cfg.scheduler.graph_max_bs())
        self.cache = RadixCache(self.allocator, enabled=cfg.scheduler.enable_radix_cache)
        self.scheduler = Scheduler(
            self.allocator,
            max_running_requests=cfg.scheduler.max_running_requests,
            chunked_prefill_size=cfg.scheduler.chunked_prefill_size,
            cache=self.cache,
        )
        self.sampler = Sampler()
        self.eos = set(cfg.model.eos_token_ids)
        self.penalty_rows = PenaltyRows(self.eos)  # which request's token counts each sampler state row holds
        self.num_steps = 0
        self.pending: list[TokenEvent] = []  # events produced outside step() (aborts, rejections)
        self.scheduler.ends = self._ends
        self.inflight: StepInFlight | None = None  # overlap mode: launched, not resolved yet
        self._last_done_at = 0.0
        self._last_expiry = 0.0
        self.observers = list(observers)
        self.executor: PrefillExecutor = make_executor(self) if make_executor is not None else LocalPrefill()
        self.kv_sender: KvSender | None = None  # a PD prefill instance: sends first-token requests' KV on
        self.on_close: list[Callable[[], None]] = []  # what was composed in (tensor-parallel ranks) to release
        self.grammars = CoreGrammars(cfg.model_path, self.model.config.vocab_size,
                                     next(iter(cfg.model.eos_token_ids), None), cfg.parallel.tp_size)
        log.info("KV pool: %d pages x %d tokens on %s (%s), radix cache %s", num_pages, cfg.scheduler.page_size, device,
                 cfg.dtype, "on" if cfg.scheduler.enable_radix_cache else "off")

    @property
    def requests(self) -> dict[str, Request]:
        """Unfinished requests by rid (the scheduler owns them)."""
        return self.scheduler.requests

    def decode_context(self) -> AbstractContextManager[object]:
        """The SM share the core's steps run in (graphs are captured inside it)."""
        return self.executor.decode_context()

    def warm_up(self) -> None:
        """Compile the kernels of the step shapes this core runs outside CUDA graphs (CUDA only): mixed
        prefill+decode steps up to the chunk size when prompts run in its steps, eager decode batches above the
        graph sizes. (An executor's worker warms up its own prefill shapes.)"""
        tokens = self.cfg.scheduler.chunked_prefill_size if self.executor.in_step else 1
        with self.decode_context():
            dt = self.runner.warm_up(tokens, self.cfg.scheduler.max_running_requests, self.sampler)
        if dt:
            log.info("warmed up in %.2fs", dt)

    def capture_cuda_graphs(self) -> None:
        """Capture the decode graphs now, inside the decode partition, rather than on each size's first use."""
        if self.runner.graphs is not None:
            with self.decode_context():
                self.runner.graphs.capture()

    def drop_decode_graphs(self, stream_key: int) -> None:
        """Graphs captured on a decode stream that is gone (a retired split) can never run again."""
        if self.runner.graphs is not None:
            self.runner.graphs.drop(stream_key)

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        """Move to a new (prefill %, decode %) SM split between steps; requests in flight continue. It takes
        effect once the executor's standby worker is ready. False: nothing to change (no split, or the same)."""
        started = self.executor.repartition(prefill_percent, decode_percent)
        if not self.executor.in_transition:  # unchanged or failed: observers learn what runs
            self._split_changed(self.executor.split, False)
        return started

    def _split_changed(self, split: tuple[float, float], switched: bool) -> None:
        for obs in self.observers:
            obs.on_split(split, switched)

    # --- requests -------------------------------------------------------------------------------------------
    def check_fits(self, num_prompt: int, max_tokens: int) -> None:
        """Raise InvalidRequestError for a request that can never run (context or pool too small)."""
        check_fits(num_prompt, max_tokens, self.cfg.max_model_len, self.allocator.page_size, self.allocator.num_pages)

    def add_request(self, msg: AddRequest) -> None:
        if msg.rid in self.requests:
            self.pending.append(TokenEvent(msg.rid, [], None, "abort", f"duplicate request id {msg.rid}", 400))
            return
        try:
            self.check_fits(len(msg.prompt_ids), msg.sampling.max_tokens)
        except InvalidRequestError as e:
            self.pending.append(TokenEvent(msg.rid, [], None, "abort", e.message, 400))
            return
        req = Request(msg.rid, list(msg.prompt_ids), msg.sampling, bootstrap=msg.bootstrap)
        if msg.grammar:
            error = self.grammars.attach(req, msg.grammar)
            if error:
                self.pending.append(TokenEvent(msg.rid, [], None, "abort", error, 400))
                return
        if self.kv_sender is not None and req.bootstrap is not None:
            self.kv_sender.track(req, req.bootstrap.room)
        self.scheduler.add(req)
        now = time.monotonic()
        for obs in self.observers:
            obs.on_arrival(req, now)

    def abort(self, rid: str, reason: str = "abort", error: str | None = None, status: int = 0) -> None:
        """End a request in any state; its pages come back once nothing writes them (scheduler.finish)."""
        for obs in self.observers:
            obs.on_abort(rid)
        req = self.requests.get(rid)
        if req is None:
            return
        if self.kv_sender is not None:
            self.kv_sender.ended(rid, error or reason)
        self.scheduler.finish(req, reason)
        self.pending.append(TokenEvent(rid, [], None, reason, error, status))

    def expire(self) -> None:
        """Abort requests that stayed too long in one state (checked at most twice a second)."""
        now = time.monotonic()
        if now - self._last_expiry < 0.5:
            return
        self._last_expiry = now
        limits = {
            RequestStatus.WAITING: self.cfg.scheduler.queue_timeout_s,
            RequestStatus.PREFILLING: self.cfg.scheduler.prefill_timeout_s,
            RequestStatus.RUNNING: self.cfg.scheduler.decode_timeout_s,
        }
        for req in list(self.requests.values()):
            limit = limits.get(req.status)
            if limit is not None and now - req.state_since > limit:
                self.abort(req.rid, "abort", f"request timed out while {req.status.value}", 504)

    def has_work(self) -> bool:
        return (self.scheduler.has_work() or self.inflight is not None or self.executor.busy
                or (self.kv_sender is not None and self.kv_sender.busy))

    def stats(self) -> EngineStats:
        s = EngineStats(
            num_running=self.scheduler.num_running + self.scheduler.num_prefilling,
            num_waiting=self.scheduler.num_waiting,
            pages_used=self.allocator.num_used_pages,
            pages_total=self.allocator.num_pages,
            num_steps=self.num_steps,
            cached_pages=self.allocator.num_cached_pages,
            evictable_pages=self.allocator.num_evictable_pages,
            prefix_hit_tokens=self.cache.hit_tokens,
            prefix_query_tokens=self.cache.query_tokens,
        )
        self.executor.fill_stats(s)
        if self.kv_sender is not None:
            self.kv_sender.fill_stats(s)
        for obs in self.observers:
            obs.fill_stats(s)
        return s

    # --- the step -------------------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Overlap mode: schedule and launch step N+1, then resolve step N (the device runs N+1 while the host
        reads N's tokens and builds N+2). Otherwise: launch and resolve the one step. With an executor outside
        the step, its reports are collected after that (their requests carry real first tokens and join the
        next step) and new prefill batches go out."""
        self.expire()
        if self.kv_sender is not None:
            self._poll_kv_sender()
        events, self.pending = self.pending, []
        overlap = self.cfg.scheduler.overlap_schedule
        in_step = self.executor.in_step
        schedule = self.scheduler.schedule if in_step else self.scheduler.schedule_decode
        with self.decode_context():
            prev, self.inflight = self.inflight, None
            batch = schedule()
            if overlap and batch is not None:
                self.inflight, batch = self.launch(batch, prev), None
            if prev is not None:  # before the poll: a split retired there has no step of ours in flight
                events += self.resolve(prev)
            if not in_step:
                # nothing to decode: wait a little for the prefill worker instead of spinning
                idle = batch is None and self.inflight is None and prev is None
                for report in self.executor.poll(0.02 if idle and self.executor.busy else 0.0):
                    events += self._prefill_reported(report)
                self._dispatch_prefill()
                if batch is None and self.inflight is None:
                    batch = schedule()
            if batch is not None:
                st = self.launch(batch)
                if overlap:
                    self.inflight = st
                else:
                    events += self.resolve(st)
        now = time.monotonic()
        for obs in self.observers:
            split = obs.after_step(self.scheduler, now)
            if split is not None:
                self.repartition(*split)
        events += self.pending
        self.pending = []
        return events

    def _poll_kv_sender(self) -> None:
        """Release the pages of finished KV transfers; abort what the decode side gave up on."""
        assert self.kv_sender is not None
        idle = not self.scheduler.has_work() and self.inflight is None and not self.executor.busy
        writers, aborted = self.kv_sender.poll(0.01 if idle else 0.0)  # nothing else to do: wait, do not spin
        for writer in writers:
            self.cache.writer_done(writer)
        for rid in aborted:
            self.abort(rid, "abort", "the decode instance aborted the request", 499)

    def _dispatch_prefill(self) -> None:
        """Admit waiting requests into a prefill batch when the executor takes one."""
        waiting = self.scheduler.waiting
        if self.executor.error:
            while waiting:  # no prefill worker: these can never start
                self.abort(waiting[0].rid, "abort", f"prefill worker unavailable: {self.executor.error}", 503)
            return
        budget = self.executor.token_budget()
        if budget <= 0 or not waiting:
            return
        reqs = self.scheduler.admit_prefill(budget, self.executor.next_writer())
        if reqs:
            self.executor.submit(reqs, [self.allocator.pages(r.slot) for r in reqs if r.slot is not None])

    def _prefill_reported(self, report: PrefillReport) -> list[TokenEvent]:
        """A batch came back: its live requests decode from now on (or fail); then nothing writes its pages."""
        events: list[TokenEvent] = []
        if report.timing is not None:
            for obs in self.observers:
                obs.on_prefill(report.timing)
        for req in report.requests:
            if req.status is not RequestStatus.PREFILLING:
                continue  # finished meanwhile (abort): its pages are parked under this batch's writer
            if report.error:
                self.abort(req.rid, "abort", report.error, report.status)
                continue
            tok, lp = report.first_tokens[req.rid]
            self.scheduler.prefilled(req)
            events.append(self.accept_token(req, tok, lp))
        self.cache.writer_done(report.writer)
        return events

    def launch(self, batch: ScheduledBatch, prev: StepInFlight | None = None) -> StepInFlight:
        """Queue the forward over the batch and the sampling of each request that reaches its last known token;
        nothing here waits for the device. A sampled request gets a placeholder output id (-1 - its row) until
        `resolve`; placeholders among the inputs are the tokens of `prev`, the step still in flight, read
        on the device."""
        t0 = time.perf_counter()
        if prev is not None and prev.done is not None:  # the stream may be another one (a new SM split)
            torch.cuda.current_stream(self.runner.device).wait_event(prev.done)
        sample_rows = [i for i in range(len(batch.requests)) if batch.samples(i)]
        chunks = [r.token_slice(r.num_computed, r.num_computed + n)
                  for r, n in zip(batch.requests, batch.num_new_tokens)]
        starts = [r.num_computed for r in batch.requests]
        table = self.allocator.req_to_page
        slots = cast(list[int], [r.slot for r in batch.requests])  # a scheduled request always holds a slot
        page_table = table.index_select(0, to_device(slots, torch.long, table.device))
        prev_tokens = prev.sampled.tokens if prev is not None and prev.sampled is not None else None
        if prev_tokens is not None and prev_tokens.is_cuda:  # read here, maybe on another stream than its own
            prev_tokens.record_stream(torch.cuda.current_stream(self.runner.device))
        logits = self.runner.forward(chunks, starts, page_table, sample_rows, prev_tokens)
        for req, n in zip(batch.requests, batch.num_new_tokens):
            req.num_computed += n
            if req.num_computed - n < len(req.prompt_ids) <= req.num_computed:
                # prompt done: later requests share its full pages from now on (readers run after this step
                # on the same stream), not only once it ends
                assert req.slot is not None
                self.cache.publish(req.slot, req.prompt_ids)
        self.num_steps += 1
        step = self.scheduler.launched(batch)
        reqs = [batch.requests[i] for i in sample_rows]
        plan = self.penalty_rows.plan(reqs) if reqs else None  # before the placeholders: output_ids end here
        steps = [len(r.output_ids) for r in reqs]
        index = []
        for j, req in enumerate(reqs):
            index.append(len(req.output_ids))
            req.output_ids.append(-1 - j)
        sampled = None
        if reqs:
            if prev is not None and not prev.resolved and self.grammars.needs_tokens(reqs):
                self.pending += self.resolve(prev)  # early: the masks need prev's tokens (`grammar.CoreGrammars`)
            bitmask = self.grammars.bitmask(reqs, logits.device)
            sampled = self.sampler.sample(logits, [r.sampling for r in reqs], steps, plan, bitmask)
        done = sampled.ready if sampled is not None else record_event(logits.device)
        share = self.executor.split[1] / 100  # executors without an SM split report (100, 100)
        return StepInFlight(step, reqs, index, sampled, done, t0, len(batch.requests), sum(starts), share)

    def resolve(self, st: StepInFlight) -> list[TokenEvent]:
        """Wait for a launched step (its own work, nothing queued after it), put its tokens in place of the
        placeholders, release what waited for it, finish requests, emit their events. A request that ended
        after the step was launched (stop token of the step before, abort) has its row discarded. A step
        resolved early (for grammar masks) resolves to nothing the second time."""
        if st.resolved:
            return []
        st.resolved = True
        tokens, logprobs = st.sampled.read() if st.sampled is not None else ([], [])
        if st.sampled is None and st.done is not None:
            st.done.synchronize()
        now = time.perf_counter()
        st.elapsed_s = now - max(st.launched_at, self._last_done_at)  # the step's own time, not its overlap
        self._last_done_at = now
        self.scheduler.resolved(st.step)
        for obs in self.observers:  # the step's own time (measured from when the one before ended)
            obs.on_decode_step(st.num_requests, st.num_context, st.decode_share, st.elapsed_s)
        events = []
        for req, i, tok, lp in zip(st.requests, st.index, tokens, logprobs):
            if req.status is not RequestStatus.FINISHED:
                req.output_ids[i] = tok
                events.append(self._accepted(req, i, tok, lp))
        return events

    def accept_token(self, req: Request, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        req.output_ids.append(tok)
        return self._accepted(req, len(req.output_ids) - 1, tok, lp)

    def _accepted(self, req: Request, i: int, tok: int, lp: TokenLogprobMsg | None) -> TokenEvent:
        """output_ids[i] = tok is known now: finish req if it ends there. Its grammar consumes tok first."""
        error = req.grammar.accept(tok) if req.grammar is not None else ""
        reason = "abort" if error else finish_reason(req, tok, i + 1, self.eos, self.cfg.max_model_len)
        if i == 0:
            if self.kv_sender is not None and req.bootstrap is not None and req.slot is not None:
                self.kv_sender.first_token(req, tok, lp, self.allocator.pages(req.slot))
            now = time.monotonic()
            for obs in self.observers:
                obs.on_first_token(req, now)
        if reason is not None:
            del req.output_ids[i + 1 :]  # the placeholder of a step in flight: that row is discarded
            self.scheduler.finish(req, reason)
            for obs in self.observers:  # how long a decode slot stays taken
                obs.on_finish(req)
        if error:
            log.warning("%s: the grammar rejected token %d: %s", req.rid, tok, error)
            error = f"the output left its grammar: {error}"
        return TokenEvent(req.rid, [tok], None if lp is None else [lp], reason, error or None, 500 if error else 0)

    def _ends(self, req: Request) -> bool:
        """Its newest output id (a placeholder) is its last whatever its value: never schedule it again."""
        return reaches_length(req, len(req.output_ids), self.cfg.max_model_len)

    def close(self) -> None:
        """Release the executor's workers (none for LocalPrefill), the KV sender of a PD prefill instance, then
        what was composed in (`on_close`)."""
        self.executor.close()
        if self.kv_sender is not None:
            self.kv_sender.close()
        for release in self.on_close:
            release()

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[TokenEvent]:
        """Offline helper: step until every request finished."""
        out: list[TokenEvent] = []
        t0 = time.monotonic()
        for _ in range(max_steps):
            out += self.step()
            if not self.has_work() and not self.pending:
                break
        log.debug("run_until_idle: %d steps in %.2fs", self.num_steps, time.monotonic() - t0)
        return out
