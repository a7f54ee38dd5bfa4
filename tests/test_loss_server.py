"""Nothing lost without being told, over real sockets (issue 10, sections 1 and 2)."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import httpx
import orjson
import pytest
import websockets

from tidings.brokers.memory import MemoryBroker

from .cfutil import SECRET, token
from .conftest import Running, Serve
from .engines import ENGINES, namespace
from .test_fast import PATHS, wait_for


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("fast", PATHS)
async def test_a_big_batch_does_not_close_a_fast_reader_as_slow(
    serve: Serve, fast: bool, parallel: bool
) -> None:
    """A batch on the memory broker never suspends by itself: the hub lets the writers run,
    so a subscriber reading as fast as it can gets every publication, in order."""
    srv = await serve(outbox_limit=32 * 1024, fast=fast)
    n = 3000  # ~150 KB of publications in one request, against a 32 KiB outbox
    commands = [{"publish": {"channel": "big", "data": f"{i:05d}" + "x" * 40}} for i in range(n)]
    async with websockets.connect(f"{srv.ws}/ws/big") as ws:
        await wait_for(lambda: srv.hub.subscribers("big") == 1)

        async def read() -> list[str]:
            return [str(await asyncio.wait_for(ws.recv(), 10)) for _ in range(n)]

        reader = asyncio.create_task(read())
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{srv.url}/api/batch", json={"commands": commands, "parallel": parallel}
            )
        assert r.status_code == 200
        assert all("publish" in reply for reply in r.json()["replies"])
        got = await reader
    assert got == [f"{i:05d}" + "x" * 40 for i in range(n)]
    assert srv.hub.metrics.slow_clients == 0


def _post(path: str, body: bytes, version: str = "1.1", connection: str | None = None) -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: t\r\nContent-Length: {len(body)}\r\n"
    if connection is not None:
        head += f"Connection: {connection}\r\n"
    return head.encode() + b"\r\n" + body


def _api(channel: str, data: str, version: str = "1.1", connection: str | None = None) -> bytes:
    body = orjson.dumps({"channel": channel, "data": data})
    head = f"POST /api/publish HTTP/{version}\r\nHost: t\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n"
    if connection is not None:
        head += f"Connection: {connection}\r\n"
    return head.encode() + b"\r\n" + body


#: byte sequences written at once; every one ends with a response that closes the connection
SEQUENCES = {
    "1.0 keep-alive, then 1.1": lambda c: (
        _post(f"/publish/{c}", b"a", "1.0", "keep-alive")
        + _post(f"/publish/{c}", b"b", connection="close")
    ),
    "1.0, then 1.1": lambda c: (
        _post(f"/publish/{c}", b"a", "1.0") + _post(f"/publish/{c}", b"b", connection="close")
    ),
    "1.1 close, then 1.1": lambda c: (
        _post(f"/publish/{c}", b"a", connection="close")
        + _post(f"/publish/{c}", b"b", connection="close")
    ),
    "1.1 twice, then close": lambda c: (
        _post(f"/publish/{c}", b"a")
        + _post(f"/publish/{c}", b"b")
        + _post(f"/publish/{c}", b"c", connection="close")
    ),
    "api 1.0 keep-alive, then api": lambda c: (
        _api(c, "a", "1.0", "keep-alive") + _api(c, "b", connection="close")
    ),
    "api close, then publish": lambda c: (
        _api(c, "a", connection="close") + _post(f"/publish/{c}", b"b", connection="close")
    ),
}


async def _exchange(srv: Running, channel: str, data: bytes) -> tuple[list[int], list[str]]:
    """Write ``data`` in one write; read every answer until the server closes. What was
    answered (status codes) and executed (the channel's publications)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 10)  # to EOF: the server closes
    writer.close()
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]
    history = await srv.hub.history(channel, limit=-1)
    return statuses, [orjson.loads(p.data) for p in history.publications]


@pytest.mark.parametrize("engine", ["memory", "redis"])
async def test_pipelined_requests_behind_a_closing_answer_are_not_executed(
    serve: Serve, engine: str
) -> None:
    """The same bytes to uvicorn's HTTP path and `tidings serve`'s own: each executes only what
    it answers, and both answer the same. Over a broker that answers at once (memory: the fast
    path runs the publish in the parser's callback) and one that must be waited for."""
    results: dict[bool, dict[str, tuple[list[int], list[str]]]] = {}
    for fast in (False, True):
        async with namespace(ENGINES[engine]) as url:
            results[fast] = await _sequences(await serve(fast=fast, broker_url=url))
    assert results[True] == results[False]
    assert results[True]["1.0 keep-alive, then 1.1"] == ([200], ["a"])
    assert results[True]["1.1 twice, then close"] == ([200, 200, 200], ["a", "b", "c"])


