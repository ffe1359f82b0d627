"""The SLO partitioner's SM grid (the splits green contexts grant), its move-back rule and when decode slots free
(`slo_config`, `slo_partitioner`)."""

from __future__ import annotations

import dataclasses

import pytest

from semipd_runtime.slo_config import nearest_split, sm_split_candidates
from semipd_runtime.slo_partitioner import LoadState, SloPartitioner, SloPartitionerConfig, SplitPrediction


def test_candidates_put_decode_on_the_grid_and_prefill_on_the_rest() -> None:
    """Green contexts carve decode's SMs first, rounded up to a multiple of 8 (Hopper), and prefill runs on the
    rest: every candidate is such a split, so the split judged is the split run."""
    cands = sm_split_candidates(132, 8)
    sms = [(round(p * 1.32), round(d * 1.32)) for p, d in cands]
    assert sms[0] == (12, 120) and sms[-1] == (124, 8) and len(sms) == 15
    assert all(d % 8 == 0 and p + d == 132 for p, d in sms)
    assert [p for p, _ in cands] == sorted(p for p, _ in cands)
    # a split asked for runs as the least decode share at or above it (d50: 66 SMs asked, 72 granted)
    assert nearest_split(cands, (50.0, 50.0)) == (100 * 60 / 132, 100 * 72 / 132)
    assert nearest_split(cands, (60.0, 40.0)) == (100 * 76 / 132, 100 * 56 / 132)
    assert nearest_split(cands, (1.0, 99.0)) == cands[0]  # above the grid: the most decode there is
    mps = tuple((p, 40.0) for p, _ in cands)  # MPS: decode keeps its cap, the nearest prefill share
    assert nearest_split(mps, (47.0, 40.0)) == min(mps, key=lambda c: abs(c[0] - 47.0))
    with pytest.raises(ValueError, match="sm_step"):
        sm_split_candidates(132, 0)


def test_a_move_back_waits_for_a_change_of_load() -> None:
    """Under the load the last move was made for, a move back to the other side is held: each split is judged
    from the queue the other one left, and between two neighbours the choice flipped every 2-8 s (simulation).
    A change of rate, prompt or output length frees the way back; time alone does not."""
    p = SloPartitioner(SloPartitionerConfig())
    then = LoadState(arrival_rate=6.7, mean_prompt_tokens=3000, mean_prompt_attn=4.5e6, waiting_requests=1.7,
                     waiting_tokens=5000, waiting_attn=7e6, decode_batch=8, decode_context_tokens=25000,
                     mean_output_tokens=260, arrival_rate_stderr=0.6, prompt_tokens_stderr=90,
                     prompt_attn_stderr=2e5)

    def at(sms: int) -> SplitPrediction:
        return SplitPrediction(100 * sms / 132, 100 * (132 - sms) / 132, 500, 12, 0.9, 0.9, 1.0, 1.0, 0.8, 16)

    left, current, further = at(76), at(84), at(92)
    assert not p.reverses(left, current, then)  # no move yet
    p._last_move = (1.0, then)  # moved 76 -> 84 under `then`
    now = dataclasses.replace(then, arrival_rate=8.3, waiting_requests=6.0)  # the queue moved; the rate < 3 SE
    assert p.reverses(left, current, now)
    assert not p.reverses(further, current, now)  # onwards is no move back
    assert not p.reverses(left, current, dataclasses.replace(now, arrival_rate=9.5))  # > 3 SE
    assert not p.reverses(left, current, dataclasses.replace(now, mean_prompt_tokens=1000))
    assert not p.reverses(left, current, dataclasses.replace(now, mean_output_tokens=1000))


def test_slots_free_when_the_running_requests_end() -> None:
    """Past the free decode slots a newcomer waits for the running requests' own ends (the k-th soonest frees the
    k-th slot after its tokens left x a full-batch step), not for new requests' mean output: a batch of 1k-token
    outputs at the start of a phase of 256-token ones frees its slots ~4x later than that mean says."""
    p = SloPartitioner(SloPartitionerConfig(max_decode_batch=64))
    ends = [900, 20, 1000, 40] + [950] * 60  # one running request per slot; 3 of them near their end
    p.update_queue([3000] * 3, 64, 64 * 3000, ends)
    p.observe_finish(200, 400)  # finished requests used half their max_tokens
    load = p.load_state(0.0)
    assert load.slot_free_tokens[:3] == (10.0, 20.0, 450.0) and len(load.slot_free_tokens) == 64
    slot_s = 0.2
    step = slot_s * 64 / 256  # TPOT at the cap that a slot time of 0.2 s for a 256-token output implies
    load = dataclasses.replace(load, mean_output_tokens=256.0)
    assert p.slot_wait_s(load, 0.0, slot_s) == 0.0
    assert p.slot_wait_s(load, 2.0, slot_s) == pytest.approx(20 * step)
    assert p.slot_wait_s(load, 3.0, slot_s) == pytest.approx(450 * step)  # 3x what new requests' mean says
    assert p.slot_wait_s(load, 66.0, slot_s) == pytest.approx(500 * step + 2 * slot_s)  # past every running one
    unknown = dataclasses.replace(load, slot_free_tokens=())
    assert p.slot_wait_s(unknown, 3.0, slot_s) == pytest.approx(3 * slot_s)
    with pytest.raises(ValueError, match="running_remaining_tokens"):
        p.update_queue([], 1, 10, [-1])


def test_the_decision_log_measures_prefill_busy_time_and_first_tokens() -> None:
    """Each decision window reports the share of its wall time the prefill worker ran and first tokens per second:
    against the predicted utilization and prefill rate they show time lost between prefill steps (on an H100 the
    first-token rate at 68 prefill SMs was ~20% below the model's while step times were close to it)."""
    from semipd_runtime.slo_control import SloController, SloSettings

    settings = SloSettings(partition_policy="slo")
    ctl = SloController(settings, settings.partitioner_config(132, (60.0, 40.0)))
    share = ctl.split[0] / 100
    ctl.decide(0.0)  # opens the first window
    for i in range(3):  # 3 requests, 0.4 s of prefill each, first tokens within a 2 s window
        ctl.observe_arrival(f"r{i}", 3000, 0.1 * i, 256)
        ctl.observe_prefill([3000], [0], share, 0.4)
        ctl.observe_first_token(f"r{i}", 0.5 + 0.5 * i)
    assert ctl.decide(2.0) is not None
    assert ctl.measured["prefill_busy"] == pytest.approx(1.2 / 2.0)
    assert ctl.measured["first_tokens_per_s"] == pytest.approx(3 / 2.0)
    assert ctl.decide(3.0) is None  # not due yet: the window keeps running
    assert ctl.decide(4.0) is not None  # a window with no prefill
    assert ctl.measured["prefill_busy"] == 0.0 and ctl.measured["first_tokens_per_s"] == 0.0
