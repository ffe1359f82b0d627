"""SLO partition policy: CLI flags, their errors, and the SM-split / re-partition metrics."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from semipd_runtime import EngineStats
from semipd_server.cli import build_parser, engine_kwargs, main
from semipd_server.metrics import ServerMetrics


def test_slo_flags_map_onto_engine_kwargs() -> None:
    kw = engine_kwargs(build_parser().parse_args([]))
    assert kw["partition_policy"] == "static"  # default: today's fixed split
    argv = ["--mode", "semi-pd", "--partition-policy", "slo", "--slo-ttft-ms", "250", "--slo-tpot-ms", "12.5",
            "--repartition-interval-s", "0.5"]
    kw = engine_kwargs(build_parser().parse_args(argv))
    assert (kw["partition_policy"], kw["slo_ttft_ms"], kw["slo_tpot_ms"], kw["repartition_interval_s"]) == (
        "slo", 250.0, 12.5, 0.5)


def test_help_lists_slo_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--partition-policy", "--slo-ttft-ms", "--slo-tpot-ms", "--repartition-interval-s"):
        assert flag in out


@pytest.mark.parametrize("argv", [
    ["--partition-policy", "dynamic"],
    ["--slo-ttft-ms", "0"],
    ["--slo-tpot-ms", "-3"],
    ["--slo-tpot-ms", "fast"],
    ["--repartition-interval-s", "inf"],
    ["--repartition-interval-s", "nan"],
])
def test_bad_slo_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_slo_policy_needs_semipd_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--partition-policy", "slo", "--port", "0"])  # fails before binding or loading anything
    assert info.value.code == 2
    assert "--partition-policy slo needs --mode semi-pd" in capsys.readouterr().err


def samples(m: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def test_split_and_repartition_metrics() -> None:
    m = ServerMetrics("test")
    before = samples(m)
    for name in ("semipd:prefill_sm_count", "semipd:decode_sm_count", "semipd:repartitions_total",
                 "semipd:predicted_ttft_seconds", "semipd:predicted_tpot_seconds"):
        assert before[(name, ())] == 0, name  # every series exists from the first scrape
    stats = EngineStats(prefill_sm=40, decode_sm=92, prefill_sm_percent=30.3, decode_sm_percent=69.7,
                        repartitions=2, slo_decisions=5, predicted_ttft_s=0.25, predicted_tpot_s=0.012,
                        last_repartition_s=0.003, predicted_attainment=0.97)
    m.update_engine_stats(stats)
    m.update_engine_stats(msgspec.structs.replace(stats, repartitions=3))
    after = samples(m)
    assert after[("semipd:prefill_sm_count", ())] == 40 and after[("semipd:decode_sm_count", ())] == 92
    assert after[("semipd:sm_percent", (("role", "prefill"),))] == pytest.approx(30.3)
    assert after[("semipd:repartitions_total", ())] == 3  # running totals from the engine, not summed twice
    assert after[("semipd:slo_decisions_total", ())] == 5
    assert after[("semipd:predicted_ttft_seconds", ())] == 0.25
    assert after[("semipd:predicted_tpot_seconds", ())] == 0.012
    assert after[("semipd:slo_predicted_attainment", ())] == 0.97
    assert after[("semipd:repartition_latency_seconds", ())] == 0.003
