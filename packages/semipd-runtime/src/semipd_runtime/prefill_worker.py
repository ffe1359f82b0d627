"""PrefillWorker: runs prefill batches (chunked) into pages the decode worker reserved, samples each request's
first token, reports done. It owns no allocator and allocates nothing in the shared pool. An item's first
`num_cached` tokens are already in shared cached pages: attention reads them, nothing is written
there.

`ThreadPrefillChannel` runs it as a thread of the decode worker's process (green contexts, or CPU);
the process placement lives in `prefill_process.py`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from semipd_runtime.grammar import bitmask_from_bytes
from semipd_runtime.messages import (
    FromPrefill,
    PrefillBatch,
    PrefillDone,
    PrefillFailed,
    PrefillReady,
    PrefillResult,
    Shutdown,
    ToPrefill,
)
from semipd_runtime.model_runner import ModelRunner
from semipd_runtime.penalties import plan_fresh
from semipd_runtime.sampler import Sampler

log = logging.getLogger(__name__)


class PrefillWorker:
    """chunk_size: tokens per forward (semi-PD: max_prefill_tokens; chunking here only bounds activation
    memory, since decode runs beside it rather than inside the same step). eos_ids: what min_tokens bans
    besides a request's stop_token_ids."""

    def __init__(self, runner: ModelRunner, chunk_size: int, eos_ids: Sequence[int] = ()) -> None:
        self.runner = runner
        self.chunk_size = chunk_size
        self.eos = set(eos_ids)
        self.sampler = Sampler()

    def warm_up(self) -> None:
        """Compile the prefill kernels at this worker's shapes before the first batch (CUDA only)."""
        dt = self.runner.warm_up(self.chunk_size, 64, self.sampler)
        if dt:
            log.info("prefill worker warmed up in %.2fs (forwards up to %d tokens)", dt, self.chunk_size)

    def run(self, batch: PrefillBatch) -> PrefillDone:
        t0 = time.perf_counter()
        items = batch.items
        for it in items:
            if not 0 <= it.num_cached < len(it.token_ids) or it.num_cached % self.runner.page_size:
                raise ValueError(f"prefill item {it.rid}: num_cached={it.num_cached} must be whole pages "
                                 f"below len(token_ids)={len(it.token_ids)}")
        table = self.runner.page_table_from_rows([it.pages for it in items])
        done = [it.num_cached for it in items]
        results: list[PrefillResult] = []
        while any(d < len(it.token_ids) for d, it in zip(done, items)):
            budget, rows, chunks, starts = self.chunk_size, [], [], []
            for i, it in enumerate(items):
                left = len(it.token_ids) - done[i]
                if left <= 0 or budget <= 0:
                    continue
                n = min(left, budget)
                rows.append(i)
                chunks.append(it.token_ids[done[i] : done[i] + n])
                starts.append(done[i])
                budget -= n
            sample_rows = [j for j, i in enumerate(rows) if starts[j] + len(chunks[j]) == len(items[i].token_ids)]
            sub_table = table.index_select(0, torch.tensor(rows, device=table.device))
            logits = self.runner.forward(chunks, starts, sub_table, sample_rows)
            for j, i in enumerate(rows):
                done[i] += len(chunks[j])
            if sample_rows:
                finished = [items[rows[j]] for j in sample_rows]
                samplings = [it.sampling for it in finished]
                # the item's last `step` tokens are its outputs so far (a preempted request resumes with them)
                plan = plan_fresh(samplings, [(it.token_ids[: len(it.token_ids) - it.step],
                                               it.token_ids[len(it.token_ids) - it.step :]) for it in finished],
                                  self.eos)
                masked = [j for j, it in enumerate(finished) if it.token_bitmask]
                bitmask = bitmask_from_bytes([finished[j].token_bitmask for j in masked], masked,
                                             logits.device) if masked else None
                tokens, lps = self.sampler(logits, samplings, [it.step for it in finished], plan, bitmask)
                results += [PrefillResult(it.rid, t, lp) for it, t, lp in zip(finished, tokens, lps)]
        n_tokens = sum(len(it.token_ids) - it.num_cached for it in items)  # computed, not from the cache
        return PrefillDone(batch.batch_id, results, n_tokens, time.perf_counter() - t0)


def prefill_loop(worker: PrefillWorker, recv: Callable[[], ToPrefill], send: Callable[[FromPrefill], None]) -> None:
    while True:
        msg = recv()
        if isinstance(msg, Shutdown):
            return
        try:
            send(worker.run(msg))
        except Exception as e:
            log.exception("prefill batch %d failed", msg.batch_id)
            send(PrefillFailed(msg.batch_id, f"prefill worker failed: {e!r}"))
            raise


class ThreadPrefillChannel:
    """The prefill worker as a thread sharing the decode worker's model and KV pool objects directly."""

    def __init__(
        self, worker: PrefillWorker, role_context: Callable[[], AbstractContextManager[object]] = nullcontext,
        sm_count: int = 0, warm_up: bool = False,
    ) -> None:
        """warm_up: compile kernels first, here, before the engine reports ready (the first generation; later
        ones find them compiled in-process). Done in the caller's thread: run in the worker thread it overlapped
        the first requests, whose TTFT then paid seconds of JIT under the GIL."""
        if warm_up:
            with role_context():
                worker.warm_up()
        self.inbox: queue.Queue[ToPrefill] = queue.Queue()
        self.outbox: queue.Queue[FromPrefill] = queue.Queue()
        self.worker, self.role_context = worker, role_context
        self.alive = True
        self.outbox.put(PrefillReady(sm_count))
        self.thread = threading.Thread(target=self._run, name="semipd-prefill", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.role_context():
                prefill_loop(self.worker, self.inbox.get, self.outbox.put)
        except Exception:  # noqa: BLE001 - prefill_loop already reported it as PrefillFailed
            pass
        finally:
            self.alive = False

    def send(self, batch: PrefillBatch) -> None:
        self.inbox.put(batch)

    def poll(self, timeout_s: float) -> list[FromPrefill]:
        out: list[FromPrefill] = []
        try:
            out.append(self.outbox.get(timeout=timeout_s) if timeout_s > 0 else self.outbox.get_nowait())
            while True:
                out.append(self.outbox.get_nowait())
        except queue.Empty:
            return out

    def close(self) -> None:
        if self.thread.is_alive():
            self.inbox.put(Shutdown())
            self.thread.join(timeout=10)
