"""SLO-aware SM partitioner: choose the prefill/decode SM split under which most requests meet their TTFT and
TPOT SLOs.

Pure Python + numpy; it imports nothing else from semipd, so any engine can feed it step timings and queue state:

    p = SloPartitioner(SloPartitionerConfig(slo_ttft_ms=1000, slo_tpot_ms=50), profile=LatencyProfile.load(path))
    p.observe_prefill(new_tokens, cached_tokens, sm_share, seconds)   # after every prefill step
    p.observe_decode(batch, context_tokens, sm_share, seconds)        # after every decode step
    p.observe_arrival(t, prompt_tokens)                               # when a request arrives
    p.observe_finish(output_tokens, max_output_tokens)                # when a request finishes
    p.update_queue(waiting_prompt_tokens, running_batch, running_context_tokens, running_remaining_tokens)
    d = p.decide(now)            # re-evaluates every repartition_interval_s; d.changed -> apply the new split

The policy, all of it. The load: arrival rate lam, mean prompt, W requests waiting, the running decode batch, mean
output tokens L (read from the latest 20 arrivals when they differ from the window's by 3 std errors [change]).
Step times come from the fitted models (`latency_model.py`). The candidates are the splits green contexts grant
(decode on a multiple of 8 SMs, prefill on the rest: `slo_config.sm_split_candidates`). For each split s:

    S        prefill seconds per request (prompts batched up to the token budget); mu = 1/S; own = one prompt's
    slot     seconds between decode-slot frees with a full batch, L x TPOT(cap) / cap (0: cap unknown)   [slots]
    b        seconds of prefill (or of slot frees, past the free slots: the running requests' own ends, then
             slot each) queued ahead of a newcomer now                                           [slot_frees]
    B        steady decode batch: B = max(running, min((lam + W/H) L tau, mu L tau, cap)), tau = TPOT(B)
             (what arrives, and what waits over the horizon H, reaches decode only as fast as this split
             prefills it: Little's law); L = the latest arrivals' max_tokens x the share of max_tokens finished
             requests used                                                           [steady_batch, max_tokens]
    TPOT     one decode step of min(B + sqrt(B), cap) sequences at s (the batch swings)                  [swing]
             P_tpot = Phi(ln(SLO_tpot / TPOT) / sigma): sigma, the model's error, sets the margin kept
    P_ttft   share of the next H seconds of arrivals with own + max(b(t), w) <= SLO_ttft, where the queue
             b(t) = max(0, b + (rho - 1) t) drains (or grows) with rho = lam max(S, slot)              [backlog]
             and w is the M/D/1 wait of Poisson arrivals: P(w > x) = rho exp(-x rho / W_md1)
    A        = P_ttft x P_tpot                            predicted SLO attainment
    G        = min(1, mu / (lam + W/H)) x P_tpot x K      share of the load prefilled, then decoded in TPOT [served]
             K: share of the next 2H over which b(t) stays within SLO_ttft - own (a queue that outgrows the
             SLO fails every later request, this phase's and the next one's)                         [kept]
    T        mean TTFT of the next arrivals                                                            [light_load]

The best split has the highest A; among those within `tie` of it, the highest G; among those within `tie` again,
with cheap moves (green contexts) once a request has arrived, the lowest T, else the current split if it is
among them. Why three levels:
A alone is flat where every split is hopeless (overload: A ~ 0) and where every split is fine (light load: A ~ 1).
In overload G keeps prefill throughput (a split that holds TPOT but prefills at a trickle starves everyone queued).
At light load T gives prefill what decode does not need, as DuetServe partitions only when decode would suffer;
with MPS (a move costs ~12 s) that level is off. What earlier rules did and why they went: benchmarks/RESULTS.md,
"SLO policy history".

It moves when the best split beats the current one (`slo_types.beats`: A higher by over `tie`, else G or then T
better by over `hysteresis`, relative, G also by over `tie`), the current one does not beat it at the arrival rate
and prompt length moved +-`load_confidence_z` standard errors (a move for T alone must also keep TPOT at the heavy
end) [load_band]
unless the current split fails most requests with a queue waiting while the best serves most [rescue],
and the current split has been held `dwell_s` [dwell] (with cheap moves a move that wins A back need not wait),
and a move back against the last move for A or G waits for the rate, prompt or output length to move [reversal].
Each bracketed term changes decisions in benchmarks/sim_slo_policy.py (`--ablate TERM`; RESULTS.md has the table).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from semipd_runtime.latency_model import (
    DecodeLatencyModel,
    LatencyProfile,
    PrefillLatencyModel,
    decode_features,
)
from semipd_runtime.slo_config import POLICIES, SloPartitionerConfig, check_split, sm_split_candidates
from semipd_runtime.slo_load import CHANGE_Z, LoadTracker
from semipd_runtime.slo_scoring import queue_kept_share, tpot_attainment, ttft_attainment
from semipd_runtime.slo_types import Decision, LoadState, SplitPrediction, beats, fmt, load_moved

__all__ = ["POLICIES", "Decision", "LoadState", "SloPartitioner", "SloPartitionerConfig", "SplitPrediction",
           "sm_split_candidates"]
log = logging.getLogger(__name__)


class SloPartitioner:
    """Fits prefill/decode step-latency models online and picks the SM split; see the module docstring."""

    def __init__(self, config: SloPartitionerConfig | None = None, profile: LatencyProfile | None = None) -> None:
        self.config = config or SloPartitionerConfig()
        self.prefill_model = PrefillLatencyModel(window=self.config.window, forgetting=self.config.forgetting)
        self.decode_model = DecodeLatencyModel(window=self.config.window, forgetting=self.config.forgetting)
        self.tracker = LoadTracker(self.config.rate_window_s, self.config.rate_target_arrivals,
                                   self.config.repartition_interval_s)
        candidates, split = self.config.candidates, self.config.initial_split
        assert candidates is not None and split is not None  # both filled in by SloPartitionerConfig
        self._candidates: tuple[tuple[float, float], ...] = candidates
        self._split: tuple[float, float] = split
        self._last_switch = -math.inf
        self._last_move: tuple[float, LoadState] | None = None  # (direction: +1 more prefill, the load it saw)
        self._last_eval = -math.inf
        self._last: Decision | None = None
        self.switches = 0
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

    def observe_arrival(self, t: float, prompt_tokens: int, max_output_tokens: int = 0) -> None:
        """A request arrived at time `t` (same clock as decide's `now`) with `prompt_tokens` to prefill and at most
        `max_output_tokens` to generate (0: not known)."""
        self.tracker.observe_arrival(t, prompt_tokens, max_output_tokens)

    def observe_finish(self, output_tokens: int, max_output_tokens: int = 0) -> None:
        """A request finished after generating `output_tokens` tokens of at most `max_output_tokens` (0: unknown)."""
        self.tracker.observe_finish(output_tokens, max_output_tokens)

    def update_queue(self, waiting_prompt_tokens: Sequence[int], running_batch: int,
                     running_context_tokens: int, running_remaining_tokens: Sequence[int] = ()) -> None:
        """Queue state now (call it every step or so): prompt tokens still to prefill per waiting request, and the
        running decode batch with its total context tokens. decide() uses the mean since the last decision, and
        the latest max_tokens left per running request (when a decode slot frees)."""
        self.tracker.update_queue(waiting_prompt_tokens, running_batch, running_context_tokens,
                                  running_remaining_tokens)

    def load_state(self, now: float, consume: bool = False) -> LoadState:
        """The load seen at `now`; `consume` starts a new queue-averaging window (decide() does)."""
        return self.tracker.load_state(now, consume)

    # --- predictions --------------------------------------------------------------------------------------------
    def predict(self, prefill_percent: float, decode_percent: float, load: LoadState) -> SplitPrediction:
        """What one split is predicted to do under `load` (the terms: the module docstring)."""
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
        slot_s = self.decode_slot_s(load, d_share)
        backlog = self.queued_s(load, p_share, slot_s)
        batch, context = self.steady_batch(load, d_share, 1.0 / per_request)
        swing = self.capped_swing(batch)
        tpot = self.decode_model.predict_features(decode_features(batch * swing, context * swing), d_share)
        p_tpot = tpot_attainment(tpot, cfg.slo_tpot_ms / 1000, cfg.tpot_sigma)
        p_ttft, ttft = ttft_attainment(own, cfg.slo_ttft_ms / 1000, per_request, load.arrival_rate, backlog,
                                       cfg.horizon_s, slot_s)
        offered = load.arrival_rate + load.waiting_requests / cfg.horizon_s
        kept = queue_kept_share(own, cfg.slo_ttft_ms / 1000, backlog, load.arrival_rate * max(per_request, slot_s),
                                2 * cfg.horizon_s)
        served = self.served_share(offered, 1.0 / max(per_request, slot_s), p_tpot, kept)
        return SplitPrediction(prefill_percent, decode_percent, float(1000 * ttft), float(1000 * tpot),
                               float(p_ttft * p_tpot), float(p_ttft), float(p_tpot), float(served),
                               float(load.arrival_rate * per_request), float(batch), float(1000 * own),
                               float(1000 * backlog), float(load.arrival_rate * slot_s))

    def queued_s(self, load: LoadState, p_share: float, slot_s: float) -> float:
        """b: seconds of prefill queued ahead of a newcomer now, or of decode-slot frees past the free slots
        (requests past them wait for one, and a slot frees every slot_s seconds), whichever is longer."""
        cfg, backlog = self.config, 0.0
        if load.waiting_tokens > 0:
            steps = max(1.0, load.waiting_tokens / cfg.prefill_token_budget)
            backlog = self.prefill_model.predict_features(
                np.array([steps, load.waiting_tokens, load.waiting_attn]), p_share)
        if slot_s > 0:
            free = max(0.0, float(cfg.max_decode_batch or 0) - load.decode_batch)
            backlog = max(backlog, self.slot_wait_s(load, load.waiting_requests - free, slot_s))
        return backlog

    def slot_wait_s(self, load: LoadState, past: float, slot_s: float) -> float:
        """Seconds until `past` more decode slots free: the running requests' own ends where known (the k-th
        soonest to finish frees the k-th slot after its tokens left x one full-batch step), new requests' slot_s
        each beyond them. Sized from new requests alone, slots behind a batch of 1k-token outputs looked free
        4x sooner than they came, and the policy gave prefill SMs that could only wait (H100, 2026-12-08)."""
        if past <= 0:
            return 0.0
        frees = load.slot_free_tokens
        if not frees or load.mean_output_tokens <= 0:
            return past * slot_s
        step = slot_s * float(self.config.max_decode_batch or 0) / load.mean_output_tokens  # TPOT at the cap
        k = max(1, math.ceil(past - 1e-9))
        if k <= len(frees):
            return frees[k - 1] * step
        return frees[-1] * step + (past - len(frees)) * slot_s

    @staticmethod
    def batch_swing(batch: float) -> float:
        """The batch a request decodes in swings by about sqrt(B) around B (Poisson arrivals): TPOT is judged one
        standard deviation up, where its 0.84 quantile is."""
        return 1.0 + 1.0 / math.sqrt(batch)

    def capped_swing(self, batch: float) -> float:
        """The swing, never past the engine's cap on running requests: uncapped, a batch at the cap of 64 was
        judged at 72 sequences, 25.6 ms against 22-24 ms run (H100, 2026-12-08, RESULTS.md)."""
        swing, cap = self.batch_swing(batch), self.config.max_decode_batch
        if cap is not None and batch * swing > cap:
            return max(1.0, cap / batch)
        return swing

    @property
    def by_ttft(self) -> bool:
        """Whether splits that tie on A and G rank by mean TTFT: only where moves are cheap."""
        return self.config.cheap_moves

    @staticmethod
    def served_share(offered_rate: float, admit_rate: float, p_tpot: float, kept: float) -> float:
        """G: the share of the offered requests/s this split admits, times the chance their TPOT holds, times the
        share of twice the horizon its queue stays within the TTFT SLO (`kept`). Without `kept`, a split that
        held TPOT while its queue grew counted what it admitted as served: on an H100 it took prefill down to 44
        SMs in a long-prompt phase, and the backlog failed the next phase too (RESULTS.md, 2026-12-07 third)."""
        return (1.0 if offered_rate <= admit_rate else admit_rate / offered_rate) * p_tpot * kept

    def decode_slot_s(self, load: LoadState, d_share: float) -> float:
        """Seconds of decode-slot time per request with a full batch: output tokens x TPOT at max_decode_batch /
        max_decode_batch, i.e. 1 / the most requests per second this decode share can complete (0: unknown)."""
        cap = self.config.max_decode_batch
        if cap is None or load.mean_output_tokens <= 0:
            return 0.0
        per_seq = (load.decode_context_tokens / load.decode_batch if load.decode_batch > 0
                   else load.mean_prompt_tokens + load.mean_output_tokens / 2)
        full = self.decode_model.predict_features(decode_features(cap, cap * per_seq), d_share)
        return load.mean_output_tokens * full / cap

    def steady_batch(self, load: LoadState, d_share: float, prefill_rate: float) -> tuple[float, float]:
        """(B, its context tokens): the decode batch this split settles at, B = max(running, min((lam + W / H) L
        tau, mu L tau, cap)) with tau = TPOT(B) (fixed point; the queue drains over the horizon H). Sized from the
        running batch alone, a move to more prefill SMs with a queue waiting under-predicted TPOT by 1.7x. New
        sequences hold a prompt and half an output of context each."""
        running, context = load.decode_batch, load.decode_context_tokens
        out = load.mean_output_tokens
        if out <= 0:  # no finished request yet: the running batch is all there is to go on
            if running < 1:
                return 1.0, load.mean_prompt_tokens
            return running, context
        per_new = load.mean_prompt_tokens + out / 2
        offered = load.arrival_rate + load.waiting_requests / self.config.horizon_s  # the queue drains over it
        cap = float(self.config.max_decode_batch or math.inf)
        batch = max(1.0, running)
        for _ in range(30):
            ctx = context + max(0.0, batch - running) * per_new
            tau = self.decode_model.predict_features(decode_features(batch, ctx), d_share)
            grown = max(running, min(offered * out * tau, prefill_rate * out * tau, cap), 1.0)
            if abs(grown - batch) < 1e-3 * batch:
                break
            batch = grown
        return batch, context + max(0.0, batch - running) * per_new

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
        not_ready = self.warmup_reason()
        if not_ready is not None:
            reason = "static policy" if cfg.policy == "static" else not_ready
            return self._decision(now, self._split, False, reason, None, None, (), load)
        preds = tuple(self.predict(p, d, load) for p, d in self._candidates)
        current = next(p for p in preds if (p.prefill_percent, p.decode_percent) == self._split)
        # TTFT ranks ties only where moves are cheap, and only once a request has arrived: before, every split's
        # TTFT is a few ms, and a move at start-up on 2 against 3 ms was rounding (then moved back with the load)
        by_ttft = self.by_ttft and self.tracker.seen_arrivals
        best = self._choose(preds, current, by_ttft)
        if cfg.policy == "static":
            return self._decision(now, self._split, False, "static policy", current, best, preds, load)
        # a move that wins attainment back skips the dwell where moves are cheap: the dwell only keeps moves for
        # throughput or TTFT from following noise, and holding a split that breaks TPOT for 6 s cost attainment
        urgent = best.attainment > current.attainment + cfg.tie
        if best is current:
            reason = f"current split is best ({fmt(current)})"
        elif now - self._last_switch < cfg.dwell_s and not (cfg.cheap_moves and urgent):
            reason = f"hold: dwell {now - self._last_switch:.2f}s < {cfg.dwell_s}s"
        elif not beats(best, current, cfg.tie, cfg.hysteresis, by_ttft):
            reason = f"hold: best {fmt(best)} gains under tie/hysteresis over {fmt(current)}"
        elif not self._robust(best, current, load, by_ttft):
            reason = f"hold: best {fmt(best)}, but not at the load +-{cfg.load_confidence_z} std errors"
        elif self.reverses(best, current, load):
            reason = f"hold: best {fmt(best)} moves back, but the load is the one the last move was made for"
        else:
            reason = f"move: {fmt(best)} beats {fmt(current)}"
            # a move for TTFT alone (every split met the SLOs) may be undone at once when it costs attainment
            for_slo = beats(best, current, cfg.tie, cfg.hysteresis, False)
            self._last_move = (math.copysign(1.0, best.prefill_percent - current.prefill_percent), load) \
                if for_slo else None
            self._split, self._last_switch = (best.prefill_percent, best.decode_percent), now
            self.switches += 1
            return self._decision(now, self._split, True, reason, best, best, preds, load)
        return self._decision(now, self._split, False, reason, current, best, preds, load)

    def _choose(self, preds: Sequence[SplitPrediction], current: SplitPrediction, by_ttft: bool) -> SplitPrediction:
        """Highest A; within `tie` of it, highest G; within `tie` again, lowest T (cheap moves) or the current."""
        tie = self.config.tie
        top_a = max(p.attainment for p in preds)
        near = [p for p in preds if p.attainment >= top_a - tie]
        top_g = max(p.served for p in near)
        near = [p for p in near if p.served >= top_g - tie]

        def moved(p: SplitPrediction) -> float:  # ties: fewest SMs moved
            return abs(p.prefill_percent - current.prefill_percent)

        if by_ttft:  # a move for TTFT alone enters only splits at a quarter of the tie from the
            # top (and leaves below the full tie): a band, or a batch swinging by sqrt(B) flips the choice
            top_near = max(p.attainment for p in near)
            calm = [p for p in near if p.attainment >= top_near - tie / 4 or p is current]
            return min(calm, key=lambda p: (p.ttft_ms, moved(p)))
        if current in near:
            return current
        return max(near, key=lambda p: (p.attainment, p.served, -moved(p)))

    @staticmethod
    def rescues(best: SplitPrediction, current: SplitPrediction, load: LoadState) -> bool:
        """The current split fails most requests with a queue waiting while the best serves most: move now, the
        load band does not apply. Right after a change of load the band is wide (its estimate rests on the
        latest 20 arrivals), and its light end kept a split that could not keep up for 8 s while 12 requests
        queued (simulation, a phase of 4k prompts after one of 256)."""
        return current.attainment < 0.5 <= best.attainment and load.waiting_requests >= 1

    def reverses(self, best: SplitPrediction, current: SplitPrediction, load: LoadState) -> bool:
        """A move back against the last move (one made for A or G) under the load that move was made for (not
        `load_moved` by CHANGE_Z standard errors, as the tracker reads a change) is not taken. Each split is
        judged from the queue the other one left, so between two neighbours the choice flipped with the queue,
        76 <-> 84 SMs every 2-8 s for a whole phase (simulation, granted SM grid); a change of load frees the
        way back. (Freed after 2H, or at 2 standard errors, the way back was taken 40 s later on a 0.021 gain
        in A: hypothesis found both.)"""
        if self._last_move is None:
            return False
        direction, then = self._last_move
        if (best.prefill_percent - current.prefill_percent) * direction >= 0:
            return False
        return not load_moved(then, load, CHANGE_Z, self.config.hysteresis)

    def _robust(self, best: SplitPrediction, current: SplitPrediction, load: LoadState, by_ttft: bool) -> bool:
        # a rate measured from a hundred Poisson arrivals wanders by ~10%, and TTFT near saturation amplifies
        # that: move only if the current split does not beat the best one at either end of the estimate's band.
        # A move for TTFT alone must also keep TPOT at the heavy end: moving 80 -> 88 SMs for a 30% lower TTFT
        # at a TPOT that held only at the rate measured went back 2 s later in simulation, as the batch grew
        cfg = self.config
        if self.rescues(best, current, load):
            return True
        ttft_only = not beats(best, current, cfg.tie, cfg.hysteresis, False)
        for z in (-cfg.load_confidence_z, cfg.load_confidence_z) if cfg.load_confidence_z > 0 else ():
            shifted = load.shifted(z)
            b = self.predict(best.prefill_percent, best.decode_percent, shifted)
            c = self.predict(current.prefill_percent, current.decode_percent, shifted)
            if beats(c, b, cfg.tie, cfg.hysteresis, by_ttft):
                return False
            if ttft_only and z > 0 and b.tpot_attainment < 1 - cfg.tie / 4:
                return False
        return True

    def _decision(self, now: float, split: tuple[float, float], changed: bool, reason: str,
                  predicted: SplitPrediction | None, best: SplitPrediction | None,
                  preds: tuple[SplitPrediction, ...], load: LoadState) -> Decision:
        total = self.config.total_sms
        return Decision(now, split[0], split[1], round(total * split[0] / 100), round(total * split[1] / 100),
                        changed, reason, predicted, best, preds, load)
