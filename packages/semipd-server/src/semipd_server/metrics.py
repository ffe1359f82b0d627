"""Prometheus metrics with vLLM's names under the `semipd:` prefix (README: mapping a vLLM dashboard), in a
per-app CollectorRegistry so that several apps (tests) never share or double-register series. No `*_created`
series: prometheus-client's creation timestamps double every counter and histogram family, and vLLM drops them
too."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from semipd_runtime import EngineStats, RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # process-wide: every registry of this server

_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TPOT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True, slots=True)
class EngineMetric:
    """One series fed from the engine's stats. kind "gauge": set to the field's value; "counter": the field is a
    running total since the engine started, which the counter follows up (a restarted engine starts again at 0).
    Rows that share a name are one family, told apart by their `role` label."""

    name: str
    kind: str  # "gauge" | "counter"
    doc: str
    field: str  # the EngineStats field (or property) it reads
    role: str | None = None


_SM_SPLIT_DOC = "SMs granted to each role (0 when not partitioned)"
_SM_PERCENT_DOC = "Current SM split in percent of the device, per role (semi-pd)"
ENGINE_METRICS: tuple[EngineMetric, ...] = (
    EngineMetric("semipd:num_requests_running", "gauge", "Requests the engine is running", "num_running"),
    EngineMetric("semipd:num_requests_waiting", "gauge", "Requests waiting in the engine's queue", "num_waiting"),
    EngineMetric("semipd:kv_pages_used", "gauge", "KV cache pages held by requests (cached-evictable ones excluded)",
                 "pages_used"),
    EngineMetric("semipd:kv_pages_total", "gauge", "KV cache pages in the pool", "pages_total"),
    EngineMetric("semipd:kv_cache_usage_perc", "gauge", "Fraction of KV pages in use (0..1)", "kv_cache_usage"),
    EngineMetric("semipd:prefix_cache_pages", "gauge", "KV pages in the radix prefix cache", "cached_pages"),
    EngineMetric("semipd:prefix_cache_evictable_pages", "gauge",
                 "Cached KV pages no request holds (reusable or freed on demand)", "evictable_pages"),
    EngineMetric("semipd:prefix_cache_hit_tokens", "counter", "Prompt tokens served from the prefix cache",
                 "prefix_hit_tokens"),
    EngineMetric("semipd:prefix_cache_query_tokens", "counter", "Prompt tokens looked up in the prefix cache",
                 "prefix_query_tokens"),
    EngineMetric("semipd:sm_split", "gauge", _SM_SPLIT_DOC, "prefill_sm", role="prefill"),
    EngineMetric("semipd:sm_split", "gauge", _SM_SPLIT_DOC, "decode_sm", role="decode"),
    EngineMetric("semipd:prefill_sm_count", "gauge", "SMs granted to the prefill worker (0 when not partitioned)",
                 "prefill_sm"),
    EngineMetric("semipd:decode_sm_count", "gauge", "SMs granted to the decode worker (0 when not partitioned)",
                 "decode_sm"),
    EngineMetric("semipd:sm_percent", "gauge", _SM_PERCENT_DOC, "prefill_sm_percent", role="prefill"),
    EngineMetric("semipd:sm_percent", "gauge", _SM_PERCENT_DOC, "decode_sm_percent", role="decode"),
    EngineMetric("semipd:repartitions", "counter", "SM re-partitions that took effect", "repartitions"),
    EngineMetric("semipd:repartition_latency_seconds", "gauge", "Last re-partition: request to new split in effect",
                 "last_repartition_s"),
    EngineMetric("semipd:predicted_ttft_seconds", "gauge", "TTFT the slo policy predicts at the current split",
                 "predicted_ttft_s"),
    EngineMetric("semipd:slo_ttft_correction", "gauge", "Measured / modelled TTFT factor the slo policy applies",
                 "ttft_correction"),
    EngineMetric("semipd:predicted_tpot_seconds", "gauge", "TPOT the slo policy predicts at the current split",
                 "predicted_tpot_s"),
    EngineMetric("semipd:slo_decisions", "counter", "Decisions the slo policy made", "slo_decisions"),
)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        # every family is labelled by model (plus `extra` labels) and lives in this app's registry
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(name, doc, labels + list(extra), registry=r)

        def gauge(name: str, doc: str, *extra: str) -> Gauge:
            return Gauge(name, doc, labels + list(extra), registry=r)

        self.ttft = histogram("semipd:time_to_first_token_seconds",
                              "Time from arrival to the first output token", _TTFT_BUCKETS)
        self.tpot = histogram("semipd:time_per_output_token_seconds",
                              "Per request: (e2e - ttft) / (output tokens - 1)", _TPOT_BUCKETS)
        self.itl = histogram("semipd:inter_token_latency_seconds",
                             "Gap between consecutive output tokens, as streamed", _TPOT_BUCKETS)
        self.e2e = histogram("semipd:e2e_request_latency_seconds", "Time from arrival to the last token",
                             _E2E_BUCKETS)
        self.prompt_tokens = counter("semipd:prompt_tokens", "Prompt tokens of finished requests")
        self.generation_tokens = counter("semipd:generation_tokens", "Generated tokens")
        self.request_success = counter("semipd:request_success", "Finished requests by finish reason",
                                       "finished_reason")
        # vLLM/SGLang dashboards read request_success as finished work (stop|length); a completion cut short
        # (client gone, /abort_request, drain timeout, engine failure) is counted here instead, as SGLang names it
        self.aborted = counter("semipd:num_aborted_requests", "Completions aborted before they finished")
        self.request_errors = counter("semipd:request_errors",
                                      "Requests answered with an error, by HTTP status", "status")
        self.in_flight = gauge("semipd:num_requests_in_flight", "HTTP generation requests being served")
        self.draining = gauge("semipd:server_draining", "1 while the server drains before exit")
        families: dict[str, Gauge | Counter] = {}
        self._engine_series: list[tuple[EngineMetric, Gauge | Counter]] = []
        for row in ENGINE_METRICS:
            extra = ("role",) if row.role else ()
            if row.name not in families:
                make = gauge if row.kind == "gauge" else counter
                families[row.name] = make(row.name, row.doc, *extra)
            child = families[row.name].labels(model_name, *([row.role] if row.role else []))
            self._engine_series.append((row, child))
        self._seen = {row.field: 0.0 for row in ENGINE_METRICS if row.kind == "counter"}  # totals counted
        # every series exists from the first scrape: the engine's at their defaults, the server's at 0
        self.update_engine_stats(EngineStats())
        for fam in (self.in_flight, self.draining):
            fam.labels(model_name).set(0)
        for hist_or_counter in (self.ttft, self.tpot, self.itl, self.e2e, self.prompt_tokens,
                                self.generation_tokens):
            hist_or_counter.labels(model_name)
        for reason in ("stop", "length"):  # aborted requests are counted apart (num_aborted_requests_total)
            self.request_success.labels(model_name, reason)
        self.aborted.labels(model_name)

    def update_engine_stats(self, stats: EngineStats) -> None:
        for row, series in self._engine_series:
            value = float(getattr(stats, row.field))
            if isinstance(series, Gauge):
                series.set(value)
                continue
            if value > self._seen[row.field]:
                series.inc(value - self._seen[row.field])
            self._seen[row.field] = value

    def error(self, status: int) -> None:
        self.request_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self) -> RequestTracker:
        return RequestTracker(self)


class RequestTracker:
    """Latency bookkeeping of one HTTP request (all its prompts and completions); feeds the histograms."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.max_tokens_seen = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def on_output(self, out: RequestOutput) -> None:
        """Call for every streamed RequestOutput (delta fields since the previous one)."""
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if new == 0:
            return
        now = time.monotonic()
        m = self.metrics
        if self.first_token is None:
            self.first_token = now
            m.ttft.labels(m.model_name).observe(now - self.arrival)
        elif self.last_token is not None:
            gap = (now - self.last_token) / max(1, max(len(c.delta_token_ids) for c in out.outputs))
            m.itl.labels(m.model_name).observe(gap)
        self.last_token = now
        self.generation_tokens += new
        self.max_tokens_seen = max(self.max_tokens_seen, *(len(c.token_ids) for c in out.outputs))

    def on_finish(self, prompt_tokens: int, finish_reasons: list[str | None]) -> None:
        m, name = self.metrics, self.metrics.model_name
        now = time.monotonic()
        m.e2e.labels(name).observe(now - self.arrival)
        if self.first_token is not None and self.last_token is not None and self.max_tokens_seen > 1:
            m.tpot.labels(name).observe((self.last_token - self.first_token) / (self.max_tokens_seen - 1))
        m.prompt_tokens.labels(name).inc(prompt_tokens)
        m.generation_tokens.labels(name).inc(self.generation_tokens)
        for reason in finish_reasons:
            if reason in ("stop", "length"):
                m.request_success.labels(name, reason).inc()
            else:
                m.aborted.labels(name).inc()
