"""Prometheus metrics (`GET /metrics`), read from the daemon's own counters at scrape time.

Counting every frame through prometheus-client would cost a lock per frame; the reducer
already counts frames by type, so collectors read those counters when scraped. Only the
commit histograms are observed as they happen (once per batch, not per frame).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BREAKER_STATES = ("closed", "open", "half_open")
LINK_STATES = ("connecting", "connected", "backoff", "open", "stopped")


class _DaemonCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        frames = CounterMetricFamily(
            "kimi_syncd_frames", "Frames received, by type", labels=["type"]
        )
        for type_, count in sorted(snap["frames_by_type"].items()):
            frames.add_metric([type_], count)
        yield frames
        rejected = CounterMetricFamily(
            "kimi_syncd_rejected_frames",
            "Frames rejected before storage, by reason",
            labels=["reason"],
        )
        for reason, count in sorted(snap["rejected_by_reason"].items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield CounterMetricFamily(
            "kimi_syncd_connect_attempts", "Upstream connection attempts", value=snap["attempts"]
        )
        yield CounterMetricFamily(
            "kimi_syncd_reconnects",
            "Upstream connections opened after the first",
            value=max(snap["connections"] - 1, 0),
        )
        yield CounterMetricFamily(
            "kimi_syncd_outbox_delivered",
            "Outbox messages confirmed by a pong",
            value=snap["delivered"],
        )
        breaker = GaugeMetricFamily(
            "kimi_syncd_breaker_state",
            "Circuit breaker state (1 for the current one)",
            labels=["state"],
        )
        for state in BREAKER_STATES:
            breaker.add_metric([state], 1.0 if snap["breaker_state"] == state else 0.0)
        yield breaker
        link = GaugeMetricFamily(
            "kimi_syncd_link_state", "Upstream link state (1 for the current one)", labels=["state"]
        )
        for state in LINK_STATES:
            link.add_metric([state], 1.0 if snap["link_state"] == state else 0.0)
        yield link
        rtt = snap["rtt_seconds"]
        if rtt is not None:
            yield GaugeMetricFamily(
                "kimi_syncd_rtt_seconds", "Last ping round-trip time", value=rtt
            )
        depth = GaugeMetricFamily(
            "kimi_syncd_outbox_messages", "Outbox messages by state", labels=["state"]
        )
        for state, count in sorted(snap["outbox_by_state"].items()):
            depth.add_metric([state], count)
        yield depth
        yield GaugeMetricFamily(
            "kimi_syncd_last_seq", "Last committed sequence number", value=snap["last_seq"]
        )
        yield GaugeMetricFamily(
            "kimi_syncd_ingest_queue", "Frames waiting for the writer", value=snap["ingest_queue"]
        )
        yield GaugeMetricFamily(
            "kimi_syncd_db_size_bytes", "Database size incl. WAL", value=snap["db_size_bytes"]
        )


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DaemonCollector(snapshot))
        self.batch_size = Histogram(
            "kimi_syncd_commit_batch_size",
            "Items per committed transaction",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000),
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "kimi_syncd_commit_seconds",
            "Time to build and commit one transaction",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0),
            registry=self.registry,
        )

    def observe_commit(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.commit_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
