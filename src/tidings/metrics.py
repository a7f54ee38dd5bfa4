"""Prometheus metrics read from the hub's counters at scrape time (no cost per message)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .hub import Hub


class HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub, m = self.hub, self.hub.metrics
        yield GaugeMetricFamily(
            "tidings_connections", "Open client connections.", len(hub.sessions)
        )
        yield GaugeMetricFamily(
            "tidings_channels", "Channels with local subscribers.", len(list(hub.channels))
        )
        counters = [
            ("tidings_publications", "Publications accepted by this node.", m.published),
            ("tidings_deliveries", "Frames queued to local subscribers.", m.delivered),
            (
                "tidings_slow_clients",
                "Clients closed because their outbox overflowed.",
                m.slow_clients,
            ),
            (
                "tidings_rejected_connections",
                "Connections refused by max_connections.",
                m.rejected_connections,
            ),
            ("tidings_connections_opened", "Connections accepted.", m.connections_total),
            ("tidings_gaps_healed", "Broker delivery gaps filled from history.", m.gaps_healed),
            (
                "tidings_gaps_lost",
                "Publications lost to subscribers (a gap history no longer held, a lost stream);"
                " they were told (unsubscribe 2500 or close 3010).",
                m.gaps_lost,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


def exposition(hub: Hub) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    return generate_latest(registry), CONTENT_TYPE_LATEST
