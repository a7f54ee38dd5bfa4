"""Redis Cluster and Redis Sentinel failures, on private deployments this test starts
(tests/redis_servers.py): a Sentinel failover after the primary is killed, and a lost pub/sub
connection in a cluster. A hub's subscriber gets everything, in order, either way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from redis.asyncio import Redis

from tidings import Settings
from tidings.brokers import BrokerUnavailable, HistoryOptions, StreamPosition, create_broker
from tidings.brokers.redis import RedisBroker
from tidings.hub import Hub
from tidings.session import Session

from . import redis_servers
from .conftest import IN_CI
from .engines import ENGINES, namespace, until
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore

KEEP = HistoryOptions(size=100, ttl=120)
FAILOVER_WAIT = 60.0  # seconds: Sentinel's down-after (1 s) plus an election, on a loaded machine



@pytest.fixture
def private_sentinel() -> Iterator[redis_servers.Sentinel]:
    """A master + replica + Sentinel of this test alone (the test kills the master)."""
    if not redis_servers.available():
        message = "redis-server / redis-cli not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    deployment = redis_servers.start_sentinel()
    try:
        yield deployment
    finally:
        deployment.servers.stop()


async def publish_until_accepted(
    broker: RedisBroker, channel: str, data: bytes, wait: float
) -> tuple[StreamPosition, int]:
    """Publish, retrying while the broker says it is unavailable; each attempt must end (with
    a position or BrokerUnavailable) in bounded time, never hang. The position and how many
    attempts were refused."""
    refused = 0
    async with asyncio.timeout(wait):
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(20):  # a hang would fail here
                    return await broker.publish(channel, data, KEEP), refused
            except BrokerUnavailable:
                refused += 1
                # back off a little, as a client told "try again later" would
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


async def test_sentinel_failover_a_hub_keeps_delivering_everything(
    private_sentinel: redis_servers.Sentinel,
) -> None:
    deployment = private_sentinel
    url = f"{deployment.url}?prefix=failover"
    publisher = create_broker(url)
    broker = create_broker(url)
    assert isinstance(publisher, RedisBroker) and isinstance(broker, RedisBroker)
    master = Redis(host="127.0.0.1", port=deployment.master)
    try:
        await publisher.start(Recorder())
        async with Hub(broker, Settings()) as hub:
            transport = FrameRecorder()
            session = Session(hub, transport, PassThrough())
            serving = asyncio.create_task(session.serve(ignore))
            await hub.subscribe(session, "feed", PassThrough())
            first = None
            for i in range(5):
                position = await publisher.publish("feed", b"%d" % i, KEEP)
                first = first or position
            assert first is not None
            await until(lambda: len(transport.frames) == 5)
            # replicated before the primary dies (Redis replicates asynchronously: what the
            # replica did not get is lost with the primary, for every Redis client)
            assert await master.execute_command("WAIT", 1, 5000) == 1
            deployment.servers.kill(deployment.master)
            position, refused = await publish_until_accepted(publisher, "feed", b"5", FAILOVER_WAIT)
            assert refused > 0  # the outage was seen, and answered, not hung on
            # the promoted replica carries the stream on: same epoch, next offset
            assert position == StreamPosition(first.offset + 5, first.epoch)
            for i in range(6, 15):
                await publisher.publish("feed", b"%d" % i, KEEP)
            await until(lambda: len(transport.frames) >= 15, FAILOVER_WAIT)
            assert transport.frames == [b"%d" % i for i in range(15)]
            assert hub.metrics.gaps_lost == 0
            transport.gone.set()
            await serving
    finally:
        await master.aclose()
        await publisher.close()
        await broker.close()


async def test_cluster_pubsub_link_lost_a_hub_catches_up() -> None:
    async with namespace(ENGINES["redis_cluster"]) as url:
        publisher = create_broker(url)
        broker = create_broker(url)
        assert isinstance(publisher, RedisBroker) and isinstance(broker, RedisBroker)
        try:
            await publisher.start(Recorder())
            async with Hub(broker, Settings()) as hub:
                transport = FrameRecorder()
                session = Session(hub, transport, PassThrough())
                serving = asyncio.create_task(session.serve(ignore))
                # channels whose keys live on different shards, all delivered by one link
                channels = [f"c{i}" for i in range(6)]
                for channel in channels:
                    await hub.subscribe(session, channel, PassThrough())
                for channel in channels:
                    await publisher.publish(channel, channel.encode() + b"-0", KEEP)
                await until(lambda: len(transport.frames) == len(channels))
                killed = await _kill_pubsub(broker)
                assert killed
                for n in range(1, 4):  # while the link is down or just back
                    for channel in channels:
                        await publisher.publish(channel, channel.encode() + b"-%d" % n, KEEP)
                await until(lambda: len(transport.frames) >= 4 * len(channels))
                for channel in channels:
                    mine = [f for f in transport.frames if f.startswith(channel.encode() + b"-")]
                    assert mine == [channel.encode() + b"-%d" % n for n in range(4)]
                assert hub.metrics.gaps_lost == 0
                transport.gone.set()
                await serving
        finally:
            await publisher.close()
            await broker.close()


async def _kill_pubsub(broker: RedisBroker) -> bool:
    """CLIENT KILL this node's pub/sub connection on whichever cluster node holds it."""
    from redis.asyncio.cluster import RedisCluster

    cluster = broker._redis
    assert isinstance(cluster, RedisCluster)
    await cluster.initialize()
    for node in cluster.get_nodes():
        client = Redis(host=node.host, port=node.port)
        try:
            for entry in await client.client_list(_type="pubsub"):
                if entry.get("name") == broker.pubsub_name:
                    return bool(await client.client_kill_filter(_id=entry["id"]))
        finally:
            await client.aclose()
    return False


class Recorder:
    def on_publication(self, publication: object) -> None: ...

    def on_join_leave(self, event: object) -> None: ...

    def on_control(self, data: bytes) -> None: ...

    def on_resync(self) -> None: ...
