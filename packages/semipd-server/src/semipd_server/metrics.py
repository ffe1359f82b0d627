"""Prometheus metrics with vLLM-like names (`semipd:` prefix), in a per-app CollectorRegistry so that several
apps (tests) never share or double-register series."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from semipd_runtime import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

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
        self.running = gauge("semipd:num_requests_running", "Requests the engine is running")
        self.waiting = gauge("semipd:num_requests_waiting", "Requests waiting in the engine's queue")
        self.in_flight = gauge("semipd:num_requests_in_flight", "HTTP generation requests being served")
        self.pages_used = gauge("semipd:kv_pages_used",
                                "KV cache pages held by requests (cached-evictable ones excluded)")
        self.cache_pages = gauge("semipd:prefix_cache_pages", "KV pages in the radix prefix cache")
        self.cache_evictable = gauge("semipd:prefix_cache_evictable_pages",
                                     "Cached KV pages no request holds (reusable or freed on demand)")
        self.cache_hit_tokens = counter("semipd:prefix_cache_hit_tokens",
                                        "Prompt tokens served from the prefix cache")
        self.cache_query_tokens = counter("semipd:prefix_cache_query_tokens",
                                          "Prompt tokens looked up in the prefix cache")
        self.pages_total = gauge("semipd:kv_pages_total", "KV cache pages in the pool")
        self.kv_usage = gauge("semipd:kv_cache_usage_perc", "Fraction of KV pages in use (0..1)")
        self.sm_split = gauge("semipd:sm_split", "SMs granted to each role (0 when not partitioned)", "role")
        self.prefill_sm_count = gauge("semipd:prefill_sm_count",
                                      "SMs granted to the prefill worker (0 when not partitioned)")
        self.decode_sm_count = gauge("semipd:decode_sm_count",
                                     "SMs granted to the decode worker (0 when not partitioned)")
        self.sm_percent = gauge("semipd:sm_percent",
                                "Current SM split in percent of the device, per role (semi-pd)", "role")
        self.repartitions = counter("semipd:repartitions", "SM re-partitions that took effect")
        self.repartition_latency = gauge("semipd:repartition_latency_seconds",
                                         "Last re-partition: request to new split in effect")
        self.predicted_ttft = gauge("semipd:predicted_ttft_seconds",
                                    "TTFT the slo policy predicts at the current split")
        self.ttft_correction = gauge("semipd:slo_ttft_correction",
                                     "Measured / modelled TTFT factor the slo policy applies")
        self.predicted_tpot = gauge("semipd:predicted_tpot_seconds",
                                    "TPOT the slo policy predicts at the current split")
        self.slo_decisions = counter("semipd:slo_decisions", "Decisions the slo policy made")
        self._engine_totals = (("repartitions", self.repartitions), ("slo_decisions", self.slo_decisions),
                               ("prefix_hit_tokens", self.cache_hit_tokens),
                               ("prefix_query_tokens", self.cache_query_tokens))
        self._seen = {key: 0.0 for key, _ in self._engine_totals}  # engine totals already counted
        self.draining = gauge("semipd:server_draining", "1 while the server drains before exit")
        for fam in (
            self.running,
            self.waiting,
            self.in_flight,
            self.pages_used,
            self.pages_total,
            self.kv_usage,
            self.cache_pages,
            self.cache_evictable,
            self.draining,
            self.prefill_sm_count,
            self.decode_sm_count,
            self.repartition_latency,
            self.predicted_ttft,
            self.predicted_tpot,
        ):
            fam.labels(model_name).set(0)
        # create the unlabelled-looking children now so that every series exists (at 0) from the first scrape
        for fam in (self.ttft, self.tpot, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens,
                    self.repartitions, self.slo_decisions, self.cache_hit_tokens, self.cache_query_tokens):
            fam.labels(model_name)
        for reason in ("stop", "length"):
            self.request_success.labels(model_name, reason)
        self.aborted.labels(model_name)

    def update_engine_stats(self, stats: Mapping[str, float]) -> None:
        m = self.model_name
        self.running.labels(m).set(stats.get("num_running", 0))
        self.waiting.labels(m).set(stats.get("num_waiting", 0))
        used, total = stats.get("pages_used", 0), stats.get("pages_total", 0)
        self.pages_used.labels(m).set(used)
        self.pages_total.labels(m).set(total)
        self.kv_usage.labels(m).set(used / total if total else 0.0)
        for role in ("prefill", "decode"):
            self.sm_split.labels(m, role).set(stats.get(f"{role}_sm", 0))
            self.sm_percent.labels(m, role).set(stats.get(f"{role}_sm_percent", 0))
        self.prefill_sm_count.labels(m).set(stats.get("prefill_sm", 0))
        self.decode_sm_count.labels(m).set(stats.get("decode_sm", 0))
        self.repartition_latency.labels(m).set(stats.get("last_repartition_s", 0))
        self.predicted_ttft.labels(m).set(stats.get("predicted_ttft_s", 0))
        self.predicted_tpot.labels(m).set(stats.get("predicted_tpot_s", 0))
        self.ttft_correction.labels(m).set(stats.get("ttft_correction", 1.0))
        self.cache_pages.labels(m).set(stats.get("cached_pages", 0))
        self.cache_evictable.labels(m).set(stats.get("evictable_pages", 0))
        for key, counter in self._engine_totals:
            # the engine reports running totals; a counter only goes up (a restarted engine starts again at 0)
            total = float(stats.get(key, 0))
            if total > self._seen[key]:
                counter.labels(m).inc(total - self._seen[key])
            self._seen[key] = total

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
