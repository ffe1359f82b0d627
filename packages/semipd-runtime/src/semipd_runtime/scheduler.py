"""Continuous batching with chunked prefill: each step spends a token budget on decode tokens first, then on
prefill chunks of admitted requests, then on newly admitted ones. Pages are reserved for a whole prompt at
admission, minus the longest prefix the radix cache already holds (those tokens are not computed again);
decode grows a request page by page, evicting cached pages and then preempting (recompute) the newest request
when the pool is dry. A request that ends or is preempted leaves its written full pages in the cache.

Steps are launched and resolved in order (the core may launch step N+1 before it resolves N). A request
released while a step it is in is unresolved keeps its pages until that step resolves: its kernels may still
write them, and the other worker of semi-PD would otherwise get them at once."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from semipd_memory import PageAllocator, RadixCache
from semipd_runtime.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request]
    num_new_tokens: list[int]  # tokens each request brings this step (1 for decode)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """Whether request i reaches the end of its known tokens this step (so a new token is sampled)."""
        r = self.requests[i]
        return r.num_computed + self.num_new_tokens[i] == r.seq_len


@dataclass(slots=True)
class _Release:
    step: int  # the step that must resolve first
    slot: int
    tokens: list[int]
    num_written: int
    own_pages: int  # pages of its own (not shared cached ones) the release hands back


class Scheduler:
    def __init__(
        self,
        allocator: PageAllocator,
        *,
        max_running_requests: int,
        chunked_prefill_size: int,
        cache: RadixCache | None = None,
    ) -> None:
        self.allocator = allocator
        self.cache = cache if cache is not None else RadixCache(allocator, enabled=False)
        if self.cache.allocator is not allocator:
            raise ValueError("cache must be built over the scheduler's allocator")
        self.max_running = max_running_requests
        self.token_budget = chunked_prefill_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # True for a request whose newest token (still in flight) is known to be its last (length limits): it is
        # scheduled no more and finishes when that token resolves
        self.ends: Callable[[Request], bool] = lambda req: False
        self.last_launched = 0  # steps are numbered from 1
        self.last_resolved = 0
        self.deferred: list[_Release] = []
        self.num_deferred_pages = 0

    # --- steps in flight ------------------------------------------------------------------------------------
    def launched(self, batch: ScheduledBatch) -> int:
        """The core launched `batch` as the next step; its number."""
        self.last_launched += 1
        for req in batch.requests:
            req.last_step = self.last_launched
        return self.last_launched

    def resolved(self, step: int) -> None:
        """Step `step` (and every one before it) finished on the device: release what waited for it."""
        assert step == self.last_resolved + 1 <= self.last_launched, (step, self.last_resolved, self.last_launched)
        self.last_resolved = step
        due = [d for d in self.deferred if d.step <= step]
        if due:
            self.deferred = [d for d in self.deferred if d.step > step]
            for d in due:
                self.num_deferred_pages -= d.own_pages
                self.cache.free(d.slot, d.tokens, d.num_written)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def in_flight(self) -> bool:
        return self.last_launched > self.last_resolved

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def schedule_decode(self) -> ScheduledBatch | None:
        """Only the decode tokens (semi-PD's decode worker; prefill happens elsewhere)."""
        batch = self._decodes()
        return batch if batch.requests else None

    def _decodes(self) -> ScheduledBatch:
        # decode tokens of running requests are always scheduled: a decode step is the latency-critical part
        batch = ScheduledBatch([], [])
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or req.num_uncomputed != 1 or self.ends(req):
                continue
            if not self._ensure_pages(req, req.seq_len):
                continue  # req itself was preempted
            batch.requests.append(req)
            batch.num_new_tokens.append(1)
        return batch

    def schedule(self) -> ScheduledBatch | None:
        batch = self._decodes()
        budget = self.token_budget - len(batch.requests)
        # 2. further chunks of admitted prefills, 3. new admissions (FCFS; stop at the first that doesn't fit)
        for req in self.running:
            if budget <= 0:
                break
            if req.num_uncomputed > 1 and req not in batch.requests:
                n = min(req.num_uncomputed, budget)
                batch.requests.append(req)
                batch.num_new_tokens.append(n)
                budget -= n
        i = 0
        while budget > 0 and i < len(self.waiting) and len(self.running) < self.max_running:
            req = self.waiting[i]
            if self.ends(req):  # preempted while its last token is in flight: it finishes when that resolves
                i += 1
                continue
            got = self.admit(req)
            if got is None:
                break
            del self.waiting[i]
            req.slot, req.status, req.state_since = got, RequestStatus.RUNNING, time.monotonic()
            self.running.append(req)
            n = min(req.num_uncomputed, budget)
            batch.requests.append(req)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch if batch.requests else None

    def admit(self, req: Request) -> int | None:
        """Reserve a slot for all of req's tokens, sharing the longest cached prefix (req.num_computed is set
        to it); None when slots or pages are short."""
        got = self.cache.alloc(req.token_slice(0, req.seq_len))
        if got is None:
            return None
        slot, req.num_computed = got
        return slot

    def _ensure_pages(self, req: Request, num_tokens: int) -> bool:
        """Grow req to hold num_tokens, preempting the newest other running requests if needed. False: req
        was preempted itself, or waits for pages a step in flight holds."""
        assert req.slot is not None
        while True:
            missing = self.allocator.pages_needed(num_tokens) - len(self.allocator.pages(req.slot))
            if missing <= 0 or self.cache.extend(req.slot, missing):
                return True
            a = self.allocator
            if missing <= a.num_free_pages + a.num_evictable_pages + self.num_deferred_pages:
                return False  # enough come back when the step in flight resolves: req waits a step, no one else
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False

    def preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop its cache, keep its tokens, queue it first."""
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.status, req.state_since = RequestStatus.WAITING, time.monotonic()
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._release(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    def _release(self, req: Request) -> None:
        # the first num_computed tokens have their K/V written: their full pages go to the prefix cache
        if req.slot is None:
            return
        tokens = req.token_slice(0, req.num_computed)
        assert min(tokens, default=0) >= 0, f"{req.rid}: released before its tokens are known (radix keys)"
        if req.last_step > self.last_resolved:  # a step in flight may still write its pages
            own = len(self.allocator.pages(req.slot)) - self.allocator.num_shared(req.slot)
            self.deferred.append(_Release(req.last_step, req.slot, tokens, req.num_computed, own))
            self.num_deferred_pages += own
        else:
            self.cache.free(req.slot, tokens, req.num_computed)
        req.slot = None
