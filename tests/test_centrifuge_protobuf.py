"""The protobuf flavour at the frame level over real sockets, on both server paths: binary
frames both ways, varint-delimited batches, pings and pongs, selection by subprotocol or
``?format=protobuf``, JSON and protobuf subscribers of one channel side by side."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
import websockets
from centrifuge.protocol import client_pb2 as sdk

from tidings.protocol.centrifuge_protobuf import delimited, split

from .cfutil import SECRET, Raw, token
from .conftest import Running, Serve


@pytest.fixture(params=[False, True], ids=["mounted", "fast"])
async def server(request: pytest.FixtureRequest, serve: Serve) -> Running:
    return await serve(
        token_hmac_secret=SECRET,
        api_key="key",
        namespaces={"chat": {"presence": True, "join_leave": True, "allow_publish": True}},
        fast=request.param,
        ping_interval=1.0,
    )


class Pb:
    """A protobuf client on a plain WebSocket."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.replies: dict[int, sdk.Reply] = {}
        self.pushes: list[sdk.Push] = []
        self.pings = 0
        self._next = 0

    @classmethod
    async def open(cls, srv: Running, *, query: str = "") -> Pb:
        if query:
            ws = await websockets.connect(f"{srv.ws}/connection/websocket?{query}")
        else:
            ws = await websockets.connect(
                f"{srv.ws}/connection/websocket", subprotocols=["centrifuge-protobuf"]
            )
        return cls(ws)

    async def send(self, *commands: Any) -> list[int]:
        ids = []
        for command in commands:
            if not command.id and not command.HasField("send"):
                self._next += 1
                command.id = self._next
            ids.append(command.id)
        await self.ws.send(b"".join(delimited(c.SerializeToString()) for c in commands))
        return ids

    async def read(self, wait: float = 5.0) -> list[sdk.Reply]:
        frame = await asyncio.wait_for(self.ws.recv(), wait)
        assert isinstance(frame, bytes), "protobuf frames are binary"
        items = [sdk.Reply.FromString(part) for part in split(frame)]
        for item in items:
            if item.id:
                self.replies[item.id] = item
            elif item.HasField("push"):
                self.pushes.append(item.push)
            else:
                self.pings += 1
                await self.ws.send(delimited(b""))  # the pong: an empty Command
        return items

    async def reply(self, cid: int) -> sdk.Reply:
        while cid not in self.replies:
            await self.read()
        return self.replies.pop(cid)

    async def call(self, **kwargs: Any) -> sdk.Reply:
        (cid,) = await self.send(sdk.Command(**kwargs))
        return await self.reply(cid)

    async def pubs(self, channel: str, n: int) -> list[Any]:
        while True:
            found = [p.pub for p in self.pushes if p.channel == channel and p.HasField("pub")]
            if len(found) >= n:
                return found[:n]
            await self.read()


