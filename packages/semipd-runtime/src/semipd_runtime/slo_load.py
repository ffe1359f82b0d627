"""What load the SLO partitioner sees: arrivals (rate, prompt lengths, max_tokens), finished outputs and queue
snapshots, summed up as a `LoadState` per decision (pure Python + numpy; imports nothing from semipd but its
types)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from semipd_runtime.slo_types import LoadState

CHANGE_Z = 3.0  # standard errors an estimate must move by to count as a change of load (not noise)


class LoadTracker:
    """Owns the arrival window, the finished outputs and the queue snapshots since the last decision."""

    def __init__(self, rate_window_s: float, rate_target_arrivals: int, min_lookback_s: float,
                 change_arrivals: int = 20) -> None:
        self.rate_window_s, self.rate_target_arrivals = rate_window_s, rate_target_arrivals
        self.min_lookback_s = min_lookback_s
        self.change_arrivals = change_arrivals  # the latest arrivals a change of load is looked for in (+-22%)
        self._arrivals: deque[tuple[float, int, int]] = deque(maxlen=1_000_000)  # (t, prompt, max output)
        self._outputs: deque[tuple[int, int]] = deque(maxlen=rate_target_arrivals)  # (generated, max output)
        self._first_arrival: float | None = None
        # queue snapshot sums since the last decision: [count, waiting reqs, tokens, attn, decode batch, context]
        self._queue_sum = np.zeros(6)
        self._queue_last = np.zeros(6)
        self._remaining: tuple[int, ...] = ()  # latest snapshot: tokens each running request may still generate

    def observe_arrival(self, t: float, prompt_tokens: int, max_output_tokens: int = 0) -> None:
        """A request arrived at time `t` (same clock as decide's `now`) with `prompt_tokens` to prefill and at most
        `max_output_tokens` to generate (0: not known)."""
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"t must be a finite time, got {t!r}")
        for name, v, least in (("prompt_tokens", prompt_tokens, 1), ("max_output_tokens", max_output_tokens, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
        self._arrivals.append((float(t), int(prompt_tokens), int(max_output_tokens)))
        self._first_arrival = t if self._first_arrival is None else min(self._first_arrival, t)

    @property
    def seen_arrivals(self) -> bool:
        """Whether any request has arrived yet."""
        return self._first_arrival is not None

    def observe_finish(self, output_tokens: int, max_output_tokens: int = 0) -> None:
        """A request finished after generating `output_tokens` of at most `max_output_tokens` (0: not known)."""
        for name, v in (("output_tokens", output_tokens), ("max_output_tokens", max_output_tokens)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        self._outputs.append((int(output_tokens), int(max_output_tokens)))

    def update_queue(self, waiting_prompt_tokens: Sequence[int], running_batch: int,
                     running_context_tokens: int, running_remaining_tokens: Sequence[int] = ()) -> None:
        """Queue state now (call it every step or so): prompt tokens still to prefill per waiting request, and the
        running decode batch with its total context tokens. decide() uses the mean since the last decision, and
        the latest `running_remaining_tokens` (max_tokens left per running request; () if not known)."""
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0
               for n in running_remaining_tokens):
            raise ValueError(f"running_remaining_tokens must be ints >= 0, got {running_remaining_tokens!r}")
        self._remaining = tuple(sorted(int(n) for n in running_remaining_tokens))
        waiting = np.asarray(list(waiting_prompt_tokens), dtype=np.float64)
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in waiting_prompt_tokens):
            raise ValueError(f"waiting_prompt_tokens must be ints >= 0, got {waiting_prompt_tokens!r}")
        for name, v in (("running_batch", running_batch), ("running_context_tokens", running_context_tokens)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        waiting = waiting[waiting > 0]
        snap = np.array([1.0, len(waiting), waiting.sum(), (waiting * (waiting + 1) / 2).sum(), running_batch,
                         running_context_tokens])
        self._queue_sum += snap
        self._queue_last = snap

    def load_state(self, now: float, consume: bool = False) -> LoadState:
        """The load seen at `now`; `consume` starts a new queue-averaging window (decide() does)."""
        while self._arrivals and self._arrivals[0][0] < now - self.rate_window_s:
            self._arrivals.popleft()
        times = np.asarray([a[0] for a in self._arrivals if a[0] <= now], dtype=np.float64)
        # look back far enough for rate_target_arrivals arrivals (a rate from N Poisson arrivals is off by
        # ~1/sqrt(N)), but no further than rate_window_s and no less than one repartition interval
        lookback = self.rate_window_s
        if len(times) >= self.rate_target_arrivals:
            lookback = min(lookback, max(now - float(times[-self.rate_target_arrivals]), self.min_lookback_s))
        window = [a for a in self._arrivals if now - lookback <= a[0] <= now]
        if len(window) > self.change_arrivals and len(times) >= self.change_arrivals:
            lookback = self.changed_lookback(window, lookback, max(now - float(times[-self.change_arrivals]),
                                                                    self.min_lookback_s))
            window = [a for a in window if now - lookback <= a[0]]
        recent = np.asarray([a[1] for a in window], dtype=np.float64)
        limits = [a[2] for a in window[-self.change_arrivals:] if a[2] > 0]
        if self._first_arrival is None:
            rate = span = 0.0
        else:  # a young partitioner has seen less than the lookback: divide by what it has seen (>= 1 s)
            span = min(lookback, max(now - self._first_arrival, min(1.0, lookback)))
            rate = len(recent) / span
        q = self._queue_sum / self._queue_sum[0] if self._queue_sum[0] else self._queue_last
        if consume and self._queue_sum[0]:
            self._queue_last = q
            self._queue_sum = np.zeros(6)
        errors = (0.0, 0.0, 0.0)
        if len(recent):
            attn = recent * (recent + 1) / 2
            mean_n, mean_attn = float(recent.mean()), float(attn.mean())
            root = math.sqrt(len(recent))
            errors = (root / span, float(recent.std()) / root, float(attn.std()) / root)
        elif q[1] > 0:  # no recent arrivals: the waiting requests say what prompts look like
            mean_n, mean_attn = q[2] / q[1], q[3] / q[1]
        else:
            mean_n = mean_attn = 0.0
        # plain floats: these end up in msgspec-encoded stats, which reject numpy scalars
        mean_out = self.output_estimate(limits)
        waiting_reqs, waiting_tokens, waiting_attn, batch, context = (float(v) for v in q[1:])
        used = self.used_share()
        used = 1.0 if used is None else used
        rate_se, prompt_se, attn_se = (float(e) for e in errors)
        return LoadState(float(rate), float(mean_n), float(mean_attn), waiting_reqs, waiting_tokens, waiting_attn,
                         batch, context, mean_out, rate_se, prompt_se, attn_se,
                         slot_free_tokens=tuple(used * n for n in self._remaining))

    def used_share(self) -> float | None:
        """The share of max_tokens finished requests generated (EOS ends most early); None: no finished request
        with a known max_tokens."""
        done = [(n, cap) for n, cap in self._outputs if cap > 0]
        return min(1.0, sum(n for n, _ in done) / sum(cap for _, cap in done)) if done else None

    def output_estimate(self, limits: list[int]) -> float:
        """Output tokens of a new request: the latest arrivals' max_tokens, times the share of max_tokens finished
        requests used (EOS ends most early). Finished requests alone lag a change by a whole output (a phase of
        1k-token outputs read as 256 for 20 s on an H100, so TPOT was sized for a quarter of its batch), and
        max_tokens alone over-states outputs that stop at EOS. 0: nothing known yet."""
        finished = float(np.mean([n for n, _ in self._outputs])) if self._outputs else 0.0
        if not limits:
            return finished
        used = self.used_share()
        if used is not None:
            return float(np.mean(limits)) * used
        # finishes without their max_tokens: the finished mean still bounds a loose limit (chat clients ask 2048)
        return min(float(np.mean(limits)), finished) if self._outputs else float(np.mean(limits))

    def changed_lookback(self, window: list[tuple[float, int, int]], lookback: float, short: float) -> float:
        """`short` (the time back to the last self.change_arrivals arrivals) when their rate or mean prompt is off the
        whole window's by over 3 standard errors (the load changed: a phase of 3k-token prompts was read as 1k for
        18 s, from a window still full of the phase before), else `lookback`."""
        k = self.change_arrivals
        rate_all, rate_new = len(window) / lookback, k / short
        prompts = np.asarray([a[1] for a in window], dtype=np.float64)
        new = prompts[-k:]
        moved_rate = abs(rate_new - rate_all) > CHANGE_Z * rate_all / math.sqrt(k)
        moved_prompt = abs(float(new.mean()) - float(prompts.mean())) > CHANGE_Z * float(prompts.std()) / math.sqrt(k)
        return short if moved_rate or moved_prompt else lookback
