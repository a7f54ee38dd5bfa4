"""Four behaviours Centrifugo SDKs rely on (issue 12, item 1), on both server paths.

* an empty, whitespace-only or duplicated ``Sec-WebSocket-Protocol`` header is no reason to
  refuse a handshake (centrifuge-python 0.5/0.6 send an empty one);
* an invalid *subscription* token fails that subscribe with 103, the connection stays;
* recovery from ``epoch: ""`` recovers from any epoch (centrifuge/client.go isStreamRecovered);
* the subscribe ``flag`` bit 2 (``subscriptionFlagRejectUnrecovered``) turns an unrecoverable
  position into error 112.
"""

from __future__ import annotations

import asyncio
import base64
import os

import httpx
import orjson
import pytest

from .cfutil import SECRET, Raw, token
from .conftest import Running, Serve
from .wsraw import RawWs

FEED = {"feed": {"force_recovery": True, "history_size": 100, "history_ttl": 300}}


@pytest.fixture(params=[False, True], ids=["mounted", "fast"])
async def server(request: pytest.FixtureRequest, serve: Serve) -> Running:
    return await serve(token_hmac_secret=SECRET, api_key="key", namespaces=FEED, fast=request.param)


async def handshake(port: int, protocol_headers: list[str]) -> tuple[bytes, RawWs]:
    """A raw upgrade request with these ``Sec-WebSocket-Protocol`` header lines as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"Sec-WebSocket-Protocol:{value}\r\n" for value in protocol_headers)
    writer.write(
        f"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head, RawWs(reader, writer)


@pytest.fixture(params=["fast", "mounted-wsproto"])
async def hs_server(request: pytest.FixtureRequest, serve: Serve) -> Running:
    """Raw handshakes: tidings serve's own protocol, and the mounted app under uvicorn's
    wsproto implementation. uvicorn's default (websockets-sansio) answers a blank
    ``Sec-WebSocket-Protocol`` header with 400 before any app runs: mounted apps that must
    serve centrifuge-python 0.5/0.6 run uvicorn with ``ws="wsproto"`` (README)."""
    if request.param == "fast":
        return await serve(token_hmac_secret=SECRET, fast=True)
    return await serve(token_hmac_secret=SECRET, fast=False, uvicorn_options={"ws": "wsproto"})


def selected(head: bytes) -> str | None:
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-protocol":
            return value.strip()
    return None


@pytest.mark.parametrize(
    "headers",
    [[""], [" "], ["   \t "], ["", ""], [" ", "centrifuge-json"], ["centrifuge-json", ""]],
    ids=["empty", "space", "whitespace", "two-empty", "blank-and-json", "json-and-blank"],
)
async def test_blank_or_duplicated_subprotocol_headers_connect_with_json(
    hs_server: Running, headers: list[str]
) -> None:
    head, ws = await handshake(hs_server.port, headers)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert selected(head) in (None, "")  # JSON: no subprotocol to agree on
    ws.send(0x1, orjson.dumps({"id": 1, "connect": {"token": token("alice")}}))
    opcode, payload = await ws.frame()
    assert opcode == 0x1
    reply = orjson.loads(payload)
    assert reply["id"] == 1 and reply["connect"]["client"]
    ws.close()


@pytest.mark.parametrize(
    "headers",
    [
        ["centrifuge-protobuf", "centrifuge-protobuf"],
        ["", "centrifuge-protobuf"],
        [" centrifuge-protobuf , centrifuge-protobuf "],
    ],
    ids=["twice", "blank-then-protobuf", "listed-twice"],
)
async def test_duplicated_protobuf_subprotocol_selects_protobuf_once(
    hs_server: Running, headers: list[str]
) -> None:
    head, ws = await handshake(hs_server.port, headers)
    assert head.startswith(b"HTTP/1.1 101"), head
    assert selected(head) == "centrifuge-protobuf"
    ws.close()


async def test_invalid_subscription_token_is_103_and_the_connection_stays(
    server: Running,
) -> None:
    c = await Raw.open(server.ws)
    await c.connect(token=token("alice"))
    forged = token("alice", channel="$private", secret="another-secret-another-secret-another")
    other_channel = token("alice", channel="$elsewhere")
    other_user = token("bob", channel="$private")
    expired = token("alice", channel="$private", ttl=-60)
    for bad, code in ((forged, 103), (other_channel, 103), (other_user, 103), (expired, 109)):
        answer = await c.call("subscribe", channel="$private", token=bad)
        assert answer["error"]["code"] == code, answer
    # still connected, and a valid token works on the same connection
    result = await c.subscribe("$private", token=token("alice", channel="$private"))
    assert result == {} or "expires" in result
    assert await c.call("ping") == {"id": c._next, "ping": {}}
    assert len(server.hub.sessions) == 1
    await c.close()


async def test_invalid_connection_token_still_closes_3500(server: Running) -> None:
    c = await Raw.open(server.ws)
    bad = token("alice", secret="another-secret-another-secret-another")
    await c.send({"connect": {"token": bad}})
    assert await c.closed() == (3500, "invalid token")


async def publish(srv: Running, channel: str, data: object) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": "key"}) as http:
        r = await http.post("/api/publish", json={"channel": channel, "data": data})
        assert r.status_code == 200, r.text


async def test_recover_from_offset_zero_and_empty_epoch_is_any_epoch(server: Running) -> None:
    for i in range(3):
        await publish(server, "feed:a", i)
    c = await Raw.open(server.ws)
    await c.connect(token=token("alice"))
    result = await c.subscribe("feed:a", recover=True, recoverable=True, offset=0, epoch="")
    assert result["recovered"] is True and result["was_recovering"] is True
    assert [p["data"] for p in result["publications"]] == [0, 1, 2]
    assert result["epoch"]  # the client learns the epoch it did not know
    await c.close()
    # a wrong (non-empty) epoch is still not recovered
    c = await Raw.open(server.ws)
    await c.connect(token=token("alice"))
    result = await c.subscribe("feed:a", recover=True, offset=0, epoch="not-this-one")
    assert result["recovered"] is False if "recovered" in result else True
    assert "publications" not in result
    await c.close()


async def test_reject_unrecovered_flag_gives_112(server: Running) -> None:
    await publish(server, "feed:b", "x")
    c = await Raw.open(server.ws)
    await c.connect(token=token("alice"))
    answer = await c.call(
        "subscribe", channel="feed:b", recover=True, offset=0, epoch="gone", flag=2
    )
    assert answer["error"]["code"] == 112, answer
    # not subscribed (rolled back), connection kept: the same channel can be subscribed again
    assert "feed:b" not in c_subs(server)
    without = await c.subscribe("feed:b", recover=True, offset=0, epoch="gone")
    assert "recovered" not in without or without["recovered"] is False
    # the flag changes nothing when the position is recoverable
    await c.call("unsubscribe", channel="feed:b")
    ok = await c.subscribe("feed:b", recover=True, offset=1, epoch=without["epoch"], flag=2)
    assert ok["recovered"] is True
    # the compaction bit alone (1) does not reject
    await c.call("unsubscribe", channel="feed:b")
    plain = await c.subscribe("feed:b", recover=True, offset=0, epoch="gone", flag=1)
    assert "recovered" not in plain or plain["recovered"] is False
    await c.close()


def c_subs(server: Running) -> set[str]:
    (session,) = server.hub.sessions
    return set(session.protocol.subs.by_name)
