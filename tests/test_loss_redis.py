"""A Redis restarted without persistence while subscribers are open (issue 10, section 1):
the new epoch reaches every subscriber as a fact, and the first publish after the restart is
answered (a stale pooled connection is retried once, safely). A private redis-server: the test
kills it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets
from centrifuge import SubscribingContext

from . import redis_servers
from .conftest import IN_CI, Serve, free_port
from .test_centrifuge_sdk import SubEvents, next_item, sdk_client
from .test_fast import wait_for


class Resubscribing(SubEvents):
    def __init__(self) -> None:
        super().__init__()
        self.subscribing: asyncio.Queue[SubscribingContext] = asyncio.Queue()

    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        await self.subscribing.put(ctx)


@pytest.fixture
def private_redis() -> Iterator[tuple[redis_servers.Servers, int]]:
    if not redis_servers.available():
        message = "redis-server / redis-cli not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    servers, port = redis_servers.Servers(), free_port()
    servers.start(port)
    try:
        yield servers, port
    finally:
        servers.stop()


async def test_a_redis_restart_tells_every_subscriber_and_publishes_go_on(
    serve: Serve, private_redis: tuple[redis_servers.Servers, int]
) -> None:
    """Redis restarted without persistence: the raw subscriber is closed 3010, the SDK's
    recoverable subscription is unsubscribed (2500), resubscribes and hears
    ``recovered: false`` — never the new stream's offsets after the old one's. The first
    publish after the restart (over a stale pooled connection) is answered."""
    servers, port = private_redis
    srv = await serve(
        broker_url=f"redis://127.0.0.1:{port}/0", namespaces={"room": {"force_recovery": True}}
    )
    client = sdk_client(srv)
    events = Resubscribing()
    sub = client.new_subscription("room:a", events, recoverable=True)
    await client.connect()
    await sub.subscribe()
    await next_item(events.subscribed)
    assert (await next_item(events.subscribing)).code == 0  # the first subscribe's
    async with websockets.connect(f"{srv.ws}/ws/room:a") as ws, httpx.AsyncClient() as http:
        await wait_for(lambda: srv.hub.subscribers("room:a") == 2)
        first = await http.post(f"{srv.url}/api/publish", json={"channel": "room:a", "data": 1})
        assert first.json()["result"]["offset"] == 1
        assert await asyncio.wait_for(ws.recv(), 10) == "1"
        assert (await next_item(events.pubs, 10)).pub.offset == 1
        servers.kill(port)
        servers.start(port)  # empty: the stream starts again, a new epoch
        answers = []
        for i in (2, 3, 4):  # the first goes over a pooled connection the restart made stale
            r = await http.post(f"{srv.url}/api/publish", json={"channel": "room:a", "data": i})
            answers.append(r.json()["result"])
        assert [a["offset"] for a in answers] == [1, 2, 3]
        assert answers[0]["epoch"] != first.json()["result"]["epoch"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:  # never 2, 3, 4 spliced after 1 as if the stream went on
                assert await asyncio.wait_for(ws.recv(), 30) not in ("2", "3", "4")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
    resubscribing = await next_item(events.subscribing, 30)
    assert (resubscribing.code, resubscribing.reason) == (2500, "insufficient state")
    again = await next_item(events.subscribed, 30)
    assert again.was_recovering and not again.recovered
    assert events.pubs.empty()  # nothing of the new stream passed off as offsets 2, 3, 4
    assert srv.hub.metrics.gaps_lost >= 1
    async with websockets.connect(f"{srv.ws}/ws/room:a") as ws:  # a reload gets the new stream
        await wait_for(lambda: srv.hub.subscribers("room:a") == 2)
        await srv.hub.publish("room:a", 5)
        assert await asyncio.wait_for(ws.recv(), 10) == "5"
        pub = (await next_item(events.pubs, 10)).pub
        assert (pub.offset, pub.data) == (4, 5)
    await client.disconnect()


async def test_a_channels_first_publication_lost_in_a_broker_drop_is_healed(
    serve: Serve, private_redis: tuple[redis_servers.Servers, int]
) -> None:
    """The channel's first publication is larger than the pub/sub output-buffer limit: Redis
    drops the node's pub/sub connection with it. After the reconnect both a raw subscriber and
    a recoverable SDK subscriber at offset 0 get offsets 1 and 2, in order: the hub had a
    baseline for the channel (read at subscribe time) although nothing was delivered yet."""
    port = private_redis[1]
    redis_servers._redis_cli(port, "CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 0 0")
    srv = await serve(
        broker_url=f"redis://127.0.0.1:{port}/0",
        namespaces={"cold": {"force_recovery": True}},
    )
    big = "x" * 100_000  # past the 64 KiB pub/sub limit: Redis drops the subscriber with it
    client = sdk_client(srv)
    events = SubEvents()
    sub = client.new_subscription("cold:feed", events, recoverable=True)
    async with websockets.connect(f"{srv.ws}/ws/cold:feed") as ws:
        await client.connect()
        await sub.subscribe()
        await next_item(events.subscribed)
        await wait_for(lambda: srv.hub.subscribers("cold:feed") == 2)
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{srv.url}/api/publish", json={"channel": "cold:feed", "data": big}
            )
            assert r.json()["result"]["offset"] == 1
            # wait until the node noticed the drop and healed, then publish the second
            got = [str(await asyncio.wait_for(ws.recv(), 30))]
            r = await http.post(f"{srv.url}/api/publish", json={"channel": "cold:feed", "data": 2})
            assert r.json()["result"]["offset"] == 2
        got.append(str(await asyncio.wait_for(ws.recv(), 30)))
    assert got == [big, "2"]
    pubs = [(await next_item(events.pubs, 30)).pub for _ in range(2)]
    assert [(p.offset, p.data) for p in pubs] == [(1, big), (2, 2)]
    assert events.unsubscribed.empty()
    assert srv.hub.metrics.gaps_healed >= 1
    await client.disconnect()
