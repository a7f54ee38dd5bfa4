"""Channel streams are bounded (memory broker, ``history_max_streams``): idle streams past the
cap are forgotten least recently used first, counted, and restart with a new epoch, so a
recovering client is told ``recovered: false``; subscribed streams are never evicted."""

from __future__ import annotations

import httpx

from tidings.brokers.base import HistoryOptions
from tidings.brokers.memory import MemoryBroker

from .cfutil import Raw
from .conftest import Serve


class _Handler:
    def on_publication(self, pub: object) -> None:
        pass

    def on_join_leave(self, event: object) -> None:
        pass

    def on_control(self, data: bytes) -> None:
        pass


async def started(cap: int) -> MemoryBroker:
    broker = MemoryBroker()
    broker.max_streams = cap
    await broker.start(_Handler())  # type: ignore[arg-type]
    return broker


async def test_publishing_to_many_channels_keeps_at_most_the_cap() -> None:
    broker = await started(100)
    try:
        for options in (HistoryOptions(0, 0.0), HistoryOptions(10, 60.0)):
            for i in range(1000):
                await broker.publish(f"c{options.size}:{i}", b"1", options)
        assert len(broker._store.streams) == 100
        assert broker.streams_evicted == 1900
        # the most recent survive
        assert (await broker.history("c10:999")).position.offset == 1
    finally:
        await broker.close()


async def test_history_reads_of_unknown_channels_are_bounded_too() -> None:
    broker = await started(50)
    try:
        for i in range(500):
            await broker.history(f"probe:{i}")
        assert len(broker._store.streams) == 50
    finally:
        await broker.close()


async def test_subscribed_streams_are_never_evicted() -> None:
    broker = await started(10)
    try:
        kept = HistoryOptions(10, 60.0)
        await broker.subscribe("live")
        first = await broker.publish("live", b"a", kept)
        for i in range(100):
            await broker.publish(f"idle:{i}", b"x", kept)
        second = await broker.publish("live", b"b", kept)
        assert (second.offset, second.epoch) == (2, first.epoch)
        assert [p.data for p in (await broker.history("live")).publications] == [b"a", b"b"]
    finally:
        await broker.close()


async def test_an_evicted_channel_restarts_and_recovery_says_so(serve: Serve) -> None:
    srv = await serve(history_max_streams=10)
    async with httpx.AsyncClient() as http:

        async def publish(channel: str) -> dict[str, object]:
            r = await http.post(f"{srv.url}/api/publish", json={"channel": channel, "data": 1})
            result: dict[str, object] = r.json()["result"]
            return result

        old = await publish("news")
        for i in range(20):
            await publish(f"other{i}")
        c = await Raw.open(srv.ws)
        await c.connect()
        result = await c.subscribe(
            "news", recoverable=True, recover=True, offset=old["offset"], epoch=old["epoch"]
        )
        assert result.get("recovered", False) is False
        assert result["was_recovering"] is True
        assert result["epoch"] != old["epoch"] and result.get("offset", 0) == 0
        await c.close()
        metrics = (await http.get(f"{srv.url}/metrics")).text
    # 21 channels through a cap of 10 (11), then "news" made again by the subscribe (12)
    assert "tidings_streams_evicted_total 12.0" in metrics
