"""SLO-aware SM partitioner: choose the prefill/decode SM split that keeps TTFT and TPOT inside their SLOs.

Pure Python + numpy; it imports nothing else from semipd, so any engine can feed it step timings and queue state:

    p = SloPartitioner(SloPartitionerConfig(slo_ttft_ms=1000, slo_tpot_ms=50), profile=LatencyProfile.load(path))
    p.observe_prefill(new_tokens, cached_tokens, sm_share, seconds)   # after every prefill step
    p.observe_decode(batch, context_tokens, sm_share, seconds)        # after every decode step
    p.observe_arrival(t, prompt_tokens)                               # when a request arrives
    p.update_queue(waiting_prompt_tokens, running_batch, running_context_tokens)
    d = p.decide(now)            # re-evaluates every repartition_interval_s; d.changed -> apply the new split

Per candidate split it predicts TTFT = queue wait + the request's own prefill at the prefill share, and TPOT = one
decode step of the running batch at the decode share (latency models: `latency_model.py`), with the batch grown by
Little's law when the split decodes slower than the current one. The queue wait is an M/D/1 term for Poisson
arrivals plus a fluid term for backlog beyond what that queue explains, draining at (1 - rho); rho = arrival rate
x amortized prefill time per request (prefills batched up to `prefill_token_budget` tokens). TTFT is judged at its
`ttft_quantile` (0.9: the attainment target is per request), and is at least the prefill time of all that waits now
(a newcomer waits for it, FCFS).
A split scores min(slo_ttft / ttft, slo_tpot / tpot) (>= 1: both SLOs predicted to hold) and is ranked in tiers:
1. both SLOs hold: most headroom wins; but a move is only worth making for headroom up to `score_cap` (a lightly
   loaded engine does not move SMs around for more of it; when it does move, it goes to the most headroom,
   which leaves room for model error: moving only as far as the cap took two moves to settle in simulation);
2. only TPOT holds (with `overload_tpot_margin` to spare): the best TTFT wins. Overloaded, the running batch keeps
   its TPOT and prefill gets every SM decode can spare; trading both SLOs evenly instead (min of the two ratios)
   gave decode 12 of 132 SMs on the H200 at 12 req/s and broke TPOT for all 64 running requests;
3. TPOT cannot be held (with the margin): the splits within `overload_tpot_tolerance` of the best TPOT any split
   reaches tie on TPOT, and the best TTFT among them wins. Ranking by TPOT alone gave prefill 24 of 132 SMs on
   the H200 when a full decode batch briefly broke TPOT (decode saturates HBM well before all SMs); the smaller
   of the two ratios gave prefill 112 SMs with TTFT hopeless and broke TPOT for the whole batch for 30 s.
With `max_decode_batch` known, a split is also only as fast as its decode frees slots (a full batch: admission
waits on decode), and TTFT counts that wait.
Measured TTFTs correct the TTFT predictions (observe_ttft), since the step models see only step times.
It moves only when the best split ranks in a higher tier, or in the same tier beats the current one by
`hysteresis` (relative); it must also rank no worse with the measured arrival rate and prompt length moved by
+-`load_confidence_z` standard errors (Poisson noise in a rate estimate must not flap the split), and the current
split must have been held `min_dwell_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from semipd_runtime.latency_model import (
    DecodeLatencyModel,
    LatencyProfile,
    PrefillLatencyModel,
    decode_features,
)
from semipd_runtime.slo_config import POLICIES, SloPartitionerConfig, check_split, sm_split_candidates
from semipd_runtime.slo_scoring import predict_queue_wait_s, queue_wait_quantile, rank_split
from semipd_runtime.slo_types import Decision, LoadState, SplitPrediction, clear_gain, fmt_rank, worth

__all__ = ["POLICIES", "Decision", "LoadState", "SloPartitioner", "SloPartitionerConfig", "SplitPrediction",
           "predict_queue_wait_s", "sm_split_candidates"]
log = logging.getLogger(__name__)


class SloPartitioner:
    """Fits prefill/decode step-latency models online and picks the SM split; see the module docstring."""

    def __init__(self, config: SloPartitionerConfig | None = None, profile: LatencyProfile | None = None) -> None:
        self.config = config or SloPartitionerConfig()
        self.prefill_model = PrefillLatencyModel(window=self.config.window, forgetting=self.config.forgetting)
        self.decode_model = DecodeLatencyModel(window=self.config.window, forgetting=self.config.forgetting)
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=1_000_000)
        self._outputs: deque[int] = deque(maxlen=self.config.rate_target_arrivals)
        self._first_arrival: float | None = None
        # queue snapshot sums since the last decision: [count, waiting reqs, tokens, attn, decode batch, context]
        self._queue_sum = np.zeros(6)
        self._queue_last = np.zeros(6)
        candidates, split = self.config.candidates, self.config.initial_split
        assert candidates is not None and split is not None  # both filled in by SloPartitionerConfig
        self._candidates: tuple[tuple[float, float], ...] = candidates
        self._split: tuple[float, float] = split
        self._last_switch = -math.inf
        self._last_eval = -math.inf
        self._last: Decision | None = None
        self.switches = 0
        # measured / predicted TTFT, learnt from the engine's first tokens (observe_ttft): the models see step
        # times, not what else a request waits on (tokenizing, the hand-off to decode, steps shared with decode
        # traffic); on the H200 measured TTFT ran ~2x the prediction and the split stayed put while TTFT failed
        self.ttft_correction = 1.0
        self._ttft_window: list[float] = []
        if profile is not None:
            self.seed(profile)

    # --- inputs -------------------------------------------------------------------------------------------------
    def seed(self, profile: LatencyProfile) -> None:
        """Add measured samples (a startup profile); live observations later replace them share by share."""
        for ps in profile.prefill:
            self.prefill_model.add_sample(ps)
        for ds in profile.decode:
            self.decode_model.add_sample(ds)

    def export_profile(self, key: dict[str, str] | None = None) -> LatencyProfile:
        """The samples now held (profile + live), e.g. to save as the next start's profile."""
        return LatencyProfile(key=dict(key or {}), prefill=self.prefill_model.samples(),
                              decode=self.decode_model.samples())

    def observe_prefill(self, new_tokens: int | Sequence[int], cached_tokens: int | Sequence[int], sm_share: float,
                        seconds: float) -> None:
        """One prefill step: new tokens (total, or one int per request), cached-prefix tokens, SM share in (0, 1]."""
        self.prefill_model.observe(new_tokens, cached_tokens, sm_share, seconds)

    def observe_decode(self, batch: int, context_tokens: int, sm_share: float, seconds: float) -> None:
        """One decode step of `batch` sequences holding `context_tokens` tokens in all, at SM share in (0, 1]."""
        self.decode_model.observe(batch, context_tokens, sm_share, seconds)

    def observe_ttft(self, seconds: float) -> None:
        """A request's measured TTFT (arrival -> first token). At each evaluation the mean of a window's TTFTs is
        compared with what the previous decision predicted at the split that ran, and `ttft_correction` (which
        multiplies every TTFT prediction) moves by ttft_feedback_gain of the log ratio (integral action, clipped
        to [0.5, 4]); a window with a split change in it teaches nothing."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                seconds >= 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a finite TTFT >= 0, got {seconds!r}")
        self._ttft_window.append(float(seconds))

    def _learn_ttft(self) -> None:
        measured, self._ttft_window = self._ttft_window, []
        last, cfg = self._last, self.config
        if (cfg.ttft_feedback_gain == 0 or last is None or last.predicted is None or last.changed
                or last.split != self._split or len(measured) < cfg.ttft_feedback_min_samples):
            return
        predicted_s = last.predicted.ttft_mean_ms / 1000
        mean_s = sum(measured) / len(measured)
        if predicted_s <= 0 or mean_s <= 0:
            return
        step = cfg.ttft_feedback_gain * math.log(mean_s / predicted_s)
        self.ttft_correction = min(4.0, max(0.5, self.ttft_correction * math.exp(step)))

    def observe_arrival(self, t: float, prompt_tokens: int) -> None:
        """A request arrived at time `t` (same clock as decide's `now`) with `prompt_tokens` to prefill."""
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"t must be a finite time, got {t!r}")
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, (int, np.integer)) or prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be an int >= 1, got {prompt_tokens!r}")
        self._arrivals.append((float(t), int(prompt_tokens)))
        self._first_arrival = t if self._first_arrival is None else min(self._first_arrival, t)

    def observe_finish(self, output_tokens: int) -> None:
        """A request finished after generating `output_tokens` tokens (sizes how long a decode slot stays taken)."""
        if isinstance(output_tokens, bool) or not isinstance(output_tokens, (int, np.integer)) or output_tokens < 0:
            raise ValueError(f"output_tokens must be an int >= 0, got {output_tokens!r}")
        self._outputs.append(int(output_tokens))

    def update_queue(self, waiting_prompt_tokens: Sequence[int], running_batch: int,
                     running_context_tokens: int) -> None:
        """Queue state now (call it every step or so): prompt tokens still to prefill per waiting request, and the
        running decode batch with its total context tokens. decide() uses the mean since the last decision."""
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

    # --- predictions --------------------------------------------------------------------------------------------
    def load_state(self, now: float, consume: bool = False) -> LoadState:
        """The load seen at `now`; `consume` starts a new queue-averaging window (decide() does)."""
        cfg = self.config
        while self._arrivals and self._arrivals[0][0] < now - cfg.rate_window_s:
            self._arrivals.popleft()
        times = np.asarray([t for t, _ in self._arrivals if t <= now], dtype=np.float64)
        # look back far enough for rate_target_arrivals arrivals (a rate from N Poisson arrivals is off by
        # ~1/sqrt(N)), but no further than rate_window_s and no less than one repartition interval
        lookback = cfg.rate_window_s
        if len(times) >= cfg.rate_target_arrivals:
            lookback = min(lookback, max(now - float(times[-cfg.rate_target_arrivals]), cfg.repartition_interval_s))
        recent = np.asarray([n for t, n in self._arrivals if now - lookback <= t <= now], dtype=np.float64)
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
        mean_out = float(np.mean(self._outputs)) if self._outputs else 0.0
        waiting_reqs, waiting_tokens, waiting_attn, batch, context = (float(v) for v in q[1:])
        return LoadState(float(rate), float(mean_n), float(mean_attn), waiting_reqs, waiting_tokens, waiting_attn,
                         batch, context, mean_out, *(float(e) for e in errors))

    def predict(self, prefill_percent: float, decode_percent: float, load: LoadState) -> SplitPrediction:
        """Predicted TTFT / TPOT / score at one split from the fitted models under `load`."""
        cfg = self.config
        p_share, d_share = prefill_percent / 100.0, decode_percent / 100.0
        pm = self.prefill_model
        if load.mean_prompt_tokens > 0:  # k mean-sized requests share one step's overhead
            k = max(1.0, math.floor(cfg.prefill_token_budget / load.mean_prompt_tokens))
            per_request = pm.predict_features(
                np.array([1.0, k * load.mean_prompt_tokens, k * load.mean_prompt_attn]), p_share) / k
            own = pm.predict_features(np.array([1.0, load.mean_prompt_tokens, load.mean_prompt_attn]), p_share)
        else:
            per_request = own = pm.predict_features(np.array([1.0, 0.0, 0.0]), p_share)
        backlog = 0.0
        if load.waiting_tokens > 0:
            steps = max(1.0, load.waiting_tokens / cfg.prefill_token_budget)
            backlog = pm.predict_features(np.array([steps, load.waiting_tokens, load.waiting_attn]), p_share)
        tpot = self._predict_tpot(load, d_share)
        slot_s = self._decode_slot_s(load, d_share)
        if slot_s > 0:  # requests past the free decode slots wait for one: a slot frees every slot_s seconds
            free = max(0.0, float(cfg.max_decode_batch or 0) - load.decode_batch)
            backlog = max(backlog, max(0.0, load.waiting_requests - free) * slot_s)
        # a burst is judged over how long a split will likely run, not over one window
        horizon = max(cfg.planning_horizon_s, cfg.min_dwell_s)
        wait, rho = predict_queue_wait_s(per_request, backlog, load.arrival_rate, horizon, cfg.load_confidence_z)
        # a newcomer waits for all the prefill queued ahead of it (FCFS). Counting half of it (the queued
        # requests' mean remaining wait) predicted 1.2 s where 2.5 s was measured on the H200 under a backlog
        mean_wait = max(wait, backlog)
        # attainment is per request: judge TTFT at its ttft_quantile, not its mean
        quantile_wait = max(queue_wait_quantile(wait, rho, cfg.ttft_quantile), backlog)
        # decode slots are max_decode_batch servers, not one: below their capacity they add next to no queueing
        # (treating them as one server at rho 0.85 predicted a 1.3 s TTFT and moved SMs to decode, H200 3B),
        # past it the arrivals it cannot finish pile up over the horizon
        slot_rho = load.arrival_rate * slot_s
        if slot_rho > 1:
            overflow = (slot_rho - 1) * horizon / 2
            mean_wait, quantile_wait = max(mean_wait, overflow), max(quantile_wait, overflow)
        ttft_mean = (mean_wait + own) * self.ttft_correction
        ttft = (quantile_wait + own) * self.ttft_correction
        ttft_ratio, tpot_ratio = cfg.slo_ttft_ms / (1000 * ttft), cfg.slo_tpot_ms / (1000 * tpot)
        score = min(ttft_ratio, tpot_ratio)
        best_tpot_ratio = cfg.slo_tpot_ms / (1000 * self._best_tpot(load))
        tier, value = rank_split(ttft_ratio, tpot_ratio, cfg.overload_tpot_margin, best_tpot_ratio,
                                 cfg.overload_tpot_tolerance)
        return SplitPrediction(prefill_percent, decode_percent, float(1000 * ttft), float(1000 * tpot),
                               float(1000 * quantile_wait), float(rho), float(score), tier, float(value),
                               float(1000 * ttft_mean), float(1000 * own), float(1000 * backlog), float(slot_rho))

    def _best_tpot(self, load: LoadState) -> float:
        """The lowest TPOT any candidate predicts: at the largest decode share."""
        return self._predict_tpot(load, max(d for _, d in self._candidates) / 100.0)

    def _decode_slot_s(self, load: LoadState, d_share: float) -> float:
        """Seconds of decode-slot time per request with a full batch: output tokens x TPOT at max_decode_batch /
        max_decode_batch, i.e. 1 / the most requests per second this decode share can complete (0: unknown)."""
        cap = self.config.max_decode_batch
        if cap is None or load.mean_output_tokens <= 0:
            return 0.0
        per_seq = (load.decode_context_tokens / load.decode_batch if load.decode_batch > 0
                   else load.mean_prompt_tokens + load.mean_output_tokens / 2)
        full = self.decode_model.predict_features(decode_features(cap, cap * per_seq), d_share)
        return load.mean_output_tokens * full / cap

    def _predict_tpot(self, load: LoadState, d_share: float) -> float:
        """One decode step of the running batch at `d_share`. Nothing decodes: one sequence of a mean prompt (the
        next request's first steps). A slower split also grows the batch: requests finish at the same rate but
        take longer (Little's law, B = throughput x output tokens x TPOT), so B scales by new / current TPOT,
        iterated to its fixed point (capped at `max_batch_growth`). Without this a split whose TPOT fitted the
        current batch broke TPOT seconds after the move, as the batch caught up (H200, 104/28 SMs)."""
        model = self.decode_model
        batch = max(1.0, load.decode_batch)
        context = load.decode_context_tokens if load.decode_batch > 0 else load.mean_prompt_tokens
        tpot = model.predict_features(decode_features(batch, context), d_share)
        if load.decode_batch < 1:
            return tpot
        now = model.predict_features(decode_features(batch, context), self._split[1] / 100.0)
        cap = self.config.max_batch_growth
        if self.config.max_decode_batch is not None:  # the batch cannot grow past the engine's cap
            cap = min(cap, max(1.0, self.config.max_decode_batch / batch))
        for _ in range(8):
            growth = min(cap, max(1.0, tpot / now))
            grown = model.predict_features(decode_features(batch * growth, context * growth), d_share)
            if grown <= tpot * (1 + 1e-3):
                return max(tpot, grown)
            tpot = grown
        return tpot

    # --- decisions ----------------------------------------------------------------------------------------------
    @property
    def current_split(self) -> tuple[float, float]:
        return self._split

    def force_split(self, prefill_percent: float, decode_percent: float, now: float) -> None:
        """Tell the partitioner the engine runs this split (e.g. it could not apply the chosen one)."""
        split = check_split((prefill_percent, decode_percent), "split")
        if split not in self._candidates:
            raise ValueError(f"split {split} is not one of the candidates")
        if split != self._split:
            self._split, self._last_switch = split, now

    def warmup_reason(self) -> str | None:
        """Why the models cannot be trusted yet (None when they can)."""
        for name, model in (("prefill", self.prefill_model), ("decode", self.decode_model)):
            if model.num_samples < self.config.min_samples:
                return f"warming up: {model.num_samples}/{self.config.min_samples} {name} samples"
            if len(model.shares) < 2:
                return f"warming up: {name} samples at {len(model.shares)} SM share(s), need 2 (seed a profile)"
        return None

    def decide(self, now: float) -> Decision:
        """The split to run at `now`. Re-evaluates once per repartition_interval_s; in between it returns the
        last decision with changed=False. Apply the split when `changed` is True."""
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time, got {now!r}")
        if self._last is not None and now - self._last_eval < self.config.repartition_interval_s:
            return dataclasses.replace(self._last, time=now, changed=False)
        self._last_eval = now
        decision = self._evaluate(now)
        self._last = decision
        level = logging.INFO if decision.changed else logging.DEBUG
        log.log(level, "slo partition %s", decision.as_dict())
        return decision

    def _evaluate(self, now: float) -> Decision:
        cfg = self.config
        load = self.load_state(now, consume=True)
        self._learn_ttft()
        not_ready = self.warmup_reason()
        if not_ready is not None:
            reason = "static policy" if cfg.policy == "static" else not_ready
            return self._decision(now, self._split, False, reason, None, None, (), load)
        preds = tuple(self.predict(p, d, load) for p, d in self._candidates)
        current = next(p for p in preds if (p.prefill_percent, p.decode_percent) == self._split)
        # ties: stay, else the split nearest the current one (fewest SMs moved)
        best = max(preds, key=lambda p: (p.rank, p is current, -abs(p.prefill_percent - self._split[0])))
        if cfg.policy == "static":
            return self._decision(now, self._split, False, "static policy", current, best, preds, load)
        vs = f"best {best.prefill_percent:.1f}% ranks {fmt_rank(best)} vs {fmt_rank(current)}"
        if best is current or best.rank <= current.rank:
            reason = f"current split is best (ranks {fmt_rank(current)})"
        elif now - self._last_switch < cfg.min_dwell_s:
            reason = f"hold: dwell {now - self._last_switch:.2f}s < min_dwell_s {cfg.min_dwell_s}s"
        elif not clear_gain(best, current, cfg.hysteresis, cfg.score_cap):
            reason = f"hold: {vs}, gain under hysteresis {cfg.hysteresis}"
        elif not self._no_worse_under_load_error(best, current, load):
            reason = f"hold: {vs}, but not at the arrival rate / prompt length +-{cfg.load_confidence_z} std errors"
        else:
            kind = {2: "meets both SLOs with most headroom", 1: "TTFT cannot be met; best TTFT that keeps TPOT",
                    0: "TPOT cannot be held; best TTFT near the best TPOT"}[best.tier]
            reason = f"move: {kind} (ranks {fmt_rank(best)} vs {fmt_rank(current)})"
            self._split, self._last_switch = (best.prefill_percent, best.decode_percent), now
            self.switches += 1
            return self._decision(now, self._split, True, reason, best, best, preds, load)
        return self._decision(now, self._split, False, reason, current, best, preds, load)

    def _no_worse_under_load_error(self, best: SplitPrediction, current: SplitPrediction, load: LoadState) -> bool:
        # a rate measured from a few hundred Poisson arrivals wanders by several %, and TTFT near saturation
        # amplifies that: only move when the best split ranks no worse at both ends of the estimate's band.
        # (Asking for the full hysteresis gain there too held a split for 20 s at score ~1 while a 10-30%
        # better one was on offer: at the light end every split has headroom and they nearly tie.)
        z = self.config.load_confidence_z
        for shifted in (load.shifted(-z), load.shifted(z)) if z > 0 else ():
            b = self.predict(best.prefill_percent, best.decode_percent, shifted)
            c = self.predict(current.prefill_percent, current.decode_percent, shifted)
            if worth(b, self.config.score_cap) < worth(c, self.config.score_cap):
                return False
        return True

    def _decision(self, now: float, split: tuple[float, float], changed: bool, reason: str,
                  predicted: SplitPrediction | None, best: SplitPrediction | None,
                  preds: tuple[SplitPrediction, ...], load: LoadState) -> Decision:
        total = self.config.total_sms
        return Decision(now, split[0], split[1], round(total * split[0] / 100), round(total * split[1] / 100),
                        changed, reason, predicted, best, preds, load, float(self.ttft_correction))
