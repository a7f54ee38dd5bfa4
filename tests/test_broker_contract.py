"""The contract every broker engine passes: streams, pub/sub between nodes, presence, life.

Each test runs once per engine in ``tests/engines.py`` (add an engine there, not here). "Nodes"
are several broker instances on one engine and namespace. Absence is checked without sleeping:
a node gets a sentinel on a channel it does subscribe after the one under test, and pub/sub is
ordered per node, so whatever it was going to get on the first channel has arrived by then.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tidings.brokers import (
    Broker,
    BrokerUnavailable,
    ClientInfo,
    HistoryOptions,
    JoinLeave,
    PresenceStats,
    StreamPosition,
    create_broker,
)

from .engines import ENGINES, Cluster, Recorder, namespace

KEEP = HistoryOptions(size=10, ttl=60)


@pytest.fixture(params=sorted(ENGINES))
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    engine = ENGINES[request.param]
    async with namespace(engine) as url:
        nodes = Cluster(url)
        try:
            yield nodes
        finally:
            await nodes.close()


async def sentinel(publisher: Broker, node: Broker, recorder: Recorder) -> None:
    """Wait until everything published so far has reached ``node`` (see the module doc)."""
    await node.subscribe("sentinel")
    await publisher.publish("sentinel", b'"s"', KEEP)
    await recorder.until(lambda: bool(recorder.publications("sentinel")))
    await node.unsubscribe("sentinel")


# -- streams ---------------------------------------------------------------------------------


async def test_publish_counts_offsets_per_channel_with_a_stable_epoch(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, _ = await cluster.node()
    first = [await a.publish("one", b"1", KEEP) for _ in range(3)]
    other = await b.publish("two", b"2", KEEP)
    first.append(await b.publish("one", b"1", KEEP))
    assert [p.offset for p in first] == [1, 2, 3, 4]
    assert len({p.epoch for p in first}) == 1 and first[0].epoch
    assert other.offset == 1


async def test_history_is_a_ring_buffer_of_untouched_bytes(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    payloads = [b'{"n":%d,"text":"line\\nbreak \xc3\xa9"}' % i for i in range(7)]
    for data in payloads:
        await a.publish("ring", data, HistoryOptions(size=3, ttl=60))
    result = await a.history("ring")
    assert [p.data for p in result.publications] == payloads[-3:]
    assert [p.offset for p in result.publications] == [5, 6, 7]
    assert result.position.offset == 7
    assert {p.epoch for p in result.publications} == {result.position.epoch}
    assert all(p.channel == "ring" for p in result.publications)


async def test_history_since_limit_and_reverse(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    for i in range(1, 6):
        await a.publish("h", b"%d" % i, KEEP)
    epoch = (await a.history("h", limit=0)).position.epoch

    async def offsets(**kw: object) -> list[int]:
        result = await a.history("h", **kw)  # type: ignore[arg-type]
        assert result.position == StreamPosition(5, epoch)
        return [p.offset for p in result.publications]

    assert await offsets() == [1, 2, 3, 4, 5]
    assert await offsets(limit=None) == [1, 2, 3, 4, 5]
    assert await offsets(limit=0) == []
    assert await offsets(limit=2) == [1, 2]
    assert await offsets(since=StreamPosition(3, epoch)) == [4, 5]
    assert await offsets(since=StreamPosition(3, epoch), limit=1) == [4]
    assert await offsets(since=StreamPosition(5, epoch)) == []
    assert await offsets(reverse=True) == [5, 4, 3, 2, 1]
    assert await offsets(reverse=True, limit=2) == [5, 4]
    assert await offsets(since=StreamPosition(2, epoch), reverse=True) == [5, 4, 3]


async def test_history_forgets_publications_after_their_ttl(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    short = HistoryOptions(size=10, ttl=0.3)
    await a.publish("ttl", b"old", short)
    assert [p.data for p in (await a.history("ttl")).publications] == [b"old"]
    await asyncio.sleep(0.6)
    expired = await a.history("ttl")
    assert expired.publications == []
    assert expired.position.offset == 1
    await a.publish("ttl", b"new", short)
    fresh = await a.history("ttl")
    assert [(p.offset, p.data) for p in fresh.publications] == [(2, b"new")]
    assert fresh.position.epoch == expired.position.epoch


async def test_history_of_an_unknown_channel_starts_its_stream(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, _ = await cluster.node()
    start = await a.history("fresh")
    assert start.publications == []
    assert start.position.offset == 0 and start.position.epoch
    assert (await b.history("fresh", limit=0)).position == start.position
    assert await b.publish("fresh", b"1", KEEP) == StreamPosition(1, start.position.epoch)


async def test_remove_history_keeps_offset_and_epoch(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    for _ in range(3):
        position = await a.publish("rm", b"x", KEEP)
    await a.remove_history("rm")
    after = await a.history("rm")
    assert after.publications == []
    assert after.position == position
    assert (await a.publish("rm", b"y", KEEP)) == StreamPosition(4, position.epoch)
    await a.remove_history("never-published")  # no error


async def test_epoch_changes_when_the_stream_meta_expires(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    brief = HistoryOptions(size=10, ttl=60, meta_ttl=0.3)
    old = await a.publish("meta", b"1", brief)
    await a.publish("meta", b"2", brief)
    await asyncio.sleep(0.7)
    lost = await a.history("meta", meta_ttl=0.3)
    assert lost.position.epoch != old.epoch
    assert lost.position.offset == 0
    assert lost.publications == []
    assert await a.publish("meta", b"3", brief) == StreamPosition(1, lost.position.epoch)


# -- pub/sub between nodes -------------------------------------------------------------------


async def test_subscribed_node_receives_in_offset_order(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    c, nothing = await cluster.node()
    await b.subscribe("feed")
    info = ClientInfo("client-1", "alice", b'{"conn":1}', b'{"chan":2}')
    sent = [
        await a.publish("feed", b"%d" % i, KEEP, info=info, tags={"k": "v"}) for i in range(100)
    ]
    pubs = await got.wait_publications("feed", 100)
    assert [(p.offset, p.epoch) for p in pubs] == [(s.offset, s.epoch) for s in sent]
    assert [p.data for p in pubs] == [b"%d" % i for i in range(100)]
    assert pubs[0].info == info and pubs[0].tags == {"k": "v"} and pubs[0].time > 0
    await sentinel(a, c, nothing)
    assert nothing.publications("feed") == []
    kept = (await a.history("feed", limit=1, reverse=True)).publications[0]
    assert (kept.info, kept.tags, kept.time) == (info, {"k": "v"}, pubs[-1].time)


async def test_publish_right_after_subscribe_returns_is_delivered(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    for i in range(20):
        b, got = await cluster.node()  # a fresh node: this is its first subscription
        await b.subscribe(f"quick{i}")
        await a.publish(f"quick{i}", b"hello", KEEP)
        assert [p.data for p in await got.wait_publications(f"quick{i}", 1)] == [b"hello"]


async def test_concurrent_first_subscribes_all_deliver(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    names = [f"many{i}" for i in range(50)]
    await asyncio.gather(*(b.subscribe(n) for n in names), b.subscribe(names[0]))
    for n in names:
        await a.publish(n, n.encode(), KEEP)
    await got.until(lambda: len(got.publications()) >= len(names))
    assert sorted(p.data.decode() for p in got.publications()) == sorted(names)


async def test_unsubscribe_stops_delivery(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    await b.subscribe("stop")
    await a.publish("stop", b"before", KEEP)
    await got.wait_publications("stop", 1)
    await b.unsubscribe("stop")
    await a.publish("stop", b"after", KEEP)
    await sentinel(a, b, got)
    assert [p.data for p in got.publications("stop")] == [b"before"]


async def test_join_leave_reaches_subscribed_nodes_only(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    c, nothing = await cluster.node()
    await b.subscribe("room")
    who = ClientInfo("c1", "bob", None, b'{"x":1}')
    await a.publish_join_leave(JoinLeave("room", who, join=True))
    await a.publish_join_leave(JoinLeave("room", who, join=False))
    await got.until(lambda: len(got.events) >= 2)
    assert got.events == [JoinLeave("room", who, True), JoinLeave("room", who, False)]
    await sentinel(a, c, nothing)
    assert not any(isinstance(e, JoinLeave) for e in nothing.events)


async def test_control_messages_reach_every_node(cluster: Cluster) -> None:
    a, seen_a = await cluster.node()
    _, seen_b = await cluster.node()
    await a.publish_control(b'{"op":"disconnect","user":"u"}')
    for seen in (seen_a, seen_b):
        await seen.until(lambda s=seen: bool(s.events))  # type: ignore[misc]
        assert seen.events == [b'{"op":"disconnect","user":"u"}']


# -- presence --------------------------------------------------------------------------------


async def test_presence_add_list_stats_remove(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, _ = await cluster.node()
    one = ClientInfo("c1", "alice", b'{"a":1}', None)
    two = ClientInfo("c2", "alice")
    three = ClientInfo("c3", "bob")
    await a.add_presence("p", one, 60)
    await b.add_presence("p", two, 60)
    await b.add_presence("p", three, 60)
    await a.add_presence("other", three, 60)
    assert await b.presence("p") == {"c1": one, "c2": two, "c3": three}
    assert await a.presence_stats("p") == PresenceStats(num_clients=3, num_users=2)
    await a.remove_presence("p", "c3")
    await a.remove_presence("p", "missing")
    assert await b.presence("p") == {"c1": one, "c2": two}
    assert await b.presence("other") == {"c3": three}
    assert await b.presence("nobody") == {}


async def test_presence_expires_unless_refreshed(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    await a.add_presence("pt", ClientInfo("gone"), 0.3)
    await a.add_presence("pt", ClientInfo("stays"), 0.3)
    await asyncio.sleep(0.15)
    await a.add_presence("pt", ClientInfo("stays"), 60)
    await asyncio.sleep(0.4)
    assert list(await a.presence("pt")) == ["stays"]
    assert await a.presence_stats("pt") == PresenceStats(1, 1)


# -- life ------------------------------------------------------------------------------------


async def test_close_is_idempotent(cluster: Cluster) -> None:
    broker = create_broker(cluster.url)
    await broker.close()  # never started
    a, _ = await cluster.node()
    await a.ping()
    await a.close()
    await a.close()


@pytest.mark.parametrize("name", sorted(n for n, e in ENGINES.items() if e.unreachable))
async def test_an_unreachable_engine_raises_broker_unavailable(name: str) -> None:
    make_url = ENGINES[name].unreachable
    assert make_url is not None
    broker = create_broker(make_url())
    try:
        async with asyncio.timeout(30):
            with pytest.raises(BrokerUnavailable):
                await broker.ping()
            with pytest.raises(BrokerUnavailable):
                await broker.publish("c", b"1", KEEP)
            with pytest.raises(BrokerUnavailable):
                await broker.history("c")
            with pytest.raises(BrokerUnavailable):
                await broker.presence("c")
            with pytest.raises(BrokerUnavailable):
                await broker.start(Recorder())
    finally:
        await broker.close()


def test_create_broker_names_the_known_schemes() -> None:
    with pytest.raises(ValueError, match=r"unknown broker URL scheme 'mqtt'.*redis://"):
        create_broker("mqtt://127.0.0.1")
    for engine in ENGINES.values():
        url = engine.url("contract-scheme-check")
        assert url.partition(":")[0] in create_broker(url).schemes
