"""Limits and misbehaving clients: slow readers, big messages, too many connections, keys."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from .conftest import Serve
from .wsraw import RawWs


async def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    """Poll a condition of the server's state (not a timing assertion: a deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_slow_subscriber_is_dropped_and_others_get_everything(serve: Serve) -> None:
    srv = await serve(outbox_limit=64 * 1024, max_message_size=60_000)
    stalled = await RawWs.connect(srv.port, "/ws/firehose", rcvbuf=4096)
    received: list[str] = []
    async with websockets.connect(f"{srv.ws}/ws/firehose", max_size=None) as fast:
        await wait_for(lambda: srv.hub.subscribers("firehose") == 2, "two subscribers")

        async def read_all() -> None:
            while len(received) < 301:
                received.append(str(await fast.recv()))

        reader = asyncio.create_task(read_all())
        body = "x" * 50_000
        for i in range(300):
            # A deadline, not a measurement: a publisher held up by the stalled client would
            # never get its answer.
            await asyncio.wait_for(srv.hub.publish("firehose", f"{i}:{body}"), 10)
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{srv.url}/api/publish", json={"channel": "firehose", "data": "end"}
            )
            assert r.status_code == 200
        await asyncio.wait_for(reader, 30)
    assert [m.split(":", 1)[0] for m in received] == [*map(str, range(300)), "end"]
    assert srv.hub.metrics.slow_clients == 1
    # The stalled client's session is gone and its memory bounded by the limit.
    await wait_for(lambda: len(srv.hub.sessions) == 0, "sessions to be released")
    stalled.close()


async def test_oversized_message_closes_with_1009(serve: Serve) -> None:
    srv = await serve(max_message_size=1000)
    async with websockets.connect(f"{srv.ws}/ws/chat") as ws:
        await ws.send("y" * 2000)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_oversized_message_closes_with_1009_when_the_server_allows_more(
    serve: Serve,
) -> None:
    """Mounted in an app whose server accepts big frames, tidings enforces its own limit."""
    srv = await serve(max_message_size=1000, uvicorn_options={"ws_max_size": 16 * 2**20})
    async with (
        websockets.connect(f"{srv.ws}/ws/chat") as ws,
        websockets.connect(f"{srv.ws}/ws/chat") as other,
    ):
        await ws.send("é" * 600)  # 600 characters, 1200 bytes
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await other.send("still fine")
        assert await asyncio.wait_for(other.recv(), 5) == "still fine"
    assert srv.hub.metrics.published == 1


async def test_connection_limit_closes_with_1013(serve: Serve) -> None:
    srv = await serve(max_connections=2)
    async with websockets.connect(f"{srv.ws}/ws/a") as one, websockets.connect(f"{srv.ws}/ws/a"):
        async with websockets.connect(f"{srv.ws}/ws/a") as third:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(third.recv(), 5)
        rcvd = closed.value.rcvd
        assert rcvd is not None and rcvd.code == 1013 and rcvd.reason == "too many connections"
        assert srv.hub.metrics.rejected_connections == 1
        async with httpx.AsyncClient() as http:
            await http.post(f"{srv.url}/api/publish", json={"channel": "a", "data": "hi"})
        assert await asyncio.wait_for(one.recv(), 5) == "hi"
    await wait_for(lambda: not srv.hub.sessions, "sessions released")
    async with websockets.connect(f"{srv.ws}/ws/a") as again:  # room again once they left
        async with httpx.AsyncClient() as http:
            await http.post(f"{srv.url}/api/publish", json={"channel": "a", "data": "back"})
        assert await asyncio.wait_for(again.recv(), 5) == "back"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"X-API-Key": "wrong"}, 401),
        ({"Authorization": "apikey wrong"}, 401),
        ({"X-API-Key": "s3cret"}, 200),
        ({"Authorization": "apikey s3cret"}, 200),
    ],
)
async def test_api_key_is_enforced_when_configured(
    serve: Serve, headers: dict[str, str], status: int
) -> None:
    srv = await serve(api_key="s3cret")
    body = {"channel": "news", "data": "x"}
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/api/publish", json=body, headers=headers)
        assert r.status_code == status
        if status == 401:
            assert r.json()["error"]["code"] == 101
        r = await http.post("/push", json={"channel": "n", "message": "m"}, headers=headers)
        assert r.status_code == status
        r = await http.post("/publish/n", content="m", headers=headers)
        assert r.status_code == status


async def test_silent_peer_is_closed_after_the_pong_timeout(serve: Serve) -> None:
    srv = await serve(ping_interval=0.2, pong_timeout=0.3)
    silent = await RawWs.connect(srv.port, "/ws/beat")
    try:
        opcode, _ = await asyncio.wait_for(silent.frame(), 10)
        assert opcode == 0x9  # a ping, which this client never answers
        code, reason = await silent.closed()
        assert code == 1011 and "ping timeout" in reason
    finally:
        silent.close()
    await wait_for(lambda: not srv.hub.sessions, "the silent session to be released")


async def test_answering_peer_stays_connected_through_pings(serve: Serve) -> None:
    srv = await serve(ping_interval=0.1, pong_timeout=0.3)
    async with websockets.connect(f"{srv.ws}/ws/beat") as ws:  # answers pings itself
        await asyncio.sleep(1.0)  # several ping rounds
        async with httpx.AsyncClient() as http:
            await http.post(f"{srv.url}/api/publish", json={"channel": "beat", "data": "alive"})
        assert await asyncio.wait_for(ws.recv(), 5) == "alive"