async def _sequences(srv: Running) -> dict[str, tuple[list[int], list[str]]]:
    results = {}
    for i, (name, make) in enumerate(SEQUENCES.items()):
        channel = f"pipe{i}"
        statuses, executed = await _exchange(srv, channel, make(channel))
        assert len(statuses) == len(executed), (srv.fast, name, statuses, executed)
        results[name] = (statuses, executed)
    return results


async def _close_code(url: str) -> tuple[int | None, list[str]]:
    """The close code a raw connection ends with, and what it received before."""
    got: list[str] = []
    async with websockets.connect(url) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                got.append(str(await asyncio.wait_for(ws.recv(), 10)))
    rcvd = closed.value.rcvd
    return (rcvd.code if rcvd is not None else None), got


async def test_a_raw_position_the_stream_does_not_have_closes_3010(serve: Serve) -> None:
    srv = await serve(namespaces={"short": {"history_size": 2, "history_ttl": 60}})
    positions = [await srv.hub.publish("short:log", f"m{i}") for i in range(1, 6)]
    epoch = positions[-1].epoch
    for query in (
        f"since=2&epoch={epoch}",  # 3 is trimmed: only 4 and 5 are kept
        f"since=9&epoch={epoch}",  # past the top
        "since=5&epoch=another",  # another epoch
    ):
        code, got = await _close_code(f"{srv.ws}/ws/short:log?{query}")
        assert (code, got) == (3010, []), query
    for query in ("since=5", "since=1"):  # which stream is that offset of? it cannot say
        code, got = await _close_code(f"{srv.ws}/ws/short:log?{query}")
        assert (code, got) == (1008, []), query
    async with websockets.connect(f"{srv.ws}/ws/short:log?since=3&epoch={epoch}") as ws:
        assert [await asyncio.wait_for(ws.recv(), 5) for _ in range(2)] == ["m4", "m5"]
    async with websockets.connect(f"{srv.ws}/ws/short:log?since=5&epoch={epoch}") as ws:
        await srv.hub.publish("short:log", "m6")
        assert await asyncio.wait_for(ws.recv(), 5) == "m6"


async def _frames(ws: websockets.ClientConnection) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in str(await asyncio.wait_for(ws.recv(), 10)).split("\n")]


async def test_a_new_epoch_unsubscribes_centrifugo_clients_2500(serve: Serve) -> None:
    """A Centrifugo client is sent ``unsubscribe`` 2500 (its SDK resubscribes and is told
    ``recovered: false``), never the new stream's publications after the old one's."""
    srv = await serve(broker_url=f"memory://loss-epoch-{uuid.uuid4().hex}")
    broker = srv.hub.broker
    assert isinstance(broker, MemoryBroker)
    async with websockets.connect(f"{srv.ws}/connection/websocket") as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {}}).decode())
        assert "connect" in (await _frames(ws))[0]
        sub = {"channel": "room", "recoverable": True}
        await ws.send(orjson.dumps({"id": 2, "subscribe": sub}).decode())
        assert "subscribe" in (await _frames(ws))[0]
        first = await srv.hub.publish("room", "old 1")
        assert (await _frames(ws))[0]["push"]["pub"]["offset"] == 1
        del broker._store.streams["room"]  # the broker lost the stream: a new epoch
        await srv.hub.publish("room", "new 1")
        push = (await _frames(ws))[0]["push"]
        assert push == {
            "channel": "room",
            "unsubscribe": {"code": 2500, "reason": "insufficient state"},
        }
        recover = {**sub, "recover": True, "offset": 1, "epoch": first.epoch}
        await ws.send(orjson.dumps({"id": 3, "subscribe": recover}).decode())
        reply = (await _frames(ws))[0]
        assert reply["id"] == 3 and reply["subscribe"].get("recovered") is not True
        assert reply["subscribe"]["epoch"] != first.epoch
        await srv.hub.publish("room", "new 2")
        pub = (await _frames(ws))[0]["push"]["pub"]
        assert (pub["data"], pub["offset"]) == ("new 2", 2)


async def test_a_new_epoch_closes_a_server_side_subscriber_3010(serve: Serve) -> None:
    """A server-side subscription cannot be resubscribed by the SDK: the connection is closed
    with 3010 (it reconnects and recovers), as centrifuge does."""
    srv = await serve(
        broker_url=f"memory://loss-server-side-{uuid.uuid4().hex}", token_hmac_secret=SECRET
    )
    broker = srv.hub.broker
    assert isinstance(broker, MemoryBroker)
    async with websockets.connect(f"{srv.ws}/connection/websocket") as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": token("alice")}}).decode())
        assert "connect" in (await _frames(ws))[0]
        await srv.hub.subscribe_user("alice", "room")
        assert (await _frames(ws))[0]["push"]["subscribe"] is not None
        await srv.hub.publish("room", "old 1")
        assert (await _frames(ws))[0]["push"]["pub"]["offset"] == 1
        del broker._store.streams["room"]
        await srv.hub.publish("room", "new 1")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                assert "pub" not in (await _frames(ws))[0].get("push", {})
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
