"""Continuous batching with chunked prefill: each step spends a token budget on decode tokens first, then on
prefill chunks of admitted requests, then on newly admitted ones. Pages are reserved for a whole prompt at
admission, minus the longest prefix the radix cache already holds (those tokens are not computed again);
decode grows a request page by page, evicting cached pages and then preempting (recompute) the newest request
when the pool is dry. A request that ends or is preempted leaves its written full pages in the cache."""

from __future__ import annotations

import time
from collections import deque
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

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

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
            if req.status is not RequestStatus.RUNNING or req.num_uncomputed != 1:
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
        while budget > 0 and self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            got = self.admit(req)
            if got is None:
                break
            self.waiting.popleft()
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
        """Grow req to hold num_tokens, preempting the newest other running requests if needed."""
        assert req.slot is not None
        while True:
            missing = self.allocator.pages_needed(num_tokens) - len(self.allocator.pages(req.slot))
            if missing <= 0 or self.cache.extend(req.slot, missing):
                return True
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
        if req.slot is not None:
            self.cache.free(req.slot, req.token_slice(0, req.num_computed), req.num_computed)
            req.slot = None
