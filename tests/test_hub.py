"""The hub over the in-memory broker: history ring buffer, encode-once, subscribe races."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from tidings import Settings
from tidings.brokers.base import JoinLeave, Publication
from tidings.brokers.memory import MemoryBroker
from tidings.errors import Disconnect
from tidings.frames import Frame, text_frame
from tidings.hub import Hub
from tidings.protocol.raw import RAW_FRAMED
from tidings.session import Session


class Recorder:
    """A stand-in transport that records what a session would write."""

    framed = False  # an ASGI-style transport: the session gets a QueuedWriter

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.closed: tuple[int, str] | None = None
        self.gone = asyncio.Event()

    async def receive(self) -> Frame | None:
        await self.gone.wait()
        return None

    async def send(self, frames: list[Frame]) -> None:
        self.frames.extend(frames)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def push(self, publication: Publication) -> Frame:
        self.calls += 1
        return publication.data

    def join_leave(self, event: JoinLeave) -> Frame | None:
        return None

    def pack(self, frames: list[Frame]) -> list[Frame]:
        return frames

    def ping(self) -> Frame | None:
        return None


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    settings = Settings(namespaces={"ticks": {"history_size": 5, "history_ttl": 0.3}})
    async with Hub(MemoryBroker(), settings) as h:
        yield h


async def test_offsets_grow_by_one_and_history_keeps_the_last_n(hub: Hub) -> None:
    positions = [await hub.publish("ticks:a", {"n": i}) for i in range(12)]
    assert [p.offset for p in positions] == list(range(1, 13))
    assert len({p.epoch for p in positions}) == 1
    history = await hub.history("ticks:a")
    assert [p.offset for p in history.publications] == [8, 9, 10, 11, 12]
    assert [p.data for p in history.publications] == [b'{"n":%d}' % i for i in range(7, 12)]
    assert history.position == positions[-1]
    other = await hub.publish("ticks:b", 1)
    assert other.offset == 1 and other.epoch != positions[0].epoch


async def test_history_since_limit_reverse(hub: Hub) -> None:
    for i in range(5):
        last = await hub.publish("ticks:c", i)
    since = (await hub.history("ticks:c", limit=0)).position
    assert since == last
    older = type(last)(2, last.epoch)
    assert [p.offset for p in (await hub.history("ticks:c", since=older)).publications] == [3, 4, 5]
    got = await hub.history("ticks:c", limit=2, reverse=True)
    assert [p.offset for p in got.publications] == [5, 4]
    assert (await hub.history("ticks:c", limit=0)).publications == []


async def test_history_expires_but_the_stream_position_stays(hub: Hub) -> None:
    first = await hub.publish("ticks:d", "old")
    await asyncio.sleep(0.4)  # past history_ttl
    history = await hub.history("ticks:d")
    assert history.publications == []
    assert history.position == first
    assert (await hub.publish("ticks:d", "new")).offset == 2


async def test_default_namespace_keeps_history_unless_configured_off() -> None:
    settings = Settings(namespaces={"live": {"history_size": 0}})
    async with Hub(MemoryBroker(), settings) as hub:
        await hub.publish("plain", 1)
        await hub.publish("live:x", 1)
        assert len((await hub.history("plain")).publications) == 1
        live = await hub.history("live:x")
        assert live.publications == [] and live.position.offset == 1


async def test_a_publication_is_encoded_once_for_all_subscribers(hub: Hub) -> None:
    encoder = CountingEncoder()
    transports = [Recorder() for _ in range(50)]
    sessions = [Session(hub, t, encoder) for t in transports]
    tasks = [asyncio.create_task(s.serve(_ignore)) for s in sessions]
    for s in sessions:
        hub.connect(s)
        await hub.subscribe(s, "room", encoder)
    for i in range(3):
        await hub.publish("room", i)
    await asyncio.sleep(0.05)
    assert encoder.calls == 3
    assert all(t.frames == [b"0", b"1", b"2"] for t in transports)
    for t in transports:
        t.gone.set()
    await asyncio.gather(*tasks)
    assert hub.subscribers("room") == 0 and not hub.sessions


async def _ignore(session: Session, message: Frame) -> None:
    return None


class SlowSubscribeBroker(MemoryBroker):
    """Subscribing takes a while, as it does over a network."""

    async def subscribe(self, channel: str) -> None:
        await asyncio.sleep(0.05)
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        await asyncio.sleep(0.05)
        await super().unsubscribe(channel)


async def test_concurrent_first_subscribers_all_receive() -> None:
    """encode/broadcaster loses concurrent first subscribers; tidings must not."""
    async with Hub(SlowSubscribeBroker(), Settings()) as hub:
        encoder = CountingEncoder()
        transports = [Recorder() for _ in range(20)]
        sessions = [Session(hub, t, encoder) for t in transports]
        tasks = [asyncio.create_task(s.serve(_ignore)) for s in sessions]
        await asyncio.gather(*(hub.subscribe(s, "race", encoder) for s in sessions))
        await hub.publish("race", "first")
        await asyncio.sleep(0.05)
        assert all(t.frames == [b'"first"'] for t in transports)

        # The last subscriber leaves while a new one arrives: the channel stays delivered.
        leaving = [hub.unsubscribe(s, "race") for s in sessions]
        newcomer_transport = Recorder()
        newcomer = Session(hub, newcomer_transport, encoder)
        tasks.append(asyncio.create_task(newcomer.serve(_ignore)))
        await asyncio.gather(*leaving, hub.subscribe(newcomer, "race", encoder))
        await hub.publish("race", "second")
        await asyncio.sleep(0.05)
        assert newcomer_transport.frames == [b'"second"']
        assert all(t.frames == [b'"first"'] for t in transports)
        for t in [*transports, newcomer_transport]:
            t.gone.set()
        await asyncio.gather(*tasks)
        assert hub.subscribers("race") == 0
        assert "race" not in hub.broker._channels  # type: ignore[attr-defined]


async def test_buffered_subscription_holds_publications_until_activated(hub: Hub) -> None:
    encoder = CountingEncoder()
    rec = Recorder()
    session = Session(hub, rec, encoder)
    task = asyncio.create_task(session.serve(_ignore))
    await hub.subscribe(session, "ticks:r", encoder, buffer=True)
    await hub.publish("ticks:r", "during")
    held = hub.activate(session, "ticks:r", encoder)
    assert [p.data for p in held] == [b'"during"']
    await hub.publish("ticks:r", "after")
    await asyncio.sleep(0.02)
    assert rec.frames == [b'"after"']
    rec.gone.set()
    await task


async def test_disconnect_user_closes_only_that_users_sessions(hub: Hub) -> None:
    encoder = CountingEncoder()
    alice, bob = Recorder(), Recorder()
    s1, s2 = Session(hub, alice, encoder), Session(hub, bob, encoder)
    hub.set_user(s1, "alice")
    hub.set_user(s2, "bob")
    tasks = [asyncio.create_task(s.serve(_ignore)) for s in (s1, s2)]
    await hub.disconnect("alice", 3010, "bye")
    await asyncio.wait_for(tasks[0], 5)
    assert alice.closed == (3010, "bye")
    assert bob.closed is None and not tasks[1].done()
    bob.gone.set()
    await tasks[1]


async def test_offsets_the_broker_skipped_are_filled_in_from_history() -> None:
    """A node that misses publications (its broker link dropped) notices the jump in offsets
    and sends the missing ones from history first: subscribers see every offset, in order."""
    other = MemoryBroker("memory://gaps")
    await other.start(Recorder())  # type: ignore[arg-type]
    node = MemoryBroker("memory://gaps")
    async with Hub(node, Settings()) as hub:
        encoder, rec = CountingEncoder(), Recorder()
        session = Session(hub, rec, encoder)
        task = asyncio.create_task(session.serve(_ignore))
        await hub.subscribe(session, "room", encoder)
        keep = hub.history_options(hub.channel("room"))
        await other.publish("room", b"1", keep)
        node._channels.discard("room")  # the link drops: nothing reaches this node
        for i in (2, 3, 4):
            await other.publish("room", b"%d" % i, keep)
        node._channels.add("room")
        await other.publish("room", b"5", keep)  # offset 5 after 1: a gap
        await other.publish("room", b"6", keep)  # arrives while the gap is being filled
        async with asyncio.timeout(5):
            while len(rec.frames) < 6:
                await asyncio.sleep(0.01)
        node._channels.discard("room")
        await other.publish("room", b"7", keep)
        node._channels.add("room")
        hub.on_resync()  # a broker that reconnected says so; no new publication needed
        async with asyncio.timeout(5):
            while len(rec.frames) < 7:
                await asyncio.sleep(0.01)
        assert rec.frames == [b"%d" % i for i in range(1, 8)]
        assert hub.metrics.gaps_healed == 2
        rec.gone.set()
        await task
    await other.close()


class Direct(Recorder):
    """A direct transport (the fast path's shape) that records each write call."""

    framed = True  # the session gets a DirectWriter

    def __init__(self) -> None:
        super().__init__()
        self.on_drain = None
        self.on_sink = None
        self.sink = None  # no sink: every write goes through write_frame(s)
        self.writable = True
        self.writes: list[list[Frame]] = []

    def write_frames(self, frames: list[Frame]) -> None:
        self.writes.append(list(frames))

    def write_frame(self, frame: Frame) -> None:
        self.writes.append([frame])

    def finish(self, frames: list[Frame], code: int, reason: str, timeout: float) -> None:
        self.closed = (code, reason)


async def test_a_lone_publication_is_written_during_the_fan_out(hub: Hub) -> None:
    """No queue, no second pass, when there is nothing to coalesce; several publications in
    one loop iteration are queued and leave together, and a busy spell keeps queueing."""
    transports = [Direct() for _ in range(3)]
    encoder = CountingEncoder()
    for transport in transports:
        session = Session(hub, transport, encoder)
        hub.connect(session)
        session.open()
        await hub.subscribe(session, "wt", encoder)
    await asyncio.sleep(0.01)

    await hub.publish_json("wt", b"1")  # alone: written before the loop runs anything else
    assert all(t.writes == [[b"1"]] for t in transports)
    await asyncio.sleep(0.01)

    for data in (b"2", b"3", b"4"):  # one iteration: the first goes through, the rest queue
        await hub.publish_json("wt", data)
    assert all(t.writes[-1] == [b"2"] for t in transports)
    await asyncio.sleep(0.01)
    assert all(t.writes[-1] == [b"3", b"4"] for t in transports)

    await hub.publish_json("wt", b"5")  # the last iteration had 3: queue, in case more come
    assert all(t.writes[-1] == [b"3", b"4"] for t in transports)
    await asyncio.sleep(0.01)
    assert all(t.writes[-1] == [b"5"] for t in transports)

    await hub.publish_json("wt", b"6")  # quiet again: through
    assert all(t.writes[-1] == [b"6"] for t in transports)
    await asyncio.sleep(0.01)

    transports[0].writable = False  # a paused socket queues, in order, until it drains
    await hub.publish_json("wt", b"7")
    assert transports[0].writes[-1] == [b"6"] and transports[1].writes[-1] == [b"7"]
    await asyncio.sleep(0.01)
    await hub.publish_json("wt", b"8")
    assert transports[0].writes[-1] == [b"6"]
    transports[0].writable = True
    await asyncio.sleep(0.01)
    for session in list(hub.sessions):
        session.flush()  # what the transport's on_drain does
    assert transports[0].writes[-1] == [b"7", b"8"]
    assert [f for t in transports for w in t.writes for f in w].count(b"8") == 3
    assert encoder.calls == 8  # still encoded once per publication


class SinkDirect(Direct):
    """A direct transport with a sink, kept as FastWebSocket keeps it: the socket's transport
    while open and writable, None while paused or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.sink = self  # type: ignore[assignment]
        self.through: list[bytes] = []  # what arrived through the sink

    def write(self, data: bytes) -> None:
        self.through.append(data)

    def pause(self) -> None:
        self.writable, self.sink = False, None
        if self.on_sink is not None:
            self.on_sink()

    def resume(self) -> None:
        self.writable, self.sink = True, self  # type: ignore[assignment]
        if self.on_sink is not None:
            self.on_sink()
        if self.on_drain is not None:
            self.on_drain()


async def test_write_through_goes_to_the_sink_only_when_nothing_can_be_overtaken(
    hub: Hub,
) -> None:
    """A lone pre-framed push is written straight to the socket's transport, as plain bytes;
    while the socket is paused pushes queue, and once it drains they leave in order before
    the sink is used again; a closing session's sink is gone."""
    transport = SinkDirect()
    session = Session(hub, transport, RAW_FRAMED)
    hub.connect(session)
    session.open()
    await hub.subscribe(session, "sink", RAW_FRAMED)
    await asyncio.sleep(0.01)

    await hub.publish_json("sink", b'"1"')
    assert transport.through == [text_frame(b"1")] and type(transport.through[0]) is bytes
    assert transport.writes == []
    await asyncio.sleep(0.01)

    transport.pause()
    await hub.publish_json("sink", b'"2"')
    await asyncio.sleep(0.01)
    await hub.publish_json("sink", b'"3"')
    await asyncio.sleep(0.01)
    assert len(transport.through) == 1 and transport.writes == [] and session.sink is None

    transport.resume()  # the queue leaves first, then the sink is back
    assert transport.writes == [[text_frame(b"2"), text_frame(b"3")]]
    assert session.sink is transport
    await hub.publish_json("sink", b'"4"')
    assert transport.through[-1] == text_frame(b"4")
    await asyncio.sleep(0.01)

    session.enqueue("reply")  # a queued reply: the push must not overtake it
    await hub.publish_json("sink", b'"5"')
    assert transport.through[-1] == text_frame(b"4")
    await asyncio.sleep(0.01)
    assert transport.writes[-1] == ["reply", text_frame(b"5")]
    assert session.sink is transport

    session.close(Disconnect(3000, "bye"))
    assert session.sink is None
    await hub.publish_json("sink", b'"6"')
    assert transport.through[-1] == text_frame(b"4")


async def test_flusher_after_is_done_once_queued_frames_are_written(hub: Hub) -> None:
    """What an ASGI publish route awaits before answering: the iteration's flush."""
    transport = Direct()
    session = Session(hub, transport, RAW_FRAMED)
    hub.connect(session)
    session.open()
    await hub.subscribe(session, "after", RAW_FRAMED)
    await asyncio.sleep(0.01)
    assert hub.flusher.after() is None  # nothing scheduled: nothing to wait for
    for data in (b'"1"', b'"2"', b'"3"'):  # one iteration: "1" through, the rest queued
        await hub.publish_json("after", data)
    after = hub.flusher.after()
    assert after is not None and hub.flusher.after() is after
    assert transport.writes == [[text_frame(b"1")]]
    await after
    assert transport.writes == [[text_frame(b"1")], [text_frame(b"2"), text_frame(b"3")]]


async def test_history_does_not_keep_orjsons_working_buffers(hub: Hub) -> None:
    """orjson's bytes hold a 4 KiB buffer whatever their length; history keeps exact copies
    (100 kept publications in each of 1,000 channels once took 400 MiB)."""
    kept = hub.settings.channel_options("").history_size
    assert kept >= 100
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            await hub.publish("kept", {"n": i, "text": "x" * 100})
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    history = await hub.history("kept", limit=-1)
    assert len(history.publications) == 100
    assert history.publications[-1].data == b'{"n":99,"text":"' + b"x" * 100 + b'"}'
    assert grown < 100 * 1024  # about 30 KiB; with orjson's buffers kept, over 400 KiB
