"""The official Python SDK (centrifuge-python) against tidings, unchanged, over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    DisconnectedContext,
    PublicationContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    SubscribedContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

from .cfutil import SECRET, token
from .conftest import Running, Serve

NAMESPACES = {
    "chat": {
        "presence": True,
        "allow_publish": True,
        "force_recovery": True,
        "allow_subscribe": "authenticated",
    },
    "vip": {"allow_subscribe": "token"},
}


class SubEvents(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: asyncio.Queue[PublicationContext] = asyncio.Queue()
        self.subscribed: asyncio.Queue[SubscribedContext] = asyncio.Queue()
        self.unsubscribed: asyncio.Queue[UnsubscribedContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.pubs.put(ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        await self.subscribed.put(ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        await self.unsubscribed.put(ctx)


class ClientEvents(ClientEventHandler):
    def __init__(self) -> None:
        self.disconnected: asyncio.Queue[DisconnectedContext] = asyncio.Queue()
        self.subscribed: asyncio.Queue[ServerSubscribedContext] = asyncio.Queue()
        self.pubs: asyncio.Queue[ServerPublicationContext] = asyncio.Queue()

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        await self.disconnected.put(ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        await self.subscribed.put(ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        await self.pubs.put(ctx)


async def next_item(queue: asyncio.Queue[Any], wait: float = 5.0) -> Any:
    return await asyncio.wait_for(queue.get(), wait)


def sdk_client(srv: Running, events: ClientEvents | None = None, **kwargs: Any) -> Client:
    return Client(
        f"{srv.ws}/connection/websocket", events=events or ClientEvents(), proxy=None, **kwargs
    )


async def http_publish(srv: Running, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": "key"}) as http:
        r = await http.post("/api/publish", json={"channel": channel, "data": data})
        assert r.status_code == 200 and "result" in r.json(), r.text


@pytest.fixture
async def server(serve: Serve) -> Running:
    return await serve(token_hmac_secret=SECRET, api_key="key", namespaces=NAMESPACES)


async def test_sdk_connect_subscribe_publish_presence_history(server: Running) -> None:
    client = sdk_client(server, token=token("alice", info={"name": "Alice"}))
    await client.connect()
    await client.ready()
    events = SubEvents()
    sub = client.new_subscription("chat:lobby", events)
    await sub.subscribe()
    await sub.ready()
    await http_publish(server, "chat:lobby", {"n": 1})
    assert (await next_item(events.pubs)).pub.data == {"n": 1}
    await sub.publish({"n": 2})
    got = (await next_item(events.pubs)).pub
    assert got.data == {"n": 2} and got.offset == 2
    assert got.info is not None and got.info.user == "alice"
    presence = await sub.presence()
    assert [c.user for c in presence.clients.values()] == ["alice"]
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (1, 1)
    history = await sub.history(limit=-1)
    assert [p.data for p in history.publications] == [{"n": 1}, {"n": 2}]
    assert history.offset == 2
    await client.disconnect()


async def test_sdk_recovers_missed_publications_after_reconnect(server: Running) -> None:
    client = sdk_client(server, token=token("alice"))
    await client.connect()
    events = SubEvents()
    sub = client.new_subscription("chat:news", events, recoverable=True)
    await sub.subscribe()
    first = await next_item(events.subscribed)
    assert first.recoverable and not first.was_recovering
    await http_publish(server, "chat:news", "before")
    assert (await next_item(events.pubs)).pub.data == "before"
    await client.disconnect()
    for i in range(3):
        await http_publish(server, "chat:news", f"missed {i}")
    await client.connect()
    again = await next_item(events.subscribed)
    assert again.was_recovering and again.recovered
    recovered = [(await next_item(events.pubs)).pub for _ in range(3)]
    assert [p.data for p in recovered] == ["missed 0", "missed 1", "missed 2"]
    assert [p.offset for p in recovered] == [2, 3, 4]
    await http_publish(server, "chat:news", "live")
    assert (await next_item(events.pubs)).pub.data == "live"
    assert events.pubs.empty()
    await client.disconnect()


async def test_sdk_refreshes_expired_and_expiring_tokens(serve: Serve) -> None:
    srv = await serve(
        token_hmac_secret=SECRET, api_key="key", namespaces=NAMESPACES, expired_close_delay=1.0
    )
    calls: list[int] = []

    async def get_token() -> str:
        calls.append(1)
        return token("alice", ttl=3600 if len(calls) > 1 else 2)

    # starts with an expired token: error 109 -> the SDK asks get_token and reconnects
    client = sdk_client(srv, token=token("alice", ttl=-5), get_token=get_token)
    await client.connect()
    await client.ready()
    assert len(calls) == 1
    (session,) = srv.hub.sessions
    conn = session.protocol
    short = conn.creds.who.expires
    # the connection's ttl is 2 s: the SDK refreshes with get_token before the server closes it
    for _ in range(500):
        if conn.creds.who.expires != short:
            break
        await asyncio.sleep(0.02)
    assert len(calls) == 2 and conn.creds.who.expires > short + 3000
    events = SubEvents()
    sub = client.new_subscription("chat:after", events)
    await sub.subscribe()
    await sub.ready()
    await http_publish(srv, "chat:after", "still connected")
    assert (await next_item(events.pubs)).pub.data == "still connected"
    assert client.state == ClientState.CONNECTED and srv.hub.sessions == {session}
    await client.disconnect()


async def test_sdk_invalid_token_is_terminal(server: Running) -> None:
    events = ClientEvents()
    bad = token("alice", secret="another-secret-another-secret-another")
    client = sdk_client(server, events, token=bad)
    await client.connect()
    ctx = await next_item(events.disconnected)
    assert (ctx.code, ctx.reason) == (3500, "invalid token")
    assert client.state == ClientState.DISCONNECTED


async def test_sdk_permission_denied_is_103(server: Running) -> None:
    client = sdk_client(server, token=token("alice"))
    await client.connect()
    events = SubEvents()
    sub = client.new_subscription("vip:lounge", events)
    await sub.subscribe()
    ctx = await next_item(events.unsubscribed)
    assert (ctx.code, ctx.reason) == (103, "subscribing to 'vip:lounge' needs a subscription token")
    granted = SubEvents()
    allowed = client.new_subscription(
        "vip:ok", granted, token=token("alice", channel="vip:ok", ttl=None)
    )
    await allowed.subscribe()
    await allowed.ready()
    await client.disconnect()


async def test_sdk_rpc(server: Running) -> None:
    @server.hub.rpc("whoami")
    async def whoami(session: Any, data: Any) -> dict[str, Any]:
        return {"user": session.user, "echo": data}

    client = sdk_client(server, token=token("carol"))
    await client.connect()
    result = await client.rpc("whoami", {"x": 1})
    assert result.data == {"user": "carol", "echo": {"x": 1}}
    await client.disconnect()


async def test_sdk_server_side_subscriptions_from_token_and_control(server: Running) -> None:
    events = ClientEvents()
    client = sdk_client(server, events, token=token("dave", channels=["chat:boot"]))
    await client.connect()
    assert (await next_item(events.subscribed)).channel == "chat:boot"
    await http_publish(server, "chat:boot", "from token")
    got = await next_item(events.pubs)
    assert (got.channel, got.pub.data) == ("chat:boot", "from token")
    message = {"op": "subscribe", "user": "dave", "channel": "chat:later"}
    await server.hub.broker.publish_control(orjson.dumps(message))
    assert (await next_item(events.subscribed)).channel == "chat:later"
    await http_publish(server, "chat:later", "from control")
    got = await next_item(events.pubs)
    assert (got.channel, got.pub.data) == ("chat:later", "from control")
    await client.disconnect()
