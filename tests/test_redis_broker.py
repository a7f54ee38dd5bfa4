"""What only the Redis engine has: reconnection, key prefixes, URL options, its wire format."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Redis

from tidings import Settings
from tidings.brokers import ClientInfo, HistoryOptions, Publication, create_broker
from tidings.brokers.redis import RedisBroker
from tidings.hub import Hub
from tidings.session import Session

from .engines import ENGINES, REDIS_URL, WAIT, Cluster, Recorder, namespace, until, with_prefix
from .proxy import Proxy
from .test_broker_contract import KEEP, sentinel
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with namespace(ENGINES["redis"]) as url:
        nodes = Cluster(url)
        try:
            yield nodes
        finally:
            await nodes.close()


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    redis = Redis.from_url(REDIS_URL)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_delivery_resumes_after_the_pubsub_connection_is_killed(
    cluster: Cluster, client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, RedisBroker)
    await b.subscribe("live")
    listing = await client.client_list(_type="pubsub")
    ids = [c["id"] for c in listing if c.get("name") == b.pubsub_name]
    assert len(ids) == 1
    with caplog.at_level(logging.WARNING, logger="tidings.brokers.redis"):
        assert await client.client_kill_filter(_id=ids[0]) == 1
        await b.subscribe("late")  # asked while the connection is down or coming back
        await a.publish("late", b"late", KEEP)
        await got.wait_publications("late", 1)
    assert "reconnected" in caplog.text
    for i in range(20):
        await a.publish("live", b"%d" % i, KEEP)
    pubs = await got.wait_publications("live", 20)
    assert [p.data for p in pubs] == [b"%d" % i for i in range(20)]
    await a.publish_control(b"{}")
    await got.until(lambda: b"{}" in got.events)


async def test_a_hub_catches_up_what_was_published_while_its_link_was_down(
    cluster: Cluster, client: Redis
) -> None:
    """Publications made while a node's pub/sub link is down reach its subscribers after the
    reconnection, from history, in order and once each."""
    a, _ = await cluster.node()
    broker = create_broker(cluster.url)
    assert isinstance(broker, RedisBroker)
    async with Hub(broker, Settings()) as hub:
        transport = FrameRecorder()
        session = Session(hub, transport, PassThrough())
        serving = asyncio.create_task(session.serve(ignore))
        await hub.subscribe(session, "feed", PassThrough())
        keep = HistoryOptions(size=100, ttl=60)
        await a.publish("feed", b"0", keep)
        await until(lambda: transport.frames == [b"0"])
        listing = await client.client_list(_type="pubsub")
        [conn_id] = [c["id"] for c in listing if c.get("name") == broker.pubsub_name]
        await client.client_kill_filter(_id=conn_id)
        for i in range(1, 11):  # while the link is down: lost live, kept in history
            await a.publish("feed", b"%d" % i, keep)
        await until(lambda: len(transport.frames) >= 11)
        for i in range(11, 15):
            await a.publish("feed", b"%d" % i, keep)
        await until(lambda: len(transport.frames) >= 15)
        assert transport.frames == [b"%d" % i for i in range(15)]
        assert hub.metrics.gaps_healed >= 1 and hub.metrics.gaps_lost == 0
        transport.gone.set()
        await serving



async def test_prefixes_keep_deployments_apart(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    async with namespace(ENGINES["redis"]) as other_url:
        other = Cluster(other_url)
        try:
            x, seen_x = await other.node()
            await x.subscribe("same")
            await a.publish("same", b"1", KEEP)
            assert await x.publish("same", b"2", KEEP) == (await x.history("same")).position
            assert (await x.history("same")).position.offset == 1
            await sentinel(x, x, seen_x)
            assert [p.data for p in seen_x.publications("same")] == [b"2"]
        finally:
            await other.close()


async def test_every_key_is_under_the_prefix_and_expires(cluster: Cluster, client: Redis) -> None:
    a, _ = await cluster.node()
    assert isinstance(a, RedisBroker)
    await a.publish("k", b"1", HistoryOptions(size=5, ttl=30, meta_ttl=600))
    await a.add_presence("k", ClientInfo("c"), 20)
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{a.prefix}:*")])
    # {k}: the channel is the hash tag, so its keys share a Redis Cluster slot
    kinds = ("hist", "meta", "pres", "presz")
    # and the index of streams that bounds their count (history_max_streams)
    assert keys == [f"{a.prefix}:{kind}:{{k}}" for kind in kinds] + [f"{a.prefix}:streams"]
    ttls = {k.rsplit(":", 2)[1]: await client.pttl(k) for k in keys}
    assert 0 < ttls["hist"] <= 30_000
    assert 30_000 < ttls["meta"] <= 600_000
    assert 30_000 < ttls["streams"] <= 600_000
    assert 0 < ttls["pres"] <= 20_000 and 0 < ttls["presz"] <= 20_000


async def test_malformed_messages_are_skipped(cluster: Cluster, client: Redis) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, RedisBroker)
    await b.subscribe("bad")
    topic = f"{b.prefix}:ch:bad"
    for junk in (b"", b"Pnonsense", b"P1 e\nnot json\n1", b"P1 e\n[1]\n1", b"J\n{}", b"?"):
        await client.publish(topic, junk)
    await a.publish("bad", b"good", KEEP)
    pubs = await got.wait_publications("bad", 1)
    assert [p.data for p in pubs] == [b"good"]
    assert got.events == pubs


def test_url_options_are_ours_and_the_rest_go_to_redis_py() -> None:
    default = create_broker("redis://127.0.0.1:6379/0")
    tuned = create_broker(
        "rediss://127.0.0.1:6380/2?prefix=app1&subscribe_timeout=3&ping_interval=4&socket_timeout=7"
    )
    assert isinstance(default, RedisBroker) and isinstance(tuned, RedisBroker)
    assert default.prefix == "tidings"
    assert tuned.prefix == "app1"
    assert (tuned._pubsub.subscribe_timeout, tuned._pubsub.ping_interval) == (3.0, 4.0)
    kwargs = tuned._redis.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["socket_timeout"], kwargs["port"]) == (2, 7.0, 6380)
    assert default.mode == tuned.mode == "single"
    with pytest.raises(ValueError, match="braces"):
        create_broker("redis://127.0.0.1/0?prefix=a{b}")
    assert with_prefix("redis://h/0?x=1", "p") == "redis://h/0?x=1&prefix=p"
    for bad in ("subscribe_timeout=soon", "ping_interval=0", "ping_interval=-1"):
        with pytest.raises(ValueError, match=bad.partition("=")[0]):
            create_broker(f"redis://127.0.0.1/0?{bad}")


def test_cluster_and_sentinel_urls() -> None:
    cluster = create_broker(
        "redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002/?prefix=c&socket_timeout=3"
    )
    assert isinstance(cluster, RedisBroker) and cluster.mode == "cluster"
    pools = cluster._pubsub._pools
    assert [(p.connection_kwargs["host"], p.connection_kwargs["port"]) for p in pools] == [
        ("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002)
    ]  # fmt: skip
    assert {p.connection_kwargs["password"] for p in pools} == {"pw"}
    assert pools[0].connection_kwargs["protocol"] == 2
    sentinel = create_broker(
        "redis+sentinel://:pw@s1:26379,s2/mymaster/3?prefix=s&sentinel_password=spw"
    )
    assert isinstance(sentinel, RedisBroker) and sentinel.mode == "sentinel"
    assert sentinel._sentinel is not None
    assert [c.connection_pool.connection_kwargs["port"] for c in sentinel._sentinel.sentinels] == [
        26379, 26379
    ]  # fmt: skip
    assert sentinel._sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "spw"
    (pool,) = sentinel._pubsub._pools
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "pw")
    with pytest.raises(ValueError, match="service"):
        create_broker("redis+sentinel://s1:26379/")


async def test_a_silently_dead_pubsub_link_is_noticed_and_replaced(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await cluster.node()
    target = urlsplit(REDIS_URL)
    proxy = Proxy((target.hostname or "127.0.0.1", target.port or 6379))
    port = await proxy.start()
    prefix = cast(RedisBroker, a).prefix
    via_proxy = create_broker(
        f"redis://127.0.0.1:{port}{target.path}?prefix={prefix}&ping_interval=0.1"
    )
    got = Recorder()
    try:
        await via_proxy.start(got)
        await via_proxy.subscribe("quiet")
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.redis"):
            await asyncio.sleep(0.6)  # idle for six ping intervals: pings keep the link
            assert "connection lost" not in caplog.text
            proxy.swallow_existing()
            async with asyncio.timeout(WAIT):
                while not got.publications("quiet"):
                    await a.publish("quiet", b"probe", KEEP)
                    await asyncio.sleep(0.05)
        assert "connection lost" in caplog.text and "reconnected" in caplog.text
        for i in range(10):
            await a.publish("quiet", b"%d" % i, KEEP)

        def numbered() -> list[Publication]:
            return [p for p in got.publications("quiet") if p.data != b"probe"]

        await got.until(lambda: len(numbered()) >= 10)
        assert [p.data for p in numbered()] == [b"%d" % i for i in range(10)]
        offsets = [p.offset for p in numbered()]
        assert offsets == list(range(offsets[0], offsets[0] + 10))
    finally:
        await via_proxy.close()
        await proxy.stop()
