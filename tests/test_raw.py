"""The seed patterns over real sockets: raw WebSocket per channel, HTTP publish."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from .conftest import Serve


async def recv_n(ws: websockets.ClientConnection, n: int, wait: float = 5.0) -> list[str]:
    out = []
    for _ in range(n):
        msg = await asyncio.wait_for(ws.recv(), wait)
        out.append(msg if isinstance(msg, str) else msg.decode())
    return out


async def test_http_publish_reaches_three_subscribers_in_order(serve: Serve) -> None:
    srv = await serve()
    subs = [await websockets.connect(f"{srv.ws}/ws/news") for _ in range(3)]
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            offsets = []
            for i in range(50):
                r = await http.post("/api/publish", json={"channel": "news", "data": f"m{i}"})
                assert r.status_code == 200
                offsets.append(r.json()["result"]["offset"])
        assert offsets == list(range(1, 51))
        for ws in subs:
            assert await recv_n(ws, 50) == [f"m{i}" for i in range(50)]
    finally:
        for ws in subs:
            await ws.close()


async def test_client_text_is_published_when_allowed(serve: Serve) -> None:
    srv = await serve()
    async with (
        websockets.connect(f"{srv.ws}/ws/chat") as alice,
        websockets.connect(f"{srv.ws}/ws/chat") as bob,
    ):
        await alice.send("hello from alice")
        assert await recv_n(bob, 1) == ["hello from alice"]
        assert await recv_n(alice, 1) == ["hello from alice"]
        history = await srv.hub.history("chat")
        assert [p.data for p in history.publications] == [b'"hello from alice"']


async def test_json_values_arrive_serialized_and_strings_as_is(serve: Serve) -> None:
    srv = await serve()
    async with websockets.connect(f"{srv.ws}/ws/prices") as ws, httpx.AsyncClient() as http:
        for data in ["plain", {"price": 42}, [1, 2], 3.5, None, '"quoted"']:
            r = await http.post(f"{srv.url}/api/publish", json={"channel": "prices", "data": data})
            assert r.status_code == 200
        got = await recv_n(ws, 6)
    assert got == ["plain", '{"price":42}', "[1,2]", "3.5", "null", '"quoted"']


async def test_seed_push_and_text_publish_endpoints(serve: Serve) -> None:
    srv = await serve()
    async with websockets.connect(f"{srv.ws}/ws/room") as ws, httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/push", json={"channel": "room", "message": "via push"})
        assert r.json()["result"]["offset"] == 1
        r = await http.post(f"{srv.url}/publish/room", content="via text body")
        assert r.json()["result"]["offset"] == 2
        r = await http.post(f"{srv.url}/push", json={"channel": "room", "message": 5})
        assert r.status_code == 400 and r.json()["error"]["code"] == 107
        assert await recv_n(ws, 2) == ["via push", "via text body"]


async def test_client_publish_refused_where_namespace_forbids(serve: Serve) -> None:
    srv = await serve(namespaces={"feed": {"allow_publish": False}})
    async with (
        websockets.connect(f"{srv.ws}/ws/feed:main") as writer,
        websockets.connect(f"{srv.ws}/ws/feed:main") as reader,
    ):
        await writer.send("not allowed")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(writer.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "may not publish" in closed.value.rcvd.reason
        async with httpx.AsyncClient() as http:
            await http.post(f"{srv.url}/api/publish", json={"channel": "feed:main", "data": "ok"})
        assert await recv_n(reader, 1) == ["ok"]  # the other client is unaffected


async def test_binary_frame_is_refused_with_1003(serve: Serve) -> None:
    srv = await serve()
    async with websockets.connect(f"{srv.ws}/ws/chat") as ws:
        await ws.send(b"\x00\x01")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


@pytest.mark.parametrize(
    ("path", "code", "words"),
    [
        ("/ws/bad%20name", 107, "characters outside"),
        ("/ws/" + "x" * 300, 107, "longer than 255"),
        ("/ws/nope:room", 102, "unknown channel namespace 'nope'"),
    ],
)
async def test_bad_channel_names_get_a_clear_close(
    serve: Serve, path: str, code: int, words: str
) -> None:
    srv = await serve()
    async with websockets.connect(f"{srv.ws}{path}") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    rcvd = closed.value.rcvd
    assert rcvd is not None and rcvd.code == 1008
    assert rcvd.reason.startswith(f"{code}:") and words in rcvd.reason
    assert srv.hub.sessions == set()


@pytest.mark.parametrize(
    ("channel", "code"),
    [("bad name", 107), ("", 107), ("y" * 256, 107), ("nope:room", 102)],
)
async def test_http_publish_to_bad_channel_is_an_api_error(
    serve: Serve, channel: str, code: int
) -> None:
    srv = await serve()
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/publish", json={"channel": channel, "data": 1})
    assert r.status_code == 200
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1,2]", b'{"channel": 5, "data": 1}', b'{"channel": "a"}'],
)
async def test_malformed_publish_requests_are_400(serve: Serve, body: bytes) -> None:
    srv = await serve()
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/publish", content=body)
        assert r.status_code == 400
        assert r.json()["error"]["code"] == 107
        ok = await http.post(f"{srv.url}/api/publish", json={"channel": "a", "data": 1})
        assert ok.json()["result"]["offset"] == 1


async def test_reconnecting_raw_client_replays_from_its_offset(serve: Serve) -> None:
    srv = await serve()
    positions = [await srv.hub.publish("log", f"m{i}") for i in range(1, 4)]
    epoch = positions[0].epoch
    async with websockets.connect(f"{srv.ws}/ws/log?since=1&epoch={epoch}") as ws:
        assert await recv_n(ws, 2) == ["m2", "m3"]
        await srv.hub.publish("log", "m4")
        assert await recv_n(ws, 1) == ["m4"]
    async with websockets.connect(f"{srv.ws}/ws/log?since=0") as ws:
        assert await recv_n(ws, 4) == ["m1", "m2", "m3", "m4"]  # 0: everything kept
    async with websockets.connect(f"{srv.ws}/ws/log?since=soon") as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_replay_does_not_lose_or_repeat_racing_publications(serve: Serve) -> None:
    srv = await serve()
    for i in range(50):
        await srv.hub.publish("race", i)

    async def keep_publishing() -> None:
        for i in range(50, 150):
            await srv.hub.publish("race", i)
            await asyncio.sleep(0)

    publisher = asyncio.create_task(keep_publishing())
    async with websockets.connect(f"{srv.ws}/ws/race?since=0") as ws:
        await publisher
        got = [int(m) for m in await recv_n(ws, 150)]
    assert got == list(range(150))
