"""The engine Protocol the server types against, and the table of engine metrics: every row reads a real
EngineStats field, every series exists from the first scrape, and the names, kinds, help texts and labels are
the ones scrapers already know."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fake_engine import FakeEngine

from semipd_runtime import EngineStats
from semipd_server.engine_protocol import ServedEngine, ServedTokenizer
from semipd_server.metrics import ENGINE_METRICS, ServerMetrics

# the engine-fed families as served before the table (name -> type, help, labels besides model_name)
KNOWN = {
    "semipd:num_requests_running": ("gauge", "Requests the engine is running", ()),
    "semipd:num_requests_waiting": ("gauge", "Requests waiting in the engine's queue", ()),
    "semipd:kv_pages_used": ("gauge", "KV cache pages held by requests (cached-evictable ones excluded)", ()),
    "semipd:kv_pages_total": ("gauge", "KV cache pages in the pool", ()),
    "semipd:kv_cache_usage_perc": ("gauge", "Fraction of KV pages in use (0..1)", ()),
    "semipd:prefix_cache_pages": ("gauge", "KV pages in the radix prefix cache", ()),
    "semipd:prefix_cache_evictable_pages": (
        "gauge", "Cached KV pages no request holds (reusable or freed on demand)", ()),
    "semipd:prefix_cache_hit_tokens": ("counter", "Prompt tokens served from the prefix cache", ()),
    "semipd:prefix_cache_query_tokens": ("counter", "Prompt tokens looked up in the prefix cache", ()),
    "semipd:sm_split": ("gauge", "SMs granted to each role (0 when not partitioned)", ("role",)),
    "semipd:prefill_sm_count": ("gauge", "SMs granted to the prefill worker (0 when not partitioned)", ()),
    "semipd:decode_sm_count": ("gauge", "SMs granted to the decode worker (0 when not partitioned)", ()),
    "semipd:sm_percent": ("gauge", "Current SM split in percent of the device, per role (semi-pd)", ("role",)),
    "semipd:repartitions": ("counter", "SM re-partitions that took effect", ()),
    "semipd:repartition_latency_seconds": ("gauge", "Last re-partition: request to new split in effect", ()),
    "semipd:predicted_ttft_seconds": ("gauge", "TTFT the slo policy predicts at the current split", ()),
    "semipd:slo_predicted_attainment": (
        "gauge", "Share of requests the slo policy predicts within both SLOs at the current split", ()),
    "semipd:predicted_tpot_seconds": ("gauge", "TPOT the slo policy predicts at the current split", ()),
    "semipd:slo_decisions": ("counter", "Decisions the slo policy made", ()),
}


def test_fake_engine_satisfies_the_protocol() -> None:
    eng = FakeEngine()
    assert isinstance(eng, ServedEngine) and isinstance(eng.tokenizer, ServedTokenizer)
    assert isinstance(eng.stats(), EngineStats) and isinstance(eng.refresh_stats(), EngineStats)


def test_every_row_reads_an_engine_stats_field() -> None:
    fields = set(EngineStats.__struct_fields__) | {"kv_cache_usage"}
    for row in ENGINE_METRICS:
        assert row.field in fields, row
        assert row.kind in ("gauge", "counter"), row
        assert isinstance(getattr(EngineStats(), row.field), (int, float)), row
    by_name: dict[str, set[tuple[str, str]]] = {}
    for row in ENGINE_METRICS:
        by_name.setdefault(row.name, set()).add((row.kind, row.doc))
    assert all(len(v) == 1 for v in by_name.values())  # one family per name


def scrape(m: ServerMetrics) -> dict[str, tuple[str, str, dict[tuple[str, ...], float]]]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        values = {tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")): s.value
                  for s in fam.samples if not s.name.endswith("_created")}
        out[fam.name] = (fam.type, fam.documentation, values)
    return out


def test_engine_families_keep_their_names_types_help_and_labels() -> None:
    got = scrape(ServerMetrics("m"))
    assert {row.name for row in ENGINE_METRICS} == set(KNOWN)
    for name, (kind, doc, extra) in KNOWN.items():
        fam = name.removesuffix("_total") if kind == "counter" else name
        gtype, gdoc, values = got[fam]
        assert (gtype, gdoc) == (kind, doc), name
        assert values, f"{name} has no series before the first engine report"
        for labels in values:
            assert tuple(k for k, _ in labels) == extra, name
    # defaults before any report: zero
    assert got["semipd:slo_predicted_attainment"][2] == {(): 0.0}
    assert got["semipd:sm_split"][2] == {(("role", "decode"),): 0.0, (("role", "prefill"),): 0.0}


def test_update_sets_gauges_and_follows_totals() -> None:
    m = ServerMetrics("m")
    m.update_engine_stats(EngineStats(num_running=3, pages_used=5, pages_total=20, decode_sm=7,
                                      prefix_hit_tokens=10, slo_decisions=2))
    m.update_engine_stats(EngineStats(num_running=1, pages_used=5, pages_total=20, decode_sm=7,
                                      prefix_hit_tokens=16, slo_decisions=2))
    got = scrape(m)
    assert got["semipd:num_requests_running"][2] == {(): 1.0}
    assert got["semipd:kv_cache_usage_perc"][2] == {(): pytest.approx(0.25)}
    assert got["semipd:sm_split"][2][(("role", "decode"),)] == 7.0
    assert got["semipd:prefix_cache_hit_tokens"][2] == {(): 16.0}
    assert got["semipd:slo_decisions"][2] == {(): 2.0}
    m.update_engine_stats(EngineStats(prefix_hit_tokens=4))  # a restarted engine counts from 0 again
    m.update_engine_stats(EngineStats(prefix_hit_tokens=6))
    assert scrape(m)["semipd:prefix_cache_hit_tokens"][2] == {(): 18.0}
