"""Prometheus families of PD disaggregation (a prefill instance's KV transfers, either side's rooms waiting),
built at scrape time from the engine core's last report: transfer latency histogram, bytes, failures and the
bootstrap queue depth."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from semipd_runtime.pd_prefill import LATENCY_BUCKETS
from semipd_server.engine_protocol import ServedEngine


class PdCollector:
    def __init__(self, engine: ServedEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        if self.engine.config.semi_pd.disaggregation_mode == "null":
            return
        s = self.engine.stats()  # the core's last report
        labels = ["model_name"]
        counts = list(s.pd_latency_counts) or [0] * (len(LATENCY_BUCKETS) + 1)
        cumulative, total = [], 0
        for le, c in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
            total += c
            cumulative.append((le, total))
        h = HistogramMetricFamily("semipd:pd_kv_transfer_seconds", "KV transfer time per request (prefill side)",
                                  labels=labels)
        h.add_metric([self.model_name], cumulative, s.pd_latency_sum)
        yield h
        for name, doc, total in (
            ("semipd:pd_kv_transfer_bytes", "KV bytes sent to decode instances", s.pd_bytes),
            ("semipd:pd_kv_transfer_failures", "KV transfers that failed or timed out", s.pd_transfer_failures),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric([self.model_name], total)
            yield counter
        g = GaugeMetricFamily("semipd:pd_bootstrap_queue", "rooms waiting for their peer or their KV",
                              labels=labels)
        g.add_metric([self.model_name], s.pd_bootstrap_queue)
        yield g
