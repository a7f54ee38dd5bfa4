"""Brokers, one engine per module, chosen by URL scheme and imported only when used."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from .base import (
    Broker,
    BrokerUnavailable,
    ClientInfo,
    EventHandler,
    HistoryOptions,
    HistoryResult,
    JoinLeave,
    PresenceStats,
    Publication,
    StreamPosition,
)

ENGINES: dict[str, str] = {
    "memory": "tidings.brokers.memory:MemoryBroker",
    "redis": "tidings.brokers.redis:RedisBroker",
    "rediss": "tidings.brokers.redis:RedisBroker",
    "redis+cluster": "tidings.brokers.redis:RedisBroker",
    "rediss+cluster": "tidings.brokers.redis:RedisBroker",
    "redis+sentinel": "tidings.brokers.redis:RedisBroker",
    "postgresql": "tidings.brokers.postgres:PostgresBroker",
    "postgres": "tidings.brokers.postgres:PostgresBroker",
    "kafka": "tidings.brokers.kafka:KafkaBroker",
    "nats": "tidings.brokers.nats:NatsBroker",
}


def create_broker(url: str) -> Broker:
    """The engine for ``url``'s scheme; ValueError naming the known schemes otherwise."""
    scheme = urlsplit(url).scheme.lower()
    target = ENGINES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in ENGINES)
        raise ValueError(f"unknown broker URL scheme {scheme!r} in {url!r}; known: {known}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"broker {scheme}:// is not part of this tidings version") from exc
        raise ValueError(
            f"broker {scheme}:// is not available here ({exc.name} is missing); "
            f"install tidings[{_extra(scheme)}]"
        ) from exc
    cls: type[Broker] = getattr(module, class_name)
    return cls(url)


def _extra(scheme: str) -> str:
    if scheme.startswith(("redis+", "rediss")):
        return "redis"
    return {"postgresql": "postgres"}.get(scheme, scheme)


__all__ = [
    "ENGINES",
    "Broker",
    "BrokerUnavailable",
    "ClientInfo",
    "EventHandler",
    "HistoryOptions",
    "HistoryResult",
    "JoinLeave",
    "PresenceStats",
    "Publication",
    "StreamPosition",
    "create_broker",
]