async def publish(srv: Running, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": "key"}) as http:
        r = await http.post("/api/publish", json={"channel": channel, "data": data})
        assert r.status_code == 200 and "result" in r.json(), r.text


async def test_subprotocol_is_selected_and_commands_batch_in_one_binary_frame(
    server: Running,
) -> None:
    c = await Pb.open(server)
    assert c.ws.subprotocol == "centrifuge-protobuf"
    ids = await c.send(
        sdk.Command(connect=sdk.ConnectRequest(token=token("alice"))),
        sdk.Command(subscribe=sdk.SubscribeRequest(channel="chat:a", join_leave=True)),
        sdk.Command(presence_stats=sdk.PresenceStatsRequest(channel="chat:a")),
    )
    frame = await c.read()
    assert [r.id for r in frame[:3]] == ids  # the frame's replies leave together, in order
    connect, _, stats = frame[:3]
    assert connect.connect.client and connect.connect.pong and connect.connect.ping == 1
    assert (stats.presence_stats.num_clients, stats.presence_stats.num_users) == (1, 1)
    publish_cmd = sdk.Command(publish=sdk.PublishRequest(channel="chat:a", data=b'{"hi":1}'))
    assert (await c.call(publish=publish_cmd.publish)).HasField("publish")
    (pub,) = await c.pubs("chat:a", 1)
    assert pub.data == b'{"hi":1}' and pub.offset == 1
    assert pub.info.user == "alice"
    bad = await c.call(publish=sdk.PublishRequest(channel="chat:a", data=b"\xffnot json"))
    assert bad.error.code == 107  # payloads are JSON on every flavour
    history = await c.call(history=sdk.HistoryRequest(channel="chat:a", limit=-1))
    assert [p.data for p in history.history.publications] == [b'{"hi":1}']
    assert history.history.offset == 1 and history.history.epoch
    await c.ws.close()


async def test_pings_are_empty_replies_and_pongs_keep_the_connection(server: Running) -> None:
    c = await Pb.open(server)
    await c.call(connect=sdk.ConnectRequest(token=token("alice")))
    while c.pings < 2:  # each ping answered by an empty Command (ping_interval is 1 s)
        await c.read(wait=10)
    assert (await c.call(ping=sdk.PingRequest())).HasField("ping")
    await c.ws.close()


async def test_text_frame_on_a_protobuf_connection_closes_3501(server: Running) -> None:
    c = await Pb.open(server)
    await c.ws.send('{"id":1,"connect":{}}')
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await c.read()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


@pytest.mark.parametrize("query", ["format=protobuf", "cf_protocol=protobuf"])
async def test_format_query_selects_protobuf_without_a_subprotocol(
    server: Running, query: str
) -> None:
    c = await Pb.open(server, query=query)
    assert c.ws.subprotocol is None
    reply = await c.call(connect=sdk.ConnectRequest(token=token("alice")))
    assert reply.connect.client
    await c.ws.close()
    plain = await Raw.open(server.ws)  # no subprotocol, no query: JSON
    assert "client" in await plain.connect(token=token("alice"))
    await plain.close()


async def test_json_and_protobuf_subscribers_of_one_channel_get_the_same_publications(
    server: Running,
) -> None:
    pbs = [await Pb.open(server) for _ in range(2)]
    for c in pbs:
        await c.call(connect=sdk.ConnectRequest(token=token("alice")))
        await c.call(subscribe=sdk.SubscribeRequest(channel="chat:mixed"))
    js = await Raw.open(server.ws)
    await js.connect(token=token("bob"))
    await js.subscribe("chat:mixed")
    for i in range(5):
        await publish(server, "chat:mixed", {"i": i})
    for c in pbs:
        got = await c.pubs("chat:mixed", 5)
        assert [orjson.loads(p.data) for p in got] == [{"i": i} for i in range(5)]
    assert [p["data"] for p in await js.publications("chat:mixed", 5)] == [
        {"i": i} for i in range(5)
    ]
    # join/leave pushes reach protobuf subscribers that asked for them, as pushes
    watcher = await Pb.open(server)
    await watcher.call(connect=sdk.ConnectRequest(token=token("carol")))
    await watcher.call(subscribe=sdk.SubscribeRequest(channel="chat:mixed", join_leave=True))
    await js.call("unsubscribe", channel="chat:mixed")
    while not any(p.HasField("leave") for p in watcher.pushes):
        await watcher.read()
    (leave,) = [p for p in watcher.pushes if p.HasField("leave")]
    assert leave.channel == "chat:mixed" and leave.leave.info.user == "bob"
    for c in (*pbs, watcher):
        await c.ws.close()
    await js.close()


async def test_invalid_subscription_token_is_a_103_reply_in_protobuf_too(server: Running) -> None:
    c = await Pb.open(server)
    await c.call(connect=sdk.ConnectRequest(token=token("alice")))
    bad = token("alice", channel="$x", secret="another-secret-another-secret-another")
    reply = await c.call(subscribe=sdk.SubscribeRequest(channel="$x", token=bad))
    assert reply.error.code == 103
    assert (await c.call(ping=sdk.PingRequest())).HasField("ping")
    await c.ws.close()
