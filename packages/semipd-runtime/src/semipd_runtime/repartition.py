"""Re-partition without stopping: the decode worker's view of its prefill workers, one *generation* per SM split.

A new split starts a standby prefill worker (a process that maps the same shared weights and KV pool, or a thread
entering the new partition's prefill stream). New prefill batches keep going to the current worker until the
standby reports ready; from then on they go to the standby, while the old worker finishes the batches it already
holds and is retired (process joined, thread ended) once it has answered all of them. Its partition (green
contexts) is closed only after the decode side has also left it, i.e. once a decode step entered a newer one.

Pages of a request aborted while a worker holds its batch are released only when that worker reports the batch
done, or is declared dead (each batch writes under its own writer name: `shared_pool_prefill.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from semipd_runtime.messages import FromPrefill, PrefillBatch, PrefillDone, PrefillFailed, PrefillReady
from semipd_runtime.partition import SmPartition

log = logging.getLogger(__name__)


class PrefillChannel(Protocol):
    @property
    def alive(self) -> bool: ...  # read-only here: a thread's flag or a process's liveness

    def send(self, batch: PrefillBatch) -> None: ...
    def poll(self, timeout_s: float) -> list[FromPrefill]: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class PrefillGeneration:
    index: int
    partition: SmPartition
    channel: PrefillChannel
    ready: bool = False
    batches: set[int] = field(default_factory=set)  # batch ids sent to it and not answered yet
    requested_at: float = 0.0  # perf_counter when its split was asked for
    closed: bool = False
    sent: int = 0  # batches it was given

    def close_channel(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.close()

    @property
    def split(self) -> tuple[float, float]:
        return self.partition.split


class PrefillRouter:
    """A PrefillChannel over generations of prefill workers; `repartition` moves to a new split between steps."""

    def __init__(self, make_channel: Callable[[SmPartition, int], PrefillChannel], partition: SmPartition,
                 ready_timeout_s: float = 300.0) -> None:
        self._make = make_channel
        self._next_index = 0
        self.ready_timeout_s = ready_timeout_s
        self.current = self._start(partition, time.perf_counter())
        self.current.ready = True  # the first worker gets batches at once (they queue until it listens)
        self.history = [self.current]  # every generation that became current (tests, logs)
        self.standby: PrefillGeneration | None = None
        self.retiring: list[PrefillGeneration] = []
        self._pending_split: tuple[float, float] | None = None  # asked for while a standby was starting
        self._batch_gen: dict[int, PrefillGeneration] = {}
        self._answered: dict[int, PrefillGeneration] = {}  # batches answered by the last poll(), by who
        self._decode_index = self.current.index  # generation whose partition the decode side last entered
        self.repartitions = 0
        self.failures = 0
        self.last_latency_s = 0.0  # last request -> new split in effect
        self.switches_in_flight = 0  # switches that left batches on the old worker (it finished them)
        self.on_switch: Callable[[PrefillGeneration, PrefillGeneration], None] | None = None
        # called with a retired generation's partition just before it is closed (state keyed by its streams)
        self.on_retire: Callable[[SmPartition], None] | None = None

    def _start(self, partition: SmPartition, requested_at: float) -> PrefillGeneration:
        index, self._next_index = self._next_index, self._next_index + 1
        gen = PrefillGeneration(index, partition, self._make(partition, index), requested_at=requested_at)
        log.info("prefill generation %d starting at split %.1f/%.1f%%", index, *partition.split)
        return gen

    # --- the split ------------------------------------------------------------------------------------------
    @property
    def split(self) -> tuple[float, float]:
        return self.current.split

    @property
    def in_transition(self) -> bool:
        return self.standby is not None or self._pending_split is not None

    def repartition(self, prefill_percent: float, decode_percent: float) -> bool:
        """Ask for a new split; it takes effect when its worker is ready (poll() switches). False: no change."""
        target = (float(prefill_percent), float(decode_percent))
        if self.standby is not None:  # one standby at a time: remember the latest wish for after the switch
            self._pending_split = None if target == self.standby.split else target
            return True
        self._pending_split = None
        if target == self.current.split:
            return False
        t0 = time.perf_counter()
        try:
            partition = self.current.partition.resplit(*target)
            self.standby = self._start(partition, t0)
        except Exception:
            self.failures += 1
            log.exception("re-partition to %.1f/%.1f%% failed to start; staying at %.1f/%.1f%%", *target,
                          *self.current.split)
            return False
        return True

    def restart(self) -> bool:
        """The current worker died: start a fresh one at the same split (it takes over once ready, as a standby
        does). False when none could be started."""
        dead = self.current
        dead.batches.clear()  # failed by the caller; the dead worker retires once replaced
        if self.standby is not None:
            return True  # a worker for a new split is starting already: it takes over
        self._pending_split = None
        try:
            self.standby = self._start(dead.partition.resplit(*dead.split), time.perf_counter())
        except Exception:
            self.failures += 1
            log.exception("could not restart the prefill worker at %.1f/%.1f%%", *dead.split)
            return False
        return True

    @contextmanager
    def decode_context(self) -> Iterator[None]:
        """Enter the current generation's decode role context (a new split is entered at the next step)."""
        gen = self.current
        self._decode_index = gen.index
        with gen.partition.role_context_factory("decode")():
            yield

    # --- PrefillChannel ---------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """False when a worker that holds batches (or the current one) is gone: the core fails what it held."""
        return self.current.channel.alive and all(g.channel.alive for g in self.retiring if g.batches)

    def send(self, batch: PrefillBatch) -> None:
        gen = self.current
        gen.batches.add(batch.batch_id)
        gen.sent += 1
        self._batch_gen[batch.batch_id] = gen
        gen.channel.send(batch)

    def poll(self, timeout_s: float) -> list[FromPrefill]:
        self._answered = {}
        out: list[FromPrefill] = []
        if self.standby is not None:  # first: a ready standby takes the next batch, and the wait below is on it
            self._poll_standby(out)
        out += self._take(self.current, self.current.channel.poll(timeout_s))
        for gen in list(self.retiring):
            if not gen.closed:
                out += self._take(gen, gen.channel.poll(0.0))
        self._retire_finished()
        return out

    def _take(self, gen: PrefillGeneration, msgs: list[FromPrefill]) -> list[FromPrefill]:
        for msg in msgs:
            if isinstance(msg, (PrefillDone, PrefillFailed)):
                gen.batches.discard(msg.batch_id)
                self._answered[msg.batch_id] = self._batch_gen.pop(msg.batch_id, gen)
        return msgs

    def generation_of_batch(self, batch_id: int) -> PrefillGeneration:
        """Who holds (or, within the last poll's answers, held) the batch."""
        return self._answered.get(batch_id) or self._batch_gen.get(batch_id, self.current)

    def _poll_standby(self, out: list[FromPrefill]) -> None:
        sb = self.standby
        assert sb is not None
        msgs = sb.channel.poll(0.0)
        ready = [m for m in msgs if isinstance(m, PrefillReady)]
        failed = [m for m in msgs if isinstance(m, PrefillFailed)]
        waited = time.perf_counter() - sb.requested_at
        if failed or not sb.channel.alive or (not ready and waited > self.ready_timeout_s):
            why = failed[0].message if failed else "exited" if not sb.channel.alive else f"not ready in {waited:.0f}s"
            log.error("standby prefill worker %d failed (%s); staying at %.1f/%.1f%%", sb.index, why,
                      *self.current.split)
            self.standby, self.failures = None, self.failures + 1
            sb.close_channel()
            if sb.partition is not self.current.partition:
                sb.partition.close()
            return
        if not ready:
            return
        old, self.current, self.standby = self.current, sb, None
        sb.ready = True
        self.retiring.append(old)
        self.history.append(sb)
        self.repartitions += sb.split != old.split  # a restart at the same split is not a re-partition
        self.switches_in_flight += bool(old.batches)
        self.last_latency_s = time.perf_counter() - sb.requested_at
        log.info("re-partition %.1f/%.1f%% -> %.1f/%.1f%% in effect after %.1f ms (generation %d; %d batches "
                 "left on generation %d)", *old.split, *sb.split, 1000 * self.last_latency_s, sb.index,
                 len(old.batches), old.index)
        out.append(ready[-1])  # the core learns the new worker's pid / SM count
        if self.on_switch is not None:
            self.on_switch(old, sb)
        if self._pending_split is not None:
            target, self._pending_split = self._pending_split, None
            self.repartition(*target)

    def _retire_finished(self) -> None:
        for gen in list(self.retiring):
            if gen.batches and gen.channel.alive:
                continue  # still answering batches it held before the switch
            gen.close_channel()  # Shutdown, join (kill after a timeout): the old worker exits
            if gen.index >= self._decode_index:
                continue  # the decode side may still be inside this partition's context (this very step)
            self.retiring.remove(gen)
            if self.on_retire is not None:
                self.on_retire(gen.partition)
            gen.partition.close()
            log.info("prefill generation %d retired", gen.index)

    def close(self) -> None:
        gens = [g for g in (self.standby, *self.retiring, self.current) if g is not None]
        self.standby, self.retiring = None, []
        for gen in gens:
            gen.close_channel()
        for gen in gens:
            gen.partition.close()
        if gens:
            gens[-1].partition.close_all()  # splits kept for reuse (green contexts) go now
