"""benchmarks/sim_slo_policy.py: the closed-loop CPU simulation runs, serves a light load within SLO, and the SLO
policy does at least as well as the static split on the 8B-shaped step times past the static split's knee (a
policy change that loses there should be looked at before it spends GPU time)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SIM = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_slo_policy.py"
spec = importlib.util.spec_from_file_location("sim_slo_policy", SIM)
assert spec is not None and spec.loader is not None
sim = importlib.util.module_from_spec(spec)
sys.modules["sim_slo_policy"] = sim  # dataclasses resolve their module by name
spec.loader.exec_module(sim)


def test_light_load_meets_both_slos_and_static_never_moves() -> None:
    (rate, attained, lo, hi), = sim.simulate("8b", "static", [3.0], (2000.0, 25.0), seed=0, duration_s=10.0)
    assert rate == 3.0 and attained == 100.0
    assert lo == hi == 80  # decode 40% -> the candidate nearest it: 52 decode SMs, prefill 80


def test_overload_misses_slos() -> None:
    (_, attained, _, _), = sim.simulate("8b", "static", [20.0], (2000.0, 25.0), seed=0, duration_s=10.0)
    assert attained < 30.0  # 20 req/s of 3k-token prompts is ~3x what 80 prefill SMs serve


def test_slo_policy_is_no_worse_than_static_past_the_knee() -> None:
    def mean_attainment(policy: str) -> float:
        runs = [sim.simulate("8b", policy, [8.0, 10.0], (2000.0, 25.0), seed=s) for s in range(2)]
        return sum(r[1] for run in runs for r in run) / 4

    static, slo = mean_attainment("static"), mean_attainment("slo")
    assert slo >= static, (slo, static)


def test_main_prints_a_row_per_policy_and_rejects_bad_args(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim.main(["--shape", "3b", "--rates", "4", "--seeds", "1", "--duration-s", "5"]) == 0
    out = capsys.readouterr().out
    assert "simulated 3b" in out and "  static  4: 100.0" in out and "  slo     4: 100.0" in out
    with pytest.raises(SystemExit):
        sim.main(["--seeds", "0"])
