"""What a channel costs in Redis is bounded (issue 11): no keys for channels that keep no
history (as Centrifugo: a plain PUBLISH), and at most ``history_max_streams`` streams for the
others, the least recently published evicted first (a new epoch: ``recovered: false``), on one
Redis and on a Redis Cluster (the index has its own slot there)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import websockets
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from tidings import Settings, Tidings
from tidings.brokers import StreamPosition, create_broker
from tidings.brokers.redis import RedisBroker
from tidings.hub import Hub
from tidings.metrics import exposition
from tidings.session import Session
from tidings.subscriptions import is_recovered

from .conftest import Serve
from .engines import ENGINES, WAIT, namespace, until
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore

CAP = 50


@pytest.fixture(params=["redis", "redis_cluster"])
async def url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with namespace(ENGINES[request.param]) as found:
        yield found



async def keys_of(broker: RedisBroker) -> list[str]:
    """Every key under the broker's prefix, on every node of a cluster."""
    client = broker._redis
    if isinstance(client, RedisCluster):
        await client.initialize()
        found: list[str] = []
        for node in client.get_primaries():
            one = Redis(host=node.host, port=node.port)
            try:
                found += [k.decode() async for k in one.scan_iter(match=f"{broker.prefix}:*")]
            finally:
                await one.aclose()
        return sorted(found)
    assert isinstance(client, Redis)
    return sorted([k.decode() async for k in client.scan_iter(match=f"{broker.prefix}:*")])


async def memory_of(broker: RedisBroker, keys: list[str]) -> int:
    """MEMORY USAGE of ``keys``, bytes."""
    return sum([await broker._redis.memory_usage(key) or 0 for key in keys])


async def test_channels_without_history_leave_no_keys(url: str) -> None:
    """Publications, a subscription (its stream position is not read) and delivery on
    channels whose namespace keeps no history: nothing is stored in Redis."""
    settings = Settings(namespaces={"live": {"history_size": 0}})
    broker = create_broker(url)
    assert isinstance(broker, RedisBroker)
    async with Hub(broker, settings) as hub:
        transport = FrameRecorder()
        session = Session(hub, transport, PassThrough())
        serving = asyncio.create_task(session.serve(ignore))
        await hub.subscribe(session, "live:watched", PassThrough())
        for i in range(200):
            position = await hub.publish(f"live:c{i}", {"i": i})
            assert position == StreamPosition(0, "")
        await hub.publish("live:watched", {"n": 1}, skip_history=True)
        await hub.publish("live:watched", {"n": 2})
        await until(lambda: len(transport.frames) == 2)
        assert transport.frames == [b'{"n":1}', b'{"n":2}']
        assert await keys_of(broker) == []
        transport.gone.set()
        await serving


async def test_streams_past_history_max_streams_are_evicted_least_recent_first(url: str) -> None:
    async with Tidings(broker_url=url, history_max_streams=CAP) as tidings:
        hub, broker = tidings.hub, tidings.broker
        assert isinstance(broker, RedisBroker)
        # a subscribed channel is never evicted: it keeps its epoch and its subscriber
        transport = FrameRecorder()
        session = Session(hub, transport, PassThrough())
        serving = asyncio.create_task(session.serve(ignore))
        await hub.subscribe(session, "watched", PassThrough())
        first = await hub.publish("watched", {"n": 1})
        for i in range(200):
            await hub.publish(f"c{i}", {"i": i})
            if i == CAP:  # what CAP streams cost (the cap is reached as of here)
                capped = await memory_of(broker, await keys_of(broker))
        keys = await keys_of(broker)
        # the cap counts streams without subscribers (README: "at most history_max_streams
        # such channels without subscribers are kept"): "watched", popped from the index and
        # put back as just used, is kept beside them; whether it is in the index at the end
        # depends on ties between publications in the same millisecond
        metas = [k for k in keys if ":meta:" in k and "{watched}" not in k]
        hists = [k for k in keys if ":hist:" in k and "{watched}" not in k]
        assert len(metas) <= CAP and len(hists) <= CAP, (len(metas), len(hists))
        assert f"{broker.prefix}:meta:{{watched}}" in keys
        assert len(keys) <= 2 * (CAP + 1) + 1  # and the index
        # memory: what 200 streams leave is what CAP of them cost, give or take a stream
        assert await memory_of(broker, keys) <= capped * 1.1
        # the most recently published are kept, the oldest are gone
        assert f"{broker.prefix}:meta:{{c199}}" in keys
        assert f"{broker.prefix}:meta:{{c0}}" not in keys
        # every other channel was evicted, and counted
        assert broker.streams_evicted == 200 - len(metas) >= 200 - CAP
        metrics = exposition(hub)[0].decode()
        assert f"tidings_streams_evicted_total {200 - len(metas)}.0" in metrics
        second = await hub.publish("watched", {"n": 2})
        assert second == StreamPosition(2, first.epoch)
        await until(lambda: len(transport.frames) == 2)
        assert hub.metrics.gaps_lost == 0
        transport.gone.set()
        await serving


async def test_an_evicted_channel_restarts_with_a_new_epoch_and_does_not_recover(url: str) -> None:
    async with Tidings(broker_url=url, history_max_streams=CAP) as tidings:
        hub = tidings.hub
        before = await hub.publish("old", {"n": 1})
        # a history read that creates a stream counts against the cap too
        for i in range(CAP // 2):
            await hub.history(f"read{i}", limit=0)
        for i in range(CAP):
            await hub.publish(f"c{i}", {"i": i})
        after = await hub.publish("old", {"n": 2})
        assert after.offset == 1 and after.epoch != before.epoch
        history = await hub.history("old", since=before, limit=101)
        assert not is_recovered(history, before)
        kept = (await hub.history("old")).publications  # the new life only, never a splice
        assert [(p.offset, p.epoch) for p in kept] == [(1, after.epoch)]


async def test_a_raw_replay_on_a_channel_without_history_leaves_no_keys(
    serve: Serve, url: str
) -> None:
    """``/ws/CH?since=...`` on a channel that keeps no history: no stream is read (a read
    would create one, keys for a channel that keeps none, 7 days each, a key per name a client
    makes up); ``since=0`` subscribes, an offset cannot be continued: closed 3010."""
    srv = await serve(broker_url=url, namespaces={"live": {"history_size": 0}})
    broker = srv.hub.broker
    assert isinstance(broker, RedisBroker)
    async with websockets.connect(f"{srv.ws}/ws/live:a?since=0") as ws:
        await until(lambda: srv.hub.subscribers("live:a") == 1)
        await srv.hub.publish("live:a", "m1")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "m1"
    for i in range(3):
        async with websockets.connect(f"{srv.ws}/ws/live:b{i}?since=3&epoch=abcd") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
    assert await keys_of(broker) == []
