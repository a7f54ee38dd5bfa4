"""Nothing lost without being told (issue 10, section 1), on the in-memory broker.

A node's hub notices what its broker link lost: offsets skipped (healed from history), a
channel's *first* publications (a baseline read when the broker subscription is made), a new
epoch (the stream was reset) and a gap history no longer holds. What cannot be healed reaches
every subscriber as a fact: a session without a protocol listener is closed 3010."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest

from tidings import Settings
from tidings.brokers.memory import MemoryBroker
from tidings.errors import Disconnect
from tidings.hub import Hub
from tidings.session import Session

from .test_hub import CountingEncoder, Recorder, _ignore


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@dataclass
class Node:
    """A hub on a memory broker whose link to the shared store can be cut (``drop``)."""

    hub: Hub
    broker: MemoryBroker
    other: MemoryBroker  # another node's broker: publishes while this one's link is down

    def drop(self, channel: str) -> None:
        self.broker._channels.discard(channel)

    def restore(self, channel: str) -> None:
        self.broker._channels.add(channel)

    def reset_stream(self, channel: str) -> None:
        """The broker forgets the stream (a restart without persistence): a new epoch."""
        del self.broker._store.streams[channel]

    async def publish(self, channel: str, data: bytes) -> None:
        await self.other.publish(channel, data, self.hub.history_options(self.hub.channel(channel)))


@asynccontextmanager
async def node(name: str, settings: Settings | None = None) -> AsyncIterator[Node]:
    other = MemoryBroker(f"memory://{name}")
    await other.start(Recorder())  # type: ignore[arg-type]
    broker = MemoryBroker(f"memory://{name}")
    try:
        async with Hub(broker, settings or Settings()) as hub:
            yield Node(hub, broker, other)
    finally:
        await other.close()


@asynccontextmanager
async def subscriber(hub: Hub, channel: str) -> AsyncIterator[Recorder]:
    encoder, rec = CountingEncoder(), Recorder()
    session = Session(hub, rec, encoder)
    task = asyncio.create_task(session.serve(_ignore))
    await hub.subscribe(session, channel, encoder)
    try:
        yield rec
    finally:
        rec.gone.set()
        await task


async def test_a_channels_first_publication_lost_is_healed_on_the_next() -> None:
    async with node("first-next") as n, subscriber(n.hub, "room") as rec:
        n.drop("room")
        await n.publish("room", b"1")  # the first publication ever: no delivery yet
        n.restore("room")
        await n.publish("room", b"2")
        await until(lambda: len(rec.frames) == 2)
        assert rec.frames == [b"1", b"2"]
        assert n.hub.metrics.gaps_healed == 1


async def test_a_channels_first_publication_lost_is_healed_on_resync() -> None:
    async with node("first-resync") as n, subscriber(n.hub, "room") as rec:
        n.drop("room")
        await n.publish("room", b"1")
        n.restore("room")
        n.hub.on_resync()
        await until(lambda: len(rec.frames) == 1)
        assert rec.frames == [b"1"]


async def test_a_new_epoch_closes_subscribers_3010_never_splices() -> None:
    async with node("epoch") as n, subscriber(n.hub, "room") as rec:
        await n.publish("room", b"1")
        await until(lambda: rec.frames == [b"1"])
        n.drop("room")
        n.reset_stream("room")
        await n.publish("room", b"new 1")  # never reaches this node
        n.restore("room")
        await n.publish("room", b"new 2")
        await until(lambda: rec.closed is not None)
        assert rec.closed == (3010, "insufficient state")
        assert rec.frames == [b"1"]
        assert n.hub.metrics.gaps_lost >= 1
        assert n.hub.subscribers("room") == 0


async def test_a_new_epoch_noticed_on_resync_closes_subscribers() -> None:
    async with node("epoch-resync") as n, subscriber(n.hub, "room") as rec:
        n.drop("room")
        n.reset_stream("room")
        await n.publish("room", b"new 1")
        n.restore("room")
        n.hub.on_resync()
        await until(lambda: rec.closed is not None)
        assert rec.closed == (3010, "insufficient state")
        assert rec.frames == []


async def test_a_gap_history_no_longer_holds_closes_subscribers() -> None:
    settings = Settings(namespaces={"short": {"history_size": 2, "history_ttl": 60}})
    async with node("trimmed", settings) as n, subscriber(n.hub, "short:a") as rec:
        await n.publish("short:a", b"1")
        await until(lambda: rec.frames == [b"1"])
        n.drop("short:a")
        for i in (2, 3, 4, 5):
            await n.publish("short:a", b"%d" % i)
        n.restore("short:a")
        await n.publish("short:a", b"6")  # history keeps 5 and 6: 2-4 are gone
        await until(lambda: rec.closed is not None)
        assert rec.closed == (3010, "insufficient state")
        assert rec.frames == [b"1"]  # never 5, 6 after 1
        assert n.hub.metrics.gaps_lost == 3


async def test_a_new_subscriber_after_a_reset_gets_the_new_stream() -> None:
    async with node("after-reset") as n:
        async with subscriber(n.hub, "room") as rec:
            n.drop("room")
            n.reset_stream("room")
            await n.publish("room", b"x")
            n.restore("room")
            await n.publish("room", b"y")
            await until(lambda: rec.closed is not None)
        async with subscriber(n.hub, "room") as again:
            await n.publish("room", b"z")
            await until(lambda: again.frames == [b"z"])


class Listener:
    def __init__(self) -> None:
        self.lost: list[str] = []

    def stream_lost(self, channel: str) -> None:
        self.lost.append(channel)


async def test_a_subscription_still_buffering_is_told_when_activated() -> None:
    """A subscriber whose subscribe reply is not queued yet is told after it, at activation:
    the protocol's listener (Centrifugo: unsubscribe 2500), or 3010 raised to close with."""
    async with node("buffering") as n:
        hub = n.hub
        encoder = CountingEncoder()
        told, plain = Session(hub, Recorder(), encoder), Session(hub, Recorder(), encoder)
        listener = told.protocol = Listener()
        await n.publish("room", b"1")
        for session in (told, plain):
            await hub.subscribe(session, "room", encoder, buffer=True)
        n.reset_stream("room")
        await n.publish("room", b"new 1")  # the hub sees a new epoch while both buffer
        assert listener.lost == []  # not before its subscribe reply
        assert hub.activate(told, "room", encoder, after=1) == []
        assert listener.lost == ["room"]
        with pytest.raises(Disconnect) as raised:
            hub.activate(plain, "room", encoder, after=1)
        assert raised.value.code == 3010
        assert hub.subscribers("room") == 0
        assert told.channels == plain.channels == set()


