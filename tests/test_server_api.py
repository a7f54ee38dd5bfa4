"""Centrifugo's server HTTP API, driven by ``cent`` (Centrifugo's own Python API client)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import jwt
import orjson
import pytest
import websockets
from cent import (
    AsyncClient,
    BatchRequest,
    BroadcastRequest,
    CentApiResponseError,
    CentUnauthorizedError,
    ChannelsRequest,
    HistoryRemoveRequest,
    HistoryRequest,
    InfoRequest,
    PresenceRequest,
    PresenceStatsRequest,
    PublishRequest,
    StreamPosition,
)

from tidings import ChannelOptions, Settings, control
from tidings import StreamPosition as PositionResult
from tidings.server_api import IdempotencyCache

from .conftest import Running, Serve
from .test_raw import recv_n

KEY = "test-api-key"
SECRET = "test-hmac-secret-that-is-long-enough-for-hs256"


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {
        "api_key": KEY,
        "namespaces": {
            "room": ChannelOptions(presence=True, allow_subscribe="anonymous"),
            "nohist": ChannelOptions(history_size=0),
        },
        "defaults": ChannelOptions(allow_subscribe="anonymous"),
    }
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


CentFor = Callable[..., AsyncClient]


async def subscriber(srv: Running, channel: str, query: str = "") -> websockets.ClientConnection:
    """A raw WebSocket on ``channel``, returned once the server has subscribed it."""
    before = srv.hub.subscribers(channel)
    ws = await websockets.connect(f"{srv.ws}/ws/{channel}{query}")
    for _ in range(500):
        if srv.hub.subscribers(channel) > before:
            return ws
        await asyncio.sleep(0.01)
    raise AssertionError(f"{channel} was not subscribed")


@pytest.fixture
async def cent_for() -> AsyncIterator[CentFor]:
    """``cent_for(server, key=KEY)``: a cent AsyncClient for that server, closed at teardown."""
    clients: list[AsyncClient] = []

    def make(srv: Running, key: str = KEY) -> AsyncClient:
        client = AsyncClient(f"{srv.url}/api", key)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def test_publish_reaches_subscriber_and_history_reads_back(
    serve: Serve, cent_for: CentFor
) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    ws = await subscriber(srv, "news")
    try:
        first = await api.publish(PublishRequest(channel="news", data={"n": 0}))
        for i in range(1, 5):
            await api.publish(PublishRequest(channel="news", data={"n": i}, tags={"k": str(i)}))
        assert await recv_n(ws, 5) == [f'{{"n":{i}}}' for i in range(5)]
    finally:
        await ws.close()
    assert first.offset == 1 and first.epoch

    only_position = await api.history(HistoryRequest(channel="news"))
    assert only_position.publications == []
    assert (only_position.offset, only_position.epoch) == (5, first.epoch)

    every = await api.history(HistoryRequest(channel="news", limit=-1))
    assert [p.data for p in every.publications] == [{"n": i} for i in range(5)]
    assert [p.offset for p in every.publications] == [1, 2, 3, 4, 5]
    assert every.publications[1].tags == {"k": "1"}

    since = StreamPosition(offset=2, epoch=first.epoch)
    after = await api.history(HistoryRequest(channel="news", since=since, limit=2))
    assert [p.offset for p in after.publications] == [3, 4]

    newest = await api.history(HistoryRequest(channel="news", limit=2, reverse=True))
    assert [p.offset for p in newest.publications] == [5, 4]

    before = await api.history(
        HistoryRequest(
            channel="news",
            since=StreamPosition(offset=4, epoch=first.epoch),
            limit=10,
            reverse=True,
        )
    )
    assert [p.offset for p in before.publications] == [3, 2, 1]

    with pytest.raises(CentApiResponseError) as lost:
        await api.history(
            HistoryRequest(channel="news", limit=5, since=StreamPosition(offset=1, epoch="other"))
        )
    assert lost.value.code == 112


async def test_broadcast_answers_per_channel(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    subs = [await subscriber(srv, ch) for ch in ("a", "b")]
    try:
        result = await api.broadcast(BroadcastRequest(channels=["a", "nope:x", "b"], data="hello"))
        assert [await recv_n(ws, 1) for ws in subs] == [["hello"], ["hello"]]
    finally:
        for ws in subs:
            await ws.close()
    a, unknown, b = result.responses
    assert a.result is not None and a.result.offset == 1 and a.error is None
    assert b.result is not None and b.result.offset == 1
    assert unknown.result is None and unknown.error is not None and unknown.error.code == 102


async def test_presence_history_remove_and_not_available(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    presence = await api.presence(PresenceRequest(channel="room:1"))
    assert isinstance(presence.presence, dict)
    stats = await api.presence_stats(PresenceStatsRequest(channel="room:1"))
    assert stats.num_clients == len(presence.presence) and stats.num_users >= 0
    with pytest.raises(CentApiResponseError) as off:
        await api.presence(PresenceRequest(channel="news"))
    assert off.value.code == 108

    await api.publish(PublishRequest(channel="news", data=1))
    await api.publish(PublishRequest(channel="news", data=2))
    await api.history_remove(HistoryRemoveRequest(channel="news"))
    after = await api.history(HistoryRequest(channel="news", limit=-1))
    assert after.publications == [] and after.offset == 2

    with pytest.raises(CentApiResponseError) as nohist:
        await api.history(HistoryRequest(channel="nohist:x", limit=1))
    assert nohist.value.code == 108


async def test_channels_and_info_describe_this_node(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    subs = [await subscriber(srv, ch) for ch in ("room:1", "room:1", "lobby")]
    try:
        everything = await api.channels(ChannelsRequest())
        assert {k: v.num_clients for k, v in everything.channels.items()} == {
            "room:1": 2,
            "lobby": 1,
        }
        rooms = await api.channels(ChannelsRequest(pattern="room:*"))
        assert list(rooms.channels) == ["room:1"]
        info = await api.info(InfoRequest())
    finally:
        for ws in subs:
            await ws.close()
    (node,) = info.nodes
    assert node.uid == srv.hub.node_id
    assert (node.num_clients, node.num_channels, node.num_subs) == (3, 2, 3)
    assert node.version and node.name


async def test_batch_sequential_and_parallel(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    for parallel in (False, True):
        result = await api.batch(
            BatchRequest(
                requests=[
                    PublishRequest(channel="batch", data={"i": 1}),
                    PublishRequest(channel="other", data={"i": 2}),
                    PresenceStatsRequest(channel="room:1"),
                ],
                parallel=parallel,
            )
        )
        first, second, stats = result.replies
        assert first.epoch and second.epoch  # type: ignore[attr-defined]
        assert stats.num_clients == 0  # type: ignore[attr-defined]
    history = await api.history(HistoryRequest(channel="batch", limit=-1))
    assert [p.data for p in history.publications] == [{"i": 1}, {"i": 1}]


async def test_errors_map_to_cent_exceptions(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    with pytest.raises(CentApiResponseError) as unknown:
        await api.publish(PublishRequest(channel="nope:x", data=1))
    assert unknown.value.code == 102
    with pytest.raises(CentApiResponseError) as blank:
        await api.publish(PublishRequest(channel="", data=1))
    assert blank.value.code == 107
    with pytest.raises(CentUnauthorizedError):
        await cent_for(srv, "wrong-key").publish(PublishRequest(channel="news", data=1))


async def test_http_shapes_auth_headers_and_bad_bodies(serve: Serve) -> None:
    srv = await serve(settings())
    async with httpx.AsyncClient(base_url=srv.url) as http:
        ok = await http.post(
            "/api/publish",
            json={"channel": "news", "data": {"x": 1}},
            headers={"Authorization": f"apikey {KEY}"},
        )
        assert ok.status_code == 200 and ok.json()["result"]["offset"] == 1
        anon = await http.post("/api/publish", json={"channel": "news", "data": 1})
        assert anon.status_code == 401 and anon.json()["error"]["code"] == 101
        auth = {"X-API-Key": KEY}
        broken = await http.post("/api/publish", content=b"{nope", headers=auth)
        assert broken.status_code == 400 and broken.json()["error"]["code"] == 107
        wrong_type = await http.post("/api/history", json={"channel": 5}, headers=auth)
        assert wrong_type.status_code == 400 and "channel" in wrong_type.json()["error"]["message"]
        no_data = await http.post("/api/publish", json={"channel": "news"}, headers=auth)
        assert no_data.status_code == 400
        missing = await http.post("/api/nosuch", json={}, headers=auth)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == 104
        in_batch = await http.post(
            "/api/batch",
            json={"commands": [{"nosuch": {}}, {"publish": {"channel": "news", "data": 2}}]},
            headers=auth,
        )
        replies = in_batch.json()["replies"]
        assert replies[0]["error"]["code"] == 104 and replies[1]["publish"]["offset"] == 2


async def test_dev_mode_api_is_open(serve: Serve) -> None:
    srv = await serve()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/api/info", content=b"")
    assert r.status_code == 200 and r.json()["result"]["nodes"][0]["uid"] == srv.hub.node_id


async def test_idempotency_skip_history_and_b64data(serve: Serve, cent_for: CentFor) -> None:
    srv = await serve(settings())
    api: AsyncClient = cent_for(srv)
    ws = await subscriber(srv, "news")
    try:
        once = [
            await api.publish(PublishRequest(channel="news", data="a", idempotency_key="k1"))
            for _ in range(3)
        ]
        assert {r.offset for r in once} == {1}
        skipped = await api.publish(PublishRequest(channel="news", data="b", skip_history=True))
        assert skipped.offset == 2
        encoded = base64.b64encode(b'{"bin": true}').decode()
        await api.publish(PublishRequest(channel="news", data=None, b64data=encoded))
        assert await recv_n(ws, 3) == ["a", "b", '{"bin":true}']
    finally:
        await ws.close()
    history = await api.history(HistoryRequest(channel="news", limit=-1))
    assert [p.data for p in history.publications] == ["a", {"bin": True}]
    with pytest.raises(CentApiResponseError) as not_json:
        await api.publish(
            PublishRequest(channel="news", data=None, b64data=base64.b64encode(b"\x00").decode())
        )
    assert not_json.value.code == 107


def _token(user: str) -> str:
    return jwt.encode({"sub": user}, SECRET, algorithm="HS256")


async def _closed(ws: websockets.ClientConnection) -> tuple[int, str]:
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_disconnect_and_unsubscribe_reach_users_on_another_node(serve: Serve) -> None:
    shared = f"memory://api-{uuid.uuid4().hex}"
    node_a = await serve(settings(broker_url=shared, token_hmac_secret=SECRET))
    node_b = await serve(settings(broker_url=shared, token_hmac_secret=SECRET))
    alice = [await subscriber(node_b, f"c{i}", f"?token={_token('alice')}") for i in (1, 2)]
    bob = await subscriber(node_b, "c1", f"?token={_token('bob')}")
    auth = {"X-API-Key": KEY}
    async with httpx.AsyncClient(base_url=node_a.url, headers=auth) as http:
        await http.post("/api/broadcast", json={"channels": ["c1", "c2"], "data": "hi"})
        for ws in (*alice, bob):
            assert await recv_n(ws, 1) == ["hi"]

        r = await http.post("/api/unsubscribe", json={"user": "alice", "channel": "c2"})
        assert r.json() == {"result": {}}
        assert (await _closed(alice[1]))[0] == 1008

        (client,) = [s.client_id for s in node_b.hub.users["alice"]]
        r = await http.post(
            "/api/disconnect",
            json={"user": "alice", "client": "someone-else", "disconnect": {"code": 4001}},
        )
        assert r.json() == {"result": {}}
        r = await http.post(
            "/api/disconnect",
            json={"user": "alice", "client": client, "disconnect": {"code": 4001, "reason": "bye"}},
        )
        assert await _closed(alice[0]) == (4001, "bye")

        r = await http.post("/api/disconnect", json={"user": "bob"})
        assert await _closed(bob) == (3503, "force disconnect")

        bad = await http.post("/api/disconnect", json={"user": "bob", "disconnect": {"code": 1}})
        assert bad.status_code == 400
        for method in ("subscribe", "refresh"):
            r = await http.post(f"/api/{method}", json={"user": "carol", "channel": "c1"})
            assert r.json() == {"result": {}}
        r = await http.post("/api/subscribe", json={"user": "carol", "channel": "nope:x"})
        assert r.json()["error"]["code"] == 102
        r = await http.post("/api/refresh", json={})
        assert r.json()["error"]["code"] == 107


async def test_control_messages_have_the_fixed_schema(serve: Serve) -> None:
    srv = await serve(settings())
    seen: list[control.ControlMessage] = []
    sent: list[bytes] = []
    srv.hub.on_control_message(seen.append)
    publish_control = srv.hub.broker.publish_control

    async def spy(data: bytes) -> None:
        sent.append(data)
        await publish_control(data)

    srv.hub.broker.publish_control = spy  # type: ignore[method-assign]
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": KEY}) as http:
        await http.post("/api/subscribe", json={"user": "u", "channel": "room:1"})
        await http.post("/api/unsubscribe", json={"user": "u", "channel": "room:1", "client": "c"})
        await http.post("/api/disconnect", json={"user": "u"})
        await http.post("/api/refresh", json={"user": "u", "expire_at": 2000000000})
        await http.post("/api/refresh", json={"user": "u", "client": "c", "expired": True})
    assert [orjson.loads(data) for data in sent] == [
        {"op": "subscribe", "user": "u", "client": "", "channel": "room:1"},
        {"op": "unsubscribe", "user": "u", "client": "c", "channel": "room:1"},
        {"op": "disconnect", "user": "u", "client": "", "code": 3503, "reason": "force disconnect"},
        {"op": "refresh", "user": "u", "client": "", "expire_at": 2000000000, "expired": False},
        {"op": "refresh", "user": "u", "client": "c", "expire_at": None, "expired": True},
    ]
    assert seen == [
        control.SubscribeUser(user="u", channel="room:1"),
        control.UnsubscribeUser(user="u", client="c", channel="room:1"),
        control.DisconnectUser(user="u"),
        control.RefreshUser(user="u", expire_at=2000000000),
        control.RefreshUser(user="u", client="c", expired=True),
    ]


async def test_api_is_closed_without_a_key_outside_dev_mode(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for path in ("/api/publish", "/push"):
            r = await http.post(path, json={"channel": "news", "data": 1, "message": "m"})
            assert r.status_code == 401 and "TIDINGS_API_KEY" in r.json()["error"]["message"]


async def test_idempotency_cache_is_shared_in_flight_and_bounded() -> None:
    calls: list[int] = []

    async def publish() -> PositionResult:
        calls.append(1)
        await asyncio.sleep(0)
        return PositionResult(len(calls), "e")

    cache = IdempotencyCache(ttl=60, max_keys=2)
    together = await asyncio.gather(*(cache.run(("ch", "k"), publish) for _ in range(5)))
    assert {p.offset for p in together} == {1} and len(calls) == 1
    await cache.run(("ch", "k2"), publish)
    await cache.run(("other", "k"), publish)  # a key is per channel; evicts the oldest
    assert len(cache) == 2 and len(calls) == 3
    assert (await cache.run(("ch", "k"), publish)).offset == 4

    async def fail() -> PositionResult:
        raise RuntimeError("broker down")

    with pytest.raises(RuntimeError):
        await cache.run(("ch", "retry"), fail)
    assert (await cache.run(("ch", "retry"), publish)).offset == 5  # a failure is not kept
    assert (await IdempotencyCache(0, 10).run(("ch", "k"), publish)).offset == 6  # ttl 0: off


async def test_body_limits(serve: Serve) -> None:
    srv = await serve(settings(api_max_body_size=2048))
    big = {"channel": "news", "data": "x" * 4096}
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": KEY}) as http:
        r = await http.post("/api/publish", json=big)
        assert r.status_code == 413 and "2048" in r.json()["error"]["message"]

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: read as it streams
            for _ in range(4):
                yield b" " * 1024

        r = await http.post("/api/info", content=chunks())
        assert r.status_code == 413
        r = await http.post("/api/publish", json={"channel": "news", "data": "x" * 1024})
        assert r.status_code == 200 and r.json()["result"]["offset"] == 1


async def test_idempotent_waiter_publishes_itself_when_the_first_try_is_cancelled() -> None:
    cache = IdempotencyCache(ttl=60, max_keys=10)
    started = asyncio.Event()

    async def hang() -> PositionResult:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def publish() -> PositionResult:
        return PositionResult(7, "e")

    first = asyncio.create_task(cache.run(("ch", "k"), hang))
    await started.wait()
    second = asyncio.create_task(cache.run(("ch", "k"), publish))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).offset == 7
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_legacy_single_endpoint_with_newline_delimited_commands(serve: Serve) -> None:
    srv = await serve(settings())
    body = (
        b'{"id": 1, "method": "publish", "params": {"channel": "news", "data": "a"}}\n'
        b'{"id": 2, "method": "history", "params": {"channel": "news", "limit": -1}}\n'
        b'{"method": "nosuch", "params": {}}\n'
    )
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": KEY}) as http:
        r = await http.post("/api", content=body)
        assert r.status_code == 200
        published, history, unknown = (orjson.loads(line) for line in r.content.split(b"\n"))
        assert published["id"] == 1 and published["result"]["offset"] == 1
        assert history["id"] == 2 and history["result"]["publications"][0]["data"] == "a"
        assert unknown == {"error": {"code": 104, "message": "method not found: nosuch"}}
        assert (await http.post("/api", content=b"{nope")).status_code == 400
        assert (await http.post("/api", content=b"")).status_code == 400


async def test_transport_error_mode_uses_http_statuses(serve: Serve) -> None:
    srv = await serve(settings())
    headers = {"X-API-Key": KEY, "X-Centrifugo-Error-Mode": "transport"}
    async with httpx.AsyncClient(base_url=srv.url, headers=headers) as http:
        r = await http.post("/api/publish", json={"channel": "nope:x", "data": 1})
        assert r.status_code == 404 and r.json()["code"] == 102
        r = await http.post("/api/presence", json={"channel": "news"})
        assert r.status_code == 400 and r.json()["code"] == 108
        r = await http.post("/api/publish", json={"channel": "news", "data": 1})
        assert r.status_code == 200 and r.json()["result"]["offset"] == 1
