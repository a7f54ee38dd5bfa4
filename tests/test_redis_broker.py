"""What only the Redis engine has: reconnection, key prefixes, URL options, its wire format."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from tidings.brokers import ClientInfo, HistoryOptions, create_broker
from tidings.brokers.redis import RedisBroker

from .engines import ENGINES, REDIS_URL, Cluster, namespace, with_prefix
from .test_broker_contract import KEEP, sentinel


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
    assert keys == [f"{a.prefix}:{kind}:k" for kind in ("hist", "meta", "pres", "presz")]
    ttls = {k.rsplit(":", 2)[1]: await client.pttl(k) for k in keys}
    assert 0 < ttls["hist"] <= 30_000
    assert 30_000 < ttls["meta"] <= 600_000
    assert 0 < ttls["pres"] <= 20_000 and 0 < ttls["presz"] <= 20_000


async def test_malformed_messages_are_skipped(cluster: Cluster, client: Redis) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, RedisBroker)
    await b.subscribe("bad")
    topic = f"{b.prefix}:ch:bad"
    for junk in (b"", b"Pnonsense", b"P1 e\nnot json\n1", b"J\n{}", b"?"):
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
    assert (tuned.prefix, tuned.subscribe_timeout, tuned.ping_interval) == ("app1", 3.0, 4.0)
    kwargs = tuned._pool.connection_kwargs
    assert (kwargs["db"], kwargs["socket_timeout"], kwargs["port"]) == (2, 7.0, 6380)
    assert with_prefix("redis://h/0?x=1", "p") == "redis://h/0?x=1&prefix=p"
