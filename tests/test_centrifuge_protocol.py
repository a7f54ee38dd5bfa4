"""Centrifugo client protocol v2 (JSON) at the frame level, over real sockets."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

import httpx
import orjson
import pytest

from tidings import Settings
from tidings.errors import PermissionDenied

from .cfutil import LAPSING, SECRET, Raw, token
from .conftest import Running, Serve

CHAT = {"chat": {"presence": True, "join_leave": True, "allow_publish": True}}


async def bystander(srv: Running, channel: str = "news") -> Raw:
    """A well-behaved client that must keep receiving while another one misbehaves."""
    c = await Raw.open(srv.ws)
    await c.connect()
    await c.subscribe(channel)
    return c


async def still_receives(srv: Running, c: Raw, channel: str = "news") -> None:
    seen = len([p for p in c.pushes if "pub" in p["push"]])
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/api/publish", json={"channel": channel, "data": {"still": "here"}})
        assert r.status_code == 200, r.text
    pubs = await c.publications(channel, seen + 1)
    assert pubs[-1]["data"] == {"still": "here"}


async def test_bench_flavor_frame_gets_replies_1_and_2_together(serve: Serve) -> None:
    srv = await serve()
    c = await Raw.open(srv.ws)
    await c.ws.send('{"id":1,"connect":{"name":"bench"}}\n{"id":2,"subscribe":{"channel":"t0"}}')
    frame = await c.read_frame()
    assert [item.get("id") for item in frame] == [1, 2]
    assert frame[0]["connect"]["pong"] is True and frame[0]["connect"]["ping"] == 25
    assert "subscribe" in frame[1]
    async with httpx.AsyncClient(base_url=srv.url) as http:
        await http.post("/api/publish", json={"channel": "t0", "data": "#1:123:xx"})
    (pub,) = await c.publications("t0", 1)
    assert pub == {"data": "#1:123:xx", "offset": 1}
    await c.close()


async def test_batched_commands_get_their_replies_in_one_frame(serve: Serve) -> None:
    srv = await serve(namespaces=CHAT)
    c = await Raw.open(srv.ws)
    await c.connect()
    await c.subscribe("chat:room")
    ids = await c.send(
        {"presence_stats": {"channel": "chat:room"}},
        {"history": {"channel": "chat:room", "limit": -1}},
        {"unsubscribe": {"channel": "chat:room"}},
        {"subscribe": {"channel": "nope:room"}},
    )
    frame = await c.read_frame()
    assert [item.get("id") for item in frame] == ids
    assert frame[0]["presence_stats"] == {"num_clients": 1, "num_users": 1}
    assert frame[1]["history"].get("offset", 0) == 0 and frame[1]["history"]["epoch"]
    assert frame[2] == {"id": ids[2], "unsubscribe": {}}
    assert frame[3]["error"]["code"] == 102
    await c.close()


BadClient = Callable[[Raw], Awaitable[None]]


async def _bad_before_connect(c: Raw) -> None:
    await c.ws.send('{"id":1,"subscribe":{"channel":"news"}}')


async def _invalid_json(c: Raw) -> None:
    await c.connect()
    await c.ws.send('{"id":2,"subscribe":')


async def _unknown_method(c: Raw) -> None:
    await c.connect()
    await c.ws.send('{"id":2,"frobnicate":{"channel":"news"}}')


async def _binary_frame(c: Raw) -> None:
    await c.connect()
    await c.ws.send(b'{"id":2,"subscribe":{"channel":"news"}}')


async def _missing_id(c: Raw) -> None:
    await c.connect()
    await c.ws.send('{"subscribe":{"channel":"news"}}')


@pytest.mark.parametrize(
    "misbehave",
    [_bad_before_connect, _invalid_json, _unknown_method, _binary_frame, _missing_id],
    ids=["command-before-connect", "invalid-json", "unknown-method", "binary", "no-id"],
)
async def test_malformed_protocol_closes_3501_and_others_keep_receiving(
    serve: Serve, misbehave: BadClient
) -> None:
    srv = await serve()
    good = await bystander(srv)
    bad = await Raw.open(srv.ws)
    await misbehave(bad)
    code, reason = await bad.closed()
    assert code == 3501 and reason.startswith("bad request")
    await still_receives(srv, good)
    await good.close()


async def test_oversized_frame_closes_1009_and_others_keep_receiving(serve: Serve) -> None:
    srv = await serve(max_message_size=1024)
    good = await bystander(srv)
    bad = await Raw.open(srv.ws)
    await bad.connect()
    await bad.ws.send(orjson.dumps({"id": 2, "publish": {"channel": "news", "data": "x" * 4000}}))
    code, _ = await bad.closed()
    assert code == 1009
    await still_receives(srv, good)
    await good.close()


async def test_command_flood_gets_error_111_and_connection_stays(serve: Serve) -> None:
    srv = await serve(max_commands_per_second=0.001, command_burst=3)
    good = await bystander(srv)
    c = await Raw.open(srv.ws)
    await c.connect()  # 1 of the burst
    ids = await c.send(*({"presence_stats": {"channel": "news"}} for _ in range(5)))
    frame = await c.read_frame()
    codes = [item.get("error", {}).get("code") for item in frame]
    assert [item["id"] for item in frame] == ids
    assert codes[2:] == [111, 111, 111]
    assert frame[-1]["error"] == {"code": 111, "message": "too many requests", "temporary": True}
    assert codes[:2] == [108, 108]  # within the burst: a real answer (no presence in "news")
    assert (await c.call("history", channel="news"))["error"]["code"] == 111
    await still_receives(srv, good)
    await c.close()
    await good.close()


async def test_unanswered_ping_closes_3012(serve: Serve) -> None:
    srv = await serve(ping_interval=0.2, pong_timeout=0.3)
    c = await Raw.open(srv.ws)
    answered = await Raw.open(srv.ws)
    assert (await c.connect())["ping"] == 1
    await answered.connect()
    c.answer_pings = False

    async def keep_answering() -> None:
        while answered.pings < 4:  # answering keeps the connection: pings keep coming
            await answered.read_frame()

    (code, reason), _ = await asyncio.gather(c.closed(), keep_answering())
    assert (code, reason) == (3012, "no pong")
    assert c.pings == 1
    await answered.close()


async def test_pings_are_spread_and_closed_clients_leave_the_hub_wheel(serve: Serve) -> None:
    """Clients connecting together get their pings in different ticks of the hub's one timer;
    once they are gone the wheel holds nothing of them (sessions, token deadlines)."""
    srv = await serve(token_hmac_secret=SECRET, allow_anonymous=True)
    clients = [await Raw.open(srv.ws) for _ in range(30)]
    await asyncio.gather(
        *(c.connect(**({"token": token("alice", ttl=600)} if i % 2 else {}))
          for i, c in enumerate(clients))
    )  # fmt: skip
    sessions = list(srv.hub.sessions)
    assert len(sessions) == 30
    assert all(s.wheel_bucket is not None for s in sessions)  # a ping ahead, no timer each
    ticks = Counter(id(s.wheel_bucket) for s in sessions)
    # 30 first pings over the ~25 one-second ticks of the 25 s interval, not in one tick
    assert len(ticks) >= 12 and max(ticks.values()) <= 4
    assert len(srv.hub.wheel) == 30 + 15  # and the 15 token deadlines
    for c in clients:
        await c.close()
    for _ in range(500):
        if not srv.hub.sessions:
            break
        await asyncio.sleep(0.01)
    assert not srv.hub.sessions and len(srv.hub.wheel) == 0


async def test_pong_before_connect_is_a_bad_request(serve: Serve) -> None:
    srv = await serve()
    c = await Raw.open(srv.ws)
    await c.ws.send("{}")
    assert (await c.closed())[0] == 3501


async def test_recovery_with_publications_racing_has_no_gap_and_no_duplicate(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await serve(namespaces={"feed": {"force_recovery": True, "history_size": 1000}})
    hub = srv.hub
    first = await Raw.open(srv.ws)
    await first.connect()
    position = await first.subscribe("feed:x")
    await first.close()
    counter = iter(range(1000))
    for _ in range(20):
        await hub.publish("feed:x", next(counter))

    # The race made certain: while the recovering subscribe reads history, one publication
    # lands before the read (in history AND live: a duplicate unless deduplicated) and one
    # after it (live only: a gap unless the buffered publications are sent).
    read_history = hub.broker.history

    async def racing_history(channel: str, **options: object) -> object:
        await hub.publish(channel, next(counter))
        result = await read_history(channel, **options)
        await hub.publish(channel, next(counter))
        await asyncio.sleep(0.01)  # let the concurrent publisher run meanwhile too
        return result

    async def publish_meanwhile() -> None:
        for _ in range(30):
            await hub.publish("feed:x", next(counter))
            await asyncio.sleep(0.001)

    second = await Raw.open(srv.ws)
    await second.connect()
    monkeypatch.setattr(hub.broker, "history", racing_history)
    racer = asyncio.get_running_loop().create_task(publish_meanwhile())
    result = await second.subscribe(
        "feed:x", recover=True, offset=position.get("offset", 0), epoch=position["epoch"]
    )
    await racer
    total = next(counter)  # publications made: 0 .. total-1
    assert result["recovered"] is True and result["was_recovering"] is True
    recovered = [p["data"] for p in result["publications"]]
    assert recovered[:21] == list(range(21))
    live = [p["data"] for p in await second.publications("feed:x", total - len(recovered))]
    assert recovered + live == list(range(total))
    with pytest.raises(TimeoutError):
        await second.read_frame(wait=0.3)  # nothing more (no duplicate at the end)
    await second.close()


async def test_recovery_skips_late_broker_copies_of_recovered_publications(
    serve: Serve,
) -> None:
    """A networked broker may deliver a publication after a history read already returned it;
    the recovering client must not get it twice."""
    srv = await serve(namespaces={"feed": {"force_recovery": True}})
    hub = srv.hub
    c = await Raw.open(srv.ws)
    await c.connect()
    position = await c.subscribe("feed:late")
    await c.close()
    await hub.publish("feed:late", "missed")
    other = await bystander(srv, "feed:late")  # this node keeps receiving the channel
    c = await Raw.open(srv.ws)
    await c.connect()
    late: list[object] = []
    hub.on_publication = late.append  # the broker's deliveries lag behind (kept in order)
    try:
        await hub.publish("feed:late", "in history, delivered late")
        result = await c.subscribe(
            "feed:late", recover=True, offset=position.get("offset", 0), epoch=position["epoch"]
        )
    finally:
        del hub.on_publication
    for pub in late:
        hub.on_publication(pub)
    await hub.publish("feed:late", "live")
    assert [p["data"] for p in result["publications"]] == ["missed", "in history, delivered late"]
    assert [p["data"] for p in await c.publications("feed:late", 1)] == ["live"]
    assert len([p for p in c.pushes if "pub" in p["push"]]) == 1
    assert len(await other.publications("feed:late", 2)) == 2
    await c.close()
    await other.close()


async def test_recovery_reports_lost_position(serve: Serve) -> None:
    srv = await serve(namespaces={"feed": {"force_recovery": True, "history_size": 5}})
    c = await Raw.open(srv.ws)
    await c.connect()
    position = await c.subscribe("feed:y")
    await c.close()
    for i in range(10):
        await srv.hub.publish("feed:y", i)
    c = await Raw.open(srv.ws)
    await c.connect()
    result = await c.subscribe("feed:y", recover=True, offset=0, epoch=position["epoch"])
    assert result["was_recovering"] is True and result.get("recovered", False) is False
    assert "publications" not in result and result["offset"] == 10
    stale = await c.call("history", channel="feed:y", since={"offset": 1, "epoch": "other"})
    assert stale["error"]["code"] == 112
    await c.close()


async def test_recovery_beyond_the_cap_is_not_recovered(serve: Serve) -> None:
    srv = await serve(recovery_max_publications=3, namespaces={"feed": {"force_recovery": True}})
    c = await Raw.open(srv.ws)
    await c.connect()
    position = await c.subscribe("feed:z")
    await c.close()
    for i in range(3):
        await srv.hub.publish("feed:z", i)
    c = await Raw.open(srv.ws)
    await c.connect()
    result = await c.subscribe("feed:z", recover=True, offset=0, epoch=position["epoch"])
    assert result["recovered"] is True and len(result["publications"]) == 3
    await c.close()
    await srv.hub.publish("feed:z", 3)
    c = await Raw.open(srv.ws)
    await c.connect()
    result = await c.subscribe("feed:z", recover=True, offset=0, epoch=position["epoch"])
    assert result.get("recovered", False) is False and "publications" not in result
    await c.close()


async def test_history_limit_since_reverse(serve: Serve) -> None:
    srv = await serve()
    for i in range(6):
        await srv.hub.publish("log", i)
    c = await Raw.open(srv.ws)
    await c.connect()
    h = (await c.call("history", channel="log", limit=2))["history"]
    assert [p["data"] for p in h["publications"]] == [0, 1] and h["offset"] == 6
    h = (await c.call("history", channel="log", limit=2, reverse=True))["history"]
    assert [p["data"] for p in h["publications"]] == [5, 4]
    since = {"offset": 3, "epoch": h["epoch"]}
    h = (await c.call("history", channel="log", limit=-1, since=since))["history"]
    assert [p["offset"] for p in h["publications"]] == [4, 5, 6]
    h = (await c.call("history", channel="log"))["history"]
    assert "publications" not in h and h["offset"] == 6
    await c.close()


async def test_join_leave_pushed_to_subscribers_who_ask(serve: Serve) -> None:
    srv = await serve(namespaces=CHAT)
    watcher = await Raw.open(srv.ws)
    quiet = await Raw.open(srv.ws)
    await watcher.connect()
    await quiet.connect()
    await watcher.subscribe("chat:r", join_leave=True)
    await quiet.subscribe("chat:r")
    other = await Raw.open(srv.ws)
    await other.connect()
    await other.subscribe("chat:r")
    await other.call("unsubscribe", channel="chat:r")
    while len([p for p in watcher.pushes if "leave" in p["push"]]) < 1:
        await watcher.read_frame()
    kinds = [next(k for k in p["push"] if k != "channel") for p in watcher.pushes]
    assert kinds == ["join", "join", "leave"]
    assert (
        watcher.pushes[-1]["push"]["leave"]["info"]["client"]
        == (watcher.pushes[-2]["push"]["join"]["info"]["client"])
    )
    await srv.hub.publish("chat:r", "after")
    await quiet.publications("chat:r", 1)
    assert all("pub" in p["push"] for p in quiet.pushes)  # no join/leave for the quiet one
    for c in (watcher, quiet, other):
        await c.close()


async def test_client_publish_carries_publisher_info_and_presence(serve: Serve) -> None:
    srv = await serve(namespaces=CHAT, token_hmac_secret=SECRET, api_key="k")
    a, b = await Raw.open(srv.ws), await Raw.open(srv.ws)
    await a.connect(token=token("alice", info={"name": "Alice"}))
    await b.connect(token=token("bob"))
    await a.subscribe("chat:r")
    await b.subscribe("chat:r")
    assert await a.call("publish", channel="chat:r", data={"text": "hi"}) == {
        "id": a._next,
        "publish": {},
    }
    (pub,) = await b.publications("chat:r", 1)
    assert pub["data"] == {"text": "hi"}
    assert pub["info"]["user"] == "alice" and pub["info"]["conn_info"] == {"name": "Alice"}
    presence = (await b.call("presence", channel="chat:r"))["presence"]["presence"]
    assert sorted(v["user"] for v in presence.values()) == ["alice", "bob"]
    await a.close()
    for _ in range(100):  # the leave is processed when the server sees the close
        stats = (await b.call("presence_stats", channel="chat:r"))["presence_stats"]
        if stats["num_clients"] == 1:
            break
        await asyncio.sleep(0.02)
    assert stats == {"num_clients": 1, "num_users": 1}
    await b.close()


async def test_permissions_and_limits(serve: Serve) -> None:
    namespaces = {
        "chat": {"allow_subscribe": "authenticated"},
        "dm": {"allow_subscribe": "authenticated"},
        "vip": {"allow_subscribe": "token"},
    }
    srv = await serve(
        token_hmac_secret=SECRET, namespaces=namespaces, max_channels_per_connection=3
    )
    c = await Raw.open(srv.ws)
    await c.connect(token=token("alice"))

    async def code(channel: str, **request: object) -> int | None:
        answer = await c.call("subscribe", channel=channel, **request)
        return answer.get("error", {}).get("code")

    assert await code("nope:x") == 102
    assert await code("bad name") == 107
    assert await code("vip:x") == 103
    assert await code("$chat:secret") == 103
    assert await code("dm:talk#bob,carol") == 103
    assert await code("vip:x", token=token("alice", channel="vip:other")) == 103
    assert await code("dm:talk#alice,bob") is None
    assert await code("dm:talk#alice,bob") == 105
    assert await code("$chat:secret", token=token("alice", channel="$chat:secret")) is None
    assert await code("vip:x", token=token("alice", channel="vip:x")) is None
    assert await code("chat:four") == 106
    expired = token("alice", ttl=-10, channel="vip:y")
    assert await code("vip:y", token=expired) == 109
    await c.close()


async def test_tokens_expired_invalid_missing(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET)
    c = await Raw.open(srv.ws)
    answer = await c.call("connect", token=token("alice", ttl=-10))
    assert answer["error"]["code"] == 109  # the connection stays: the SDK refreshes
    assert "connect" in await c.call("connect", token=token("alice"))
    await c.close()
    c = await Raw.open(srv.ws)
    await c.send(
        {"connect": {"token": token("alice", secret="wrong-secret-wrong-secret-wrong-secret")}}
    )
    assert await c.closed() == (3500, "invalid token")
    c = await Raw.open(srv.ws)
    await c.send({"connect": {}})
    assert (await c.closed())[0] == 3501


async def test_anonymous_allowed_by_setting(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, allow_anonymous=True)
    c = await Raw.open(srv.ws)
    assert "client" in await c.connect()
    assert (await c.call("subscribe", channel="news"))["error"]["code"] == 103
    await c.close()


async def test_audience_and_issuer_are_checked(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, token_audience="tidings", token_issuer="me")
    c = await Raw.open(srv.ws)
    await c.connect(token=token("alice", aud="tidings", iss="me"))
    await c.close()
    for claims in ({"aud": "other", "iss": "me"}, {"aud": "tidings"}):
        c = await Raw.open(srv.ws)
        await c.send({"connect": {"token": token("alice", **claims)}})
        assert (await c.closed())[0] == 3500


async def test_unrefreshed_token_closes_3005_and_refresh_extends(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, expired_close_delay=0)
    c = await Raw.open(srv.ws)
    kept = await Raw.open(srv.ws)
    assert (await c.connect(token=token("alice", ttl=LAPSING)))["ttl"] == 1
    result = await kept.connect(token=token("alice", ttl=LAPSING))
    assert result["expires"] is True
    refreshed = await kept.call("refresh", token=token("alice", ttl=60))
    assert refreshed["refresh"]["expires"] is True and refreshed["refresh"]["ttl"] > 50
    assert await c.closed() == (3005, "connection expired")
    other_user = await kept.send({"refresh": {"token": token("mallory")}})
    assert other_user and (await kept.closed())[0] == 3500


async def test_rpc_and_send_handlers(serve: Serve) -> None:
    srv = await serve()
    got: list[object] = []

    @srv.hub.rpc("add")
    async def add(session: object, data: dict[str, int]) -> dict[str, int]:
        return {"sum": data["a"] + data["b"]}

    @srv.hub.on_send
    async def on_send(session: object, data: object) -> None:
        got.append(data)

    @srv.hub.rpc("fails")
    async def fails(session: object, data: object) -> object:
        if data == "refuse":
            raise PermissionDenied("not you")
        return object()  # not JSON: an internal error, the connection stays

    c = await Raw.open(srv.ws)
    await c.connect()
    answer = await c.call("rpc", method="add", data={"a": 2, "b": 3})
    assert (await c.call("rpc", method="fails", data="refuse"))["error"] == {
        "code": 103,
        "message": "not you",
    }
    assert (await c.call("rpc", method="fails"))["error"]["code"] == 100
    assert answer["rpc"] == {"data": {"sum": 5}}
    assert (await c.call("rpc", method="nope"))["error"]["code"] == 104
    await c.send({"send": {"data": {"hello": 1}}})
    assert (await c.call("presence_stats", channel="news"))["error"]["code"] == 108
    assert got == [{"hello": 1}]
    await c.close()


async def test_server_side_subscribe_unsubscribe_disconnect_via_control(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="k", namespaces={"srv": {}})
    broker = srv.hub.broker
    c = await Raw.open(srv.ws)
    await c.connect(token=token("alice", channels=["srv:boot"]))
    other = await Raw.open(srv.ws)
    client_id = (await other.connect(token=token("alice")))["client"]
    await broker.publish_control(
        orjson.dumps({"op": "subscribe", "user": "alice", "client": client_id, "channel": "srv:x"})
    )
    while not other.pushes:
        await other.read_frame()
    assert other.pushes[0] == {"push": {"channel": "srv:x", "subscribe": {}}}
    await srv.hub.publish("srv:x", "news")
    await srv.hub.publish("srv:boot", "boot")
    assert [p["data"] for p in await other.publications("srv:x", 1)] == ["news"]
    assert [p["data"] for p in await c.publications("srv:boot", 1)] == ["boot"]
    assert not [p for p in c.pushes if p["push"]["channel"] == "srv:x"]  # only that client
    await broker.publish_control(
        orjson.dumps({"op": "unsubscribe", "user": "alice", "channel": "srv:x"})
    )
    while len(other.pushes) < 3:
        await other.read_frame()
    assert other.pushes[-1]["push"]["unsubscribe"]["code"] == 2000
    await broker.publish_control(
        orjson.dumps(
            {
                "op": "disconnect",
                "user": "alice",
                "client": client_id,
                "code": 3503,
                "reason": "bye",
            }
        )
    )
    assert await other.closed() == (3503, "bye")
    await srv.hub.publish("srv:boot", "still")
    assert [p["data"] for p in await c.publications("srv:boot", 2)] == ["boot", "still"]
    await c.close()


async def test_server_refresh_control_pushes_refresh(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET)
    c = await Raw.open(srv.ws)
    await c.connect(token=token("bob", ttl=30))
    await srv.hub.broker.publish_control(
        orjson.dumps({"op": "refresh", "user": "bob", "expire_at": None, "expired": False})
    )
    while not c.pushes:
        await c.read_frame()
    assert c.pushes[0] == {"push": {"refresh": {}}}
    await srv.hub.broker.publish_control(
        orjson.dumps({"op": "refresh", "user": "bob", "expired": True})
    )
    assert (await c.closed())[0] == 3005


def test_settings_refuse_anonymous_when_secret_set() -> None:
    assert not Settings(token_hmac_secret=SECRET).anonymous_allowed
    assert Settings(token_hmac_secret=SECRET, allow_anonymous=True).anonymous_allowed
    assert Settings().anonymous_allowed
    assert not Settings(token_jwks_url="http://127.0.0.1:1/jwks").dev_mode


async def test_sub_refresh_extends_and_unrefreshed_subscription_closes_3006(
    serve: Serve,
) -> None:
    srv = await serve(
        token_hmac_secret=SECRET,
        expired_close_delay=0,
        namespaces={"vip": {"allow_subscribe": "token"}},
    )
    kept, lapsed = await Raw.open(srv.ws), await Raw.open(srv.ws)
    for c in (kept, lapsed):
        await c.connect(token=token("alice"))
        result = await c.subscribe("vip:x", token=token("alice", ttl=LAPSING, channel="vip:x"))
        assert result["expires"] is True and result["ttl"] == 1
    answer = await kept.call("sub_refresh", channel="vip:x", token=token("alice", channel="vip:x"))
    assert answer["sub_refresh"]["expires"] is True and answer["sub_refresh"]["ttl"] > 3000
    wrong = await kept.call("sub_refresh", channel="vip:y", token=token("alice", channel="vip:y"))
    assert wrong["error"]["code"] == 103  # not subscribed there
    assert await lapsed.closed() == (3006, "subscription expired")
    await srv.hub.publish("vip:x", "kept")
    assert [p["data"] for p in await kept.publications("vip:x", 1)] == ["kept"]
    await kept.close()


async def test_connection_without_connect_closes_3502(serve: Serve) -> None:
    srv = await serve(connect_timeout=0.2)
    c = await Raw.open(srv.ws)
    assert await c.closed() == (3502, "stale")


async def test_presence_is_refreshed_while_subscribed_and_removed_after(serve: Serve) -> None:
    srv = await serve(namespaces={"room": {"presence": True, "presence_ttl": 1.0}})
    stays, leaves = await Raw.open(srv.ws), await Raw.open(srv.ws)
    ids = []
    for c in (stays, leaves):
        ids.append((await c.connect())["client"])
        await c.subscribe("room:a")
    before = (await stays.call("presence", channel="room:a"))["presence"]["presence"]
    assert sorted(before) == sorted(ids)
    await leaves.call("unsubscribe", channel="room:a")
    await asyncio.sleep(2.2)  # twice the entry's ttl: only refreshing keeps it
    after = (await stays.call("presence", channel="room:a"))["presence"]["presence"]
    assert list(after) == [ids[0]]
    await stays.close()
    await leaves.close()
