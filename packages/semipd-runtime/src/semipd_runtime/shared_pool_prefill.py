"""SharedPoolPrefill: semi-PD's prefill executor. A prefill worker on its own SM share (a thread under green
contexts or on CPU, a process under MPS or none) runs the prompts of admitted requests into the pages the core
reserved in the shared KV pool and samples their first tokens; the core's own steps are decode only.

Batches go out through a `PrefillRouter` (`repartition.py`), which owns the workers: one *generation* per SM split,
a standby started for a new split, the old one retired once it answered what it held. At most two batches are in
flight (one running, one queued behind it), so the worker never idles between batches. Each batch writes under its
own writer name; its report tells the core that nothing writes those pages any more.

A worker that dies fails the batches it held (only those requests) and is replaced by a fresh one at the same
split, up to `max_restarts` times; meanwhile new prompts wait. Past that, or when no replacement starts, the
executor reports an error and waiting requests fail."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from semipd_runtime.messages import (
    EngineStats,
    PrefillBatch,
    PrefillDone,
    PrefillFailed,
    PrefillItem,
    PrefillReady,
)
from semipd_runtime.partition import SmPartition
from semipd_runtime.prefill_executor import PrefillReport, PrefillTiming, SplitListener
from semipd_runtime.repartition import PrefillChannel, PrefillGeneration, PrefillRouter
from semipd_runtime.request import Request

log = logging.getLogger(__name__)
ChannelFactory = Callable[[SmPartition, int], PrefillChannel]  # (partition, generation index) -> its worker


@dataclass(slots=True)
class _Batch:
    requests: list[Request]
    new_tokens: list[int]
    cached_tokens: list[int]


def batch_writer(batch_id: int) -> str:
    return f"prefill-batch-{batch_id}"


class SharedPoolPrefill:
    in_step = False

    def __init__(self, make_channel: ChannelFactory, partition: SmPartition, max_prefill_tokens: int,
                 drop_decode_graphs: Callable[[int], None] = lambda key: None, max_restarts: int = 3) -> None:
        """drop_decode_graphs(stream key): a retired split's decode stream is gone, so are graphs captured on it."""
        self.max_prefill_tokens = max(max_prefill_tokens, 1)
        self.max_batches_in_flight = 2
        self.batches: dict[int, _Batch] = {}  # in flight at a prefill worker
        self.next_batch = 0
        self.error = ""
        self.restarting = ""  # why the worker is being replaced ("" = it is not)
        self.restarts, self.max_restarts = 0, max_restarts
        self.prefill_sm, self.decode_sm = partition.sm_count["prefill"], partition.sm_count["decode"]
        self.ready = PrefillReady()
        self.on_split: SplitListener | None = None
        self._drop_decode_graphs = drop_decode_graphs
        self.router = PrefillRouter(make_channel, partition)
        self.router.on_switch = self._on_switch
        self.router.on_retire = self._on_retire

    # --- the split ------------------------------------------------------------------------------------------
    @property
    def split(self) -> tuple[float, float]:
        return self.router.split

    @property
    def in_transition(self) -> bool:
        return self.router.in_transition

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        return self.router.repartition(prefill_percent, decode_percent)

    def decode_context(self) -> AbstractContextManager[object]:
        return self.router.decode_context()  # the *current* split's decode context, entered per step

    def _on_switch(self, old: PrefillGeneration, new: PrefillGeneration) -> None:
        self.decode_sm = new.partition.sm_count["decode"]
        if self.on_split is not None:
            self.on_split(new.split, True)

    def _on_retire(self, partition: SmPartition) -> None:
        if partition.keeps_streams:  # kept for a return to this split: so are the graphs captured on it
            return
        key = partition.stream_key("decode")
        if key is not None:
            self._drop_decode_graphs(key)

    # --- batches --------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.batches) or self.router.in_transition or bool(self.router.retiring)

    def token_budget(self) -> int:
        if self.error or self.restarting or len(self.batches) >= self.max_batches_in_flight:
            return 0
        return self.max_prefill_tokens

    def next_writer(self) -> str:
        return batch_writer(self.next_batch)

    def submit(self, requests: list[Request], pages: list[list[int]]) -> None:
        # a grammar's first token is sampled there: the item carries its mask (the matcher stays here)
        items = [PrefillItem(r.rid, r.token_slice(0, r.seq_len), p, r.sampling, len(r.output_ids), r.num_computed,
                             r.grammar.mask_bytes() if r.grammar is not None else b"")
                 for r, p in zip(requests, pages)]
        # num_computed is the cached prefix here (set at admission)
        self.batches[self.next_batch] = _Batch(requests, [r.seq_len - r.num_computed for r in requests],
                                               [r.num_computed for r in requests])
        self.router.send(PrefillBatch(self.next_batch, items))
        self.next_batch += 1

    def poll(self, timeout_s: float) -> list[PrefillReport]:
        reports: list[PrefillReport] = []
        for msg in self.router.poll(timeout_s):
            if isinstance(msg, PrefillReady):
                self.prefill_sm = msg.sm_count or self.prefill_sm
                self.ready = msg
            elif isinstance(msg, PrefillFailed):
                reports += self._died(msg.message)
            elif isinstance(msg, PrefillDone):
                reports += self._done(msg)
        if self.batches and not self.router.alive and not self.error:
            reports += self._died("prefill worker died")
        if self.restarting:
            self._check_restart()
        return reports

    def _check_restart(self) -> None:
        r = self.router
        if r.current.channel.alive and not r.in_transition:
            log.warning("prefill worker replaced (generation %d) after: %s", r.current.index, self.restarting)
            self.restarting = ""
        elif r.standby is None and not r.current.channel.alive:  # the replacement failed to start
            self.error, self.restarting = f"{self.restarting}; restart failed", ""

    def _done(self, msg: PrefillDone) -> list[PrefillReport]:
        batch = self.batches.pop(msg.batch_id, None)
        if batch is None:
            return []
        share = self.router.generation_of_batch(msg.batch_id).split[0] / 100
        return [PrefillReport(batch_writer(msg.batch_id), batch.requests,
                              {r.rid: (r.token_id, r.logprob) for r in msg.results},
                              timing=PrefillTiming(batch.new_tokens, batch.cached_tokens, share, msg.elapsed_s))]

    def _died(self, message: str) -> list[PrefillReport]:
        """A worker is gone: every batch in flight fails (their writers will never write again)."""
        log.error("%s; failing %d prefilling requests", message,
                  sum(len(b.requests) for b in self.batches.values()))
        if self.restarts < self.max_restarts and self.router.restart():
            self.restarts += 1
            self.restarting = message
        else:
            self.error = message
        reports = [PrefillReport(batch_writer(i), b.requests, error=message) for i, b in self.batches.items()]
        self.batches.clear()
        return reports

    # --- stats, shutdown ------------------------------------------------------------------------------------
    def fill_stats(self, s: EngineStats) -> None:
        r = self.router
        s.prefill_sm, s.decode_sm = self.prefill_sm, self.decode_sm
        s.healthy = not (self.error or self.restarting)
        s.recovering = bool(self.restarting and not self.error)
        restarting = f"prefill worker restarting after: {self.restarting}" if self.restarting else ""
        s.health_error = self.error or restarting
        s.prefill_pid = self.ready.pid
        s.prefill_sm_percent, s.decode_sm_percent = r.split
        s.repartitions, s.repartition_failures, s.last_repartition_s = r.repartitions, r.failures, r.last_latency_s

    def close(self) -> None:
        self.router.close()
