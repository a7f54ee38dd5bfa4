"""Prometheus metrics read from the hub's counters at scrape time (no cost per message).

Besides the hub's figures: the process's (``process_resident_memory_bytes``,
``process_open_fds``, ... from prometheus-client's ProcessCollector, Linux only) and
``tidings_asyncio_tasks``, what a soak test watches for leaks (bench/soak.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
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
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # scraped outside the event loop
            tasks = 0
        yield GaugeMetricFamily(
            "tidings_asyncio_tasks", "asyncio tasks alive in the serving loop.", tasks
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
        evicted = getattr(hub.broker, "streams_evicted", None)
        if evicted is not None:  # an engine's cap (history_max_streams): memory, Redis, Kafka
            counters.append(
                (
                    "tidings_streams_evicted",
                    "Idle channel streams forgotten at history_max_streams (new epoch).",
                    evicted,
                )
            )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


def exposition(hub: Hub) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(hub))
    ProcessCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST
