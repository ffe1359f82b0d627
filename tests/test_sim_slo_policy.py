"""benchmarks/sim_slo_policy.py: the closed-loop CPU simulation runs, serves a light load within SLO, and reproduces
(then guards against) the two causes of the SLO policy's losses in the H200 logs (benchmarks/RESULTS.md, fourth
session): (a) under overload, a move to a split whose TTFT is hopeless next to another split's; (b) TPOT predicted
from the running batch alone, which a split that prefills faster grows within seconds of the move."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sim_slo_policy as sim

OVERLOAD = [6.0, 7.5, 9.0, 10.0]  # 8B shape, TPOT 15 ms: the static split's knee is near 8 req/s
SEEDS = range(3)


def test_light_load_meets_both_slos_and_static_never_moves() -> None:
    (rate, attained, lo, hi), = sim.simulate("8b", "static", [3.0], (2000.0, 25.0), seed=0, duration_s=10.0)
    assert rate == 3.0 and attained == 100.0
    assert lo == hi == 76  # decode 40% runs as green contexts grant it: 53 decode SMs rounded up to 56, prefill 76


def test_overload_misses_slos() -> None:
    (_, attained, _, _), = sim.simulate("8b", "static", [20.0], (2000.0, 25.0), seed=0, duration_s=10.0)
    assert attained < 30.0  # 20 req/s of 3k-token prompts is ~2.5x what 80 prefill SMs serve


@pytest.fixture(scope="module")
def overload_runs() -> list[sim.SimRun]:
    return [sim.run("8b", "slo", [[sim.stationary(r)] for r in OVERLOAD], (2000.0, 15.0), s) for s in SEEDS]


def test_a_no_move_to_a_hopeless_ttft_when_a_far_better_one_is_on_offer(overload_runs: list[sim.SimRun]) -> None:
    """(a) The old tier 1 ("best TTFT that keeps TPOT") moved to the only split that held TPOT with its margin even
    when its TTFT was 0.002 of the SLO and another split's 15x better (H200: 88 -> 24 prefill SMs). A move that
    raises the predicted TTFT to hopeless while a split 3x better is on offer fails here; one that lowers it (from
    8 s to 4.7 s, the best attainment on offer) is no such move."""
    bad = []
    for run in overload_runs:
        split = run.server.p.config.initial_split
        for d in run.server.decisions:
            best_ttft = min(c.ttft_ms for c in d.candidates) if d.candidates else 0.0
            left = next((c for c in d.candidates if (c.prefill_percent, c.decode_percent) == split), None)
            if d.changed and d.predicted is not None and d.predicted.ttft_ms > max(3 * best_ttft, 2000.0) \
                    and (left is None or d.predicted.ttft_ms > left.ttft_ms):
                bad.append((round(d.time), d.prefill_sms, round(d.predicted.ttft_ms), round(best_ttft)))
            split = d.split
    assert not bad, f"moves to a hopeless TTFT (t, prefill SMs, predicted TTFT, best TTFT): {bad}"


def test_b_tpot_predicted_at_a_move_holds_after_it(overload_runs: list[sim.SimRun]) -> None:
    """(b) TPOT after a move: the decode steps of the next 5 s stay within 25% of what the move predicted. Sized
    from the running batch alone, a move to more prefill SMs with a queue waiting was predicted at 12.9 ms for
    a batch of 5 and ran at 22 ms within 4 s, as the queue reached decode (H200, 104 prefill SMs)."""
    bad = []
    for run in overload_runs:
        for d in run.server.decisions:
            after = run.server.decode_step_mean(d.time + 1.0, d.time + 6.0)
            if d.changed and d.predicted is not None and after is not None \
                    and 1000 * after > 1.25 * d.predicted.tpot_ms:
                bad.append((round(d.time), d.prefill_sms, round(d.predicted.tpot_ms, 1), round(1000 * after, 1)))
    assert not bad, f"TPOT under-predicted at moves (t, prefill SMs, predicted ms, measured ms): {bad}"


def test_slo_policy_is_no_worse_than_static_past_the_knee(overload_runs: list[sim.SimRun]) -> None:
    static = [sim.run("8b", "static", [[sim.stationary(r)] for r in OVERLOAD], (2000.0, 15.0), s) for s in SEEDS]
    for i, rate in enumerate(OVERLOAD):
        slo_att = sum(r.columns[i].attainment for r in overload_runs) / len(SEEDS)
        static_att = sum(r.columns[i].attainment for r in static) / len(SEEDS)
        assert slo_att >= static_att - 3.0, (rate, slo_att, static_att)
    for run in overload_runs:  # no flapping: at most one reversal per change of rate
        assert run.moves_back <= len(OVERLOAD) - 1, [(d.time, d.prefill_sms) for d in run.server.decisions
                                                     if d.changed]


def test_phased_load_beats_the_best_static_split_without_flapping() -> None:
    """Long prompts (prefill-bound), then short prompts with long outputs (decode-bound), twice: no static split
    serves both (decode 40% is the best static one, in the oracle of sim_slo_policy.py --oracle), a policy that
    follows the phases does. Moves back: one per phase change (three), plus the start, where the first move is
    made from a few seconds of arrivals (3 and 3; 9 and 15 without the `reverses` rule)."""
    for seed in (0, 1):
        slo = sim.run("8b", "slo", [sim.phased(1.0)], (2000.0, 15.0), seed)
        static = sim.run("8b", "static", [sim.phased(1.0)], (2000.0, 15.0), seed, decode_percent=40.0)
        assert slo.overall >= static.overall + 5.0, (seed, slo.overall, static.overall)
        assert slo.moves_back <= 5, [(round(d.time), d.prefill_sms) for d in slo.server.decisions if d.changed]


def test_main_prints_a_row_per_policy_and_rejects_bad_args(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--shape", "3b", "--rates", "4", "--seeds", "1", "--duration-s", "5"]) == 0
    out = capsys.readouterr().out
    assert "simulated 3b" in out and "  static          4/s: 100.0" in out and "  slo             4/s: 100.0" in out
    with pytest.raises(SystemExit):
        sim.main(["--seeds", "0"])


@pytest.mark.parametrize("tpot_ms", [15.0, 25.0])
def test_h100_phased_load_is_served_at_least_as_well_as_the_best_static_split(tpot_ms: float) -> None:
    """The H100 run of gpu_suite.sh slo_phased (25 s phases; the sim's 8b-h100 step times are fitted to its
    logs): the policy lost 0.61x to the best static split there. Two causes, both reproduced here before the fix:
    G counted what a split admitted as served while its queue grew (the backlog then failed the next phase), and
    the output length lagged a phase of longer outputs by a whole output (TPOT sized for a quarter of the batch)."""
    phases, seeds = [sim.phased(1.0, duration_s=25.0)], (0, 1, 2)
    slo = [sim.run("8b-h100", "slo", phases, (2000.0, tpot_ms), s) for s in seeds]
    best = max(sum(sim.run("8b-h100", "static", phases, (2000.0, tpot_ms), s, decode_percent=d).overall
                   for s in seeds) / len(seeds) for d in (40.0, 50.0))
    mean = sum(r.overall for r in slo) / len(seeds)
    assert mean >= best, (mean, best)  # before the fix: 52.2 against 61.8 at 15 ms, 79.7 against 82.1 at 25 ms
    # 3 phase changes in 100 s; up to 5 moves back (seed 0 at 25 ms) is more than one per change: RESULTS.md
    assert all(r.moves_back <= 5 for r in slo), [r.moves_back for r in slo]


def test_a_failing_split_with_a_queue_moves_without_waiting_for_the_load_band() -> None:
    """Phases of 4k-token prompts with 64-token outputs after 256-token prompts with 1k-token outputs (H100 step
    times, TPOT 15 ms): where the prefill phase began, the load band's light end (wide: 20 arrivals since the
    change) kept the decode phase's split for 8 s while 12 requests queued; the policy lost to the best static
    split (89.5 against 95.1). Moving at once when the current split fails most requests and another serves most
    (rescue) beats it."""
    phases = [sim.bench_phases("prefill:25:4.5:4096:64,decode:25:4.5:256:1024")]
    seeds, slo_ms = (0, 1, 2), (2000.0, 15.0)
    best = max(sum(sim.run("8b-h100", "static", phases, slo_ms, s, decode_percent=d).overall for s in seeds)
               / len(seeds) for d in (40.0, 45.0))
    mean = sum(sim.run("8b-h100", "slo", phases, slo_ms, s).overall for s in seeds) / len(seeds)
    # on the SM grid green contexts grant, d40 (76 prefill SMs) suits both phases: 97.6 against the policy's 97.2
    assert mean >= best - 1.0, (mean, best)
    blind = sum(sim.run("8b-h100", "slo", phases, slo_ms, s, ablate=["rescue"]).overall for s in seeds) / len(seeds)
    assert blind < mean - 3.0, (blind, mean)  # without the rescue: 90.1


def test_every_candidate_runs_on_the_sms_it_asks_for() -> None:
    """--grain 8 runs a split on the SMs green contexts grant on Hopper: decode's rounded up to a multiple of 8,
    prefill the rest (d40 asks 53 decode SMs and runs on 56, prefill on 76). The policy's candidates are those
    granted splits, so what it judges is what runs: on the old grid (prefill on multiples of 8) every split ran 4
    prefill SMs short, and the H100 log showed 88 asked where 84 ran."""
    from sim_engine import TOTAL_SMS, granted_shares

    from semipd_runtime.slo_config import nearest_split, sm_split_candidates

    d40 = (100 - 40.0, 40.0)
    assert granted_shares(d40, 0) == (0.6, 0.4)
    prefill, decode = granted_shares(d40, 8)
    assert (round(prefill * TOTAL_SMS), round(decode * TOTAL_SMS)) == (76, 56)
    assert granted_shares((99.0, 1.0), 8)[1] * TOTAL_SMS == pytest.approx(8)  # never below one grain
    candidates = sm_split_candidates(TOTAL_SMS, 8)
    for c in candidates:
        assert granted_shares(c, 8) == pytest.approx((c[0] / 100, c[1] / 100))
    for d in (25.0, 40.0, 45.0, 50.0, 70.0):  # what --decode-sm-percent d runs as
        want = granted_shares((100 - d, d), 8)
        assert nearest_split(candidates, (100 - d, d)) == pytest.approx((100 * want[0], 100 * want[1]))
    assert sim.nearest_split(50.0) == pytest.approx((100 * 60 / 132, 100 * 72 / 132))
