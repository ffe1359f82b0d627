"""Continuous batching with chunked prefill: each step spends a token budget on decode tokens first, then on
prefill chunks of admitted requests, then on newly admitted ones. Pages are reserved for a whole prompt at
admission, minus the longest prefix the radix cache already holds (those tokens are not computed again);
decode grows a request page by page, evicting cached pages and then preempting (recompute) the newest request
when the pool is dry. A request that ends or is preempted leaves its written full pages in the cache.

The scheduler owns every request's state: WAITING (queued), PREFILLING (admitted, its prompt with a prefill
executor outside the core's step: semi-PD's worker, a remote prefill), RUNNING, and the rid -> request map.

Steps are launched and resolved in order (the core may launch step N+1 before it resolves N). A request
released while something may still write its pages (a step in flight, a prefill batch) is parked in the
allocator under that writer's name and its pages come back when the writer is done: one mechanism for both.
A step's writer name is `step_writer(n)`."""

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


def step_writer(step: int) -> str:
    """The allocator's name for step `step` as the writer of the pages of the requests in it."""
    return f"step-{step}"


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
        self.prefilling: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}  # every unfinished request, by rid
        # True for a request whose newest token (still in flight) is known to be its last (length limits): it is
        # scheduled no more and finishes when that token resolves
        self.ends: Callable[[Request], bool] = lambda req: False
        self.last_launched = 0  # steps are numbered from 1
        self.last_resolved = 0

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
        self.cache.writer_done(step_writer(step))

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_prefilling(self) -> int:
        return len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def in_flight(self) -> bool:
        return self.last_launched > self.last_resolved

    def add(self, req: Request) -> None:
        if req.rid in self.requests:
            raise ValueError(f"duplicate request id {req.rid}")
        self.requests[req.rid] = req
        self.waiting.append(req)

    def get(self, rid: str) -> Request | None:
        return self.requests.get(rid)

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

    def admit_prefill(self, token_budget: int, writer: str) -> list[Request]:
        """Admit waiting requests (FCFS) for a prefill executor, as one batch that `writer` writes: up to
        `token_budget` tokens to compute (a cached prefix is free; a longer first request goes alone) and the
        running limit. Each gets its slot and moves to PREFILLING."""
        batch: list[Request] = []
        budget = max(token_budget, 1)
        while self.waiting and budget > 0:
            req = self.waiting[0]
            # tokens of a decode step in flight are resolved before admission (the executor gets real ids)
            assert not req.has_placeholder, f"{req.rid} admitted with a token still in flight"
            if len(self.running) + len(self.prefilling) >= self.max_running:
                break
            if batch and req.seq_len > budget and (
                req.seq_len - self.cache.cached_prefix_tokens(req.token_slice(0, req.seq_len)) > budget
            ):
                break
            slot = self.admit(req)  # sets req.num_computed to the cached prefix
            if slot is None:
                break
            self.waiting.popleft()
            req.slot, req.status, req.state_since, req.writer = slot, RequestStatus.PREFILLING, time.monotonic(), writer
            self.prefilling[req.rid] = req
            batch.append(req)
            budget -= req.num_uncomputed
        return batch

    def prefilled(self, req: Request) -> None:
        """The executor wrote req's K/V (all seq_len tokens): it decodes from now on; later admissions share its
        prompt's full pages."""
        assert req.status is RequestStatus.PREFILLING and req.slot is not None, req.rid
        del self.prefilling[req.rid]
        req.num_computed, req.writer = req.seq_len, None
        self.cache.publish(req.slot, req.prompt_ids)
        req.status, req.state_since = RequestStatus.RUNNING, time.monotonic()
        self.running.append(req)

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
            if missing <= a.num_free_pages + a.num_evictable_pages + a.num_parked_pages:
                return False  # enough come back when a writer is done: req waits a step, no one else
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
        """End req in whatever state it is; its pages come back once nothing writes them any more."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status is RequestStatus.PREFILLING:
            del self.prefilling[req.rid]
        self.requests.pop(req.rid, None)
        self._release(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason

    def _release(self, req: Request) -> None:
        # the first num_computed tokens have their K/V written: their full pages go to the prefix cache
        if req.slot is None:
            return
        tokens = req.token_slice(0, req.num_computed)
        assert min(tokens, default=0) >= 0, f"{req.rid}: released before its tokens are known (radix keys)"
        if req.writer is not None:  # a prefill batch may still write (and read) its pages
            self.cache.free_deferred(req.slot, req.writer, tokens, req.num_computed)
        elif req.last_step > self.last_resolved:  # a step in flight may still write its pages
            self.cache.free_deferred(req.slot, step_writer(req.last_step), tokens, req.num_computed)
        else:
            self.cache.free(req.slot, tokens, req.num_computed)
        req.slot, req.writer = None, None
