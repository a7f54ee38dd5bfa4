"""Two tidings servers sharing one broker act as one: publish on A, subscribers on B get it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest
import websockets

from .conftest import Serve
from .engines import ENGINES, WAIT, namespace

COUNT = 200


@pytest.fixture(params=sorted(ENGINES))
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with namespace(ENGINES[request.param]) as url:
        yield url


async def until_subscribed(
    ws: websockets.ClientConnection, http: httpx.AsyncClient, channel: str = "multi"
) -> None:
    """The raw endpoint subscribes after the handshake: probe until a publication arrives."""
    async with asyncio.timeout(WAIT):
        while True:
            r = await http.post("/api/publish", json={"channel": channel, "data": "probe"})
            assert r.status_code == 200, r.text
            try:
                await asyncio.wait_for(ws.recv(), 0.2)
                return
            except TimeoutError:
                continue


async def test_http_publish_on_one_node_reaches_websockets_on_another(
    serve: Serve, broker_url: str
) -> None:
    node_a = await serve(broker_url=broker_url)
    node_b = await serve(broker_url=broker_url)
    async with (
        httpx.AsyncClient(base_url=node_a.url) as http,
        websockets.connect(f"{node_b.ws}/ws/multi") as on_b,
        websockets.connect(f"{node_a.ws}/ws/multi") as on_a,
    ):
        await until_subscribed(on_b, http)
        await until_subscribed(on_a, http)
        offsets = []
        for i in range(COUNT):
            r = await http.post("/api/publish", json={"channel": "multi", "data": f"m{i}"})
            offsets.append(r.json()["result"]["offset"])
        assert offsets == list(range(offsets[0], offsets[0] + COUNT))
        for ws in (on_b, on_a):
            received: list[str] = []
            async with asyncio.timeout(WAIT):
                while len(received) < COUNT:
                    message = await ws.recv()
                    text = message if isinstance(message, str) else message.decode()
                    if text != "probe":
                        received.append(text)
            assert received == [f"m{i}" for i in range(COUNT)]
    assert node_b.hub.metrics.published == 0


async def test_concurrent_first_subscribers_on_a_node_all_receive(
    serve: Serve, broker_url: str
) -> None:
    """broadcaster's Redis backend loses some of many subscribers that arrive together."""
    node_a = await serve(broker_url=broker_url)
    node_b = await serve(broker_url=broker_url)
    inboxes: list[list[str]] = [[] for _ in range(30)]
    arrived = asyncio.Event()

    async def listen(inbox: list[str]) -> None:
        async with websockets.connect(f"{node_b.ws}/ws/crowd") as ws:
            async for message in ws:
                inbox.append(message if isinstance(message, str) else message.decode())
                arrived.set()

    readers = [asyncio.create_task(listen(inbox)) for inbox in inboxes]
    try:
        async with httpx.AsyncClient(base_url=node_a.url) as http, asyncio.timeout(WAIT):
            while not all(inboxes):  # each has its subscription once it saw a probe
                await http.post("/api/publish", json={"channel": "crowd", "data": "probe"})
                await asyncio.sleep(0.05)
            for i in range(50):
                await http.post("/api/publish", json={"channel": "crowd", "data": f"m{i}"})
            while any(len(inbox) < 50 or inbox[-1] != "m49" for inbox in inboxes):
                arrived.clear()
                await arrived.wait()
        for inbox in inboxes:
            assert [m for m in inbox if m != "probe"] == [f"m{i}" for i in range(50)]
        assert node_b.hub.subscribers("crowd") == 30
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_disconnect_user_on_one_node_closes_their_connections_on_another(
    serve: Serve, broker_url: str
) -> None:
    secret = "multinode-test-secret-long-enough-for-hs256"
    keys = {"token_hmac_secret": secret, "api_key": "multinode-key"}
    node_a = await serve(broker_url=broker_url, **keys)
    node_b = await serve(broker_url=broker_url, **keys)
    alice = jwt.encode({"sub": "alice"}, secret, algorithm="HS256")
    bob = jwt.encode({"sub": "bob"}, secret, algorithm="HS256")
    async with (
        httpx.AsyncClient(base_url=node_a.url, headers={"X-API-Key": "multinode-key"}) as http,
        websockets.connect(f"{node_b.ws}/ws/room?token={alice}") as alice_ws,
        websockets.connect(f"{node_b.ws}/ws/room?token={bob}") as bob_ws,
    ):
        await until_subscribed(alice_ws, http, "room")
        await until_subscribed(bob_ws, http, "room")
        await node_a.hub.disconnect("alice", 3000, "bye")
        async with asyncio.timeout(WAIT):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await alice_ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3000
        await node_a.hub.publish("room", "still here")
        async with asyncio.timeout(WAIT):
            while await bob_ws.recv() != "still here":
                pass