async def test_a_late_live_copy_of_a_healed_publication_is_not_sent_twice() -> None:
    """A heal sends offsets from history; the broker's own copy of one of them may still
    arrive afterwards (pub/sub in flight): it is not sent again."""
    async with node("late-copy") as n, subscriber(n.hub, "room") as rec:
        n.drop("room")
        await n.publish("room", b"1")
        await n.publish("room", b"2")
        n.restore("room")
        n.hub.on_resync()
        await until(lambda: rec.frames == [b"1", b"2"])
        history = await n.hub.history("room")
        for late in history.publications:  # as if pub/sub delivered them after the heal
            n.hub.on_publication(late)
        await n.publish("room", b"3")
        await until(lambda: len(rec.frames) >= 3)
        assert rec.frames == [b"1", b"2", b"3"]


async def test_a_reconnect_before_any_baseline_tells_the_subscribers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The baseline read at subscribe failed (a broker in trouble), and the broker reconnected
    before the channel delivered anything: what was published meanwhile cannot be known, so
    the subscribers are told (3010 here), never left to take the next publication as if
    nothing was missed."""
    async with node("no-baseline") as n:
        real = n.broker.history
        failures = [1]

        async def failing_once(*args: object, **kwargs: object) -> object:
            if failures[0]:
                failures[0] -= 1
                raise ConnectionError("the broker is restarting")
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(n.broker, "history", failing_once)
        async with subscriber(n.hub, "room") as rec:
            await until(lambda: not failures[0])
            n.drop("room")
            await n.publish("room", b"1")  # never reaches this node
            n.restore("room")
            n.hub.on_resync()
            await n.publish("room", b"2")
            await until(lambda: rec.closed is not None or len(rec.frames) >= 1)
            assert rec.closed == (3010, "insufficient state")
            assert rec.frames == []
            assert n.hub.metrics.gaps_lost >= 1
