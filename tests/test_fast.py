"""The fast path (`tidings serve`: FastWebSocket + Front) and the plain ASGI path behave alike:
same bytes on the wire, same errors, same handling of slow and silent clients."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable

import httpx
import orjson
import pytest
import websockets
from websockets.frames import Frame as WsLibFrame
from websockets.frames import Opcode

from tidings import Settings, create_app
from tidings.brokers.base import ClientInfo, JoinLeave, Publication
from tidings.frames import (
    COPY_BELOW,
    binary_bytes,
    binary_frame,
    framed,
    payload,
    text_bytes,
    text_frame,
)
from tidings.protocol import centrifuge as cf
from tidings.serve.front import Front
from tidings.serve.websocket import FastWebSocket, heartbeat

from .conftest import Running, Serve
from .wsraw import RawWs, close_code

#: every test here picks its paths itself (conftest.py runs the others once per path)
pytestmark = pytest.mark.one_path

PATHS = [pytest.param(False, id="asgi"), pytest.param(True, id="fast")]

# sizes around the frame header's length encodings: 7-bit, 16-bit, 64-bit
MESSAGES = ["a", "é" * 3, "x" * 125, "y" * 126, "z" * 65535, "w" * 65536, '"quoted" {json}']


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` (server-side state) until it holds; fail after ``seconds``."""
    for _ in range(int(seconds * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def received_bytes(srv: Running) -> bytes:
    ws = await RawWs.connect(srv.port, "/ws/bytes")
    try:
        await wait_for(lambda: srv.hub.subscribers("bytes") == 1)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for text in MESSAGES:
                r = await http.post("/publish/bytes", content=text.encode())
                assert r.status_code == 200, r.text
            r = await http.post("/api/publish", json={"channel": "bytes", "data": {"k": [1, 2]}})
            assert r.status_code == 200
        frames = await ws.frames(len(MESSAGES) + 1)
        assert [op for op, _ in frames] == [1] * (len(MESSAGES) + 1)
        assert [p.decode() for _, p in frames] == [*MESSAGES, '{"k":[1,2]}']
        return bytes(ws.raw)
    finally:
        ws.close()


async def test_fast_and_asgi_paths_write_identical_bytes(serve: Serve) -> None:
    asgi = await received_bytes(await serve(max_message_size=1 << 20, fast=False))
    fast = await received_bytes(await serve(max_message_size=1 << 20, fast=True))
    assert fast == asgi


async def test_fast_path_is_used_by_serve_fast(serve: Serve) -> None:
    srv = await serve(fast=True)
    async with websockets.connect(f"{srv.ws}/ws/which") as ws:
        await wait_for(lambda: srv.hub.subscribers("which") == 1)
        (session,) = srv.hub.sessions
        assert isinstance(session.transport, FastWebSocket)
        await ws.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_oversize_message_closes_1009(serve: Serve, fast: bool) -> None:
    srv = await serve(max_message_size=1024, fast=fast)
    async with websockets.connect(f"{srv.ws}/ws/big", max_size=None) as ws:
        await ws.send("x" * 1025)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    await wait_for(lambda: not srv.hub.sessions)


@pytest.mark.parametrize("fast", PATHS)
async def test_client_text_is_published_to_the_channel(serve: Serve, fast: bool) -> None:
    srv = await serve(fast=fast)
    async with (
        websockets.connect(f"{srv.ws}/ws/chat") as a,
        websockets.connect(f"{srv.ws}/ws/chat") as b,
    ):
        await wait_for(lambda: srv.hub.subscribers("chat") == 2)
        await a.send("hello")
        assert await asyncio.wait_for(b.recv(), 5) == "hello"
        assert await asyncio.wait_for(a.recv(), 5) == "hello"
        await a.send(b"binary")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(a.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


@pytest.mark.parametrize("fast", PATHS)
async def test_slow_client_is_closed_while_a_fast_one_gets_everything(
    serve: Serve, fast: bool
) -> None:
    srv = await serve(outbox_limit=64 * 1024, close_timeout=0.5, fast=fast)
    slow = await RawWs.connect(srv.port, "/ws/feed", rcvbuf=4096)  # never reads again
    async with websockets.connect(f"{srv.ws}/ws/feed", max_size=None) as quick:
        await wait_for(lambda: srv.hub.subscribers("feed") == 2)
        body = b"m" * 32_000
        count = 400  # 12.8 MB: more than the slow socket's buffers hold
        got: list[str | bytes] = []

        async def read_all() -> None:
            while len(got) < count:
                got.append(await quick.recv())

        reader = asyncio.get_running_loop().create_task(read_all())
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for _ in range(count):
                r = await http.post("/publish/feed", content=body)
                assert r.status_code == 200
        await asyncio.wait_for(reader, 20)
        assert len(got) == count and all(m == body.decode() for m in got)
        assert srv.hub.metrics.slow_clients == 1
        await wait_for(lambda: srv.hub.subscribers("feed") == 1)
        assert len(srv.hub.sessions) == 1
    if fast:  # the connection was aborted: reading it ends without a close handshake
        async with asyncio.timeout(10):
            while True:
                try:
                    if not await slow.reader.read(1 << 20):
                        break
                except ConnectionResetError:
                    break
    slow.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_client_that_never_pongs_is_closed_1011(serve: Serve, fast: bool) -> None:
    srv = await serve(ping_interval=0.2, pong_timeout=0.3, fast=fast)
    ws = await RawWs.connect(srv.port, "/ws/quiet")
    try:
        await wait_for(lambda: srv.hub.subscribers("quiet") == 1)
        opcode, _ = await asyncio.wait_for(ws.frame(), 5)
        assert opcode == 0x9  # ping, left unanswered
        opcode, payload = await asyncio.wait_for(ws.frame(), 5)
        assert opcode == 0x8 and close_code(payload) == 1011
        await wait_for(lambda: not srv.hub.sessions)
    finally:
        ws.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_client_that_pongs_stays(serve: Serve, fast: bool) -> None:
    srv = await serve(ping_interval=0.1, pong_timeout=0.3, fast=fast)
    ws = await RawWs.connect(srv.port, "/ws/alive")
    try:
        for _ in range(4):
            opcode, payload = await asyncio.wait_for(ws.frame(), 5)
            assert opcode == 0x9
            ws.send(0xA, payload)
        assert len(srv.hub.sessions) == 1
    finally:
        ws.close()


async def test_heartbeats_are_spread_and_closed_connections_leave_the_wheel(
    serve: Serve,
) -> None:
    """Connections accepted together get their WebSocket pings in different ticks of the
    server's one heartbeat timer; once they are gone the wheel holds nothing of them."""
    srv = await serve(fast=True)
    clients = await asyncio.gather(*(RawWs.connect(srv.port, "/ws/beat") for _ in range(30)))
    try:
        await wait_for(lambda: srv.hub.subscribers("beat") == 30)
        state = srv.server.server_state
        conns = [c for c in state.connections if isinstance(c, FastWebSocket)]
        assert len(conns) == 30 and all(c.wheel_bucket is not None for c in conns)
        ticks = Counter(id(c.wheel_bucket) for c in conns)
        # 30 first pings over the ~25 one-second ticks of the 25 s interval, not in one tick
        assert len(ticks) >= 12 and max(ticks.values()) <= 4
        wheel = heartbeat(state, srv.server.config)
        assert len(wheel) == 30
    finally:
        for c in clients:
            c.close()
    await wait_for(lambda: not srv.hub.sessions and len(wheel) == 0)


REQUESTS = [
    ("/api/publish", b'{"channel": "c", "data": 1}', {}),
    ("/api/publish", b"not json", {}),
    ("/api/publish", b"[1]", {}),
    ("/api/publish", b'{"channel": "c"}', {}),
    ("/api/publish", b'{"channel": "bad channel!", "data": 1}', {}),
    ("/publish/c", b"text", {}),
    ("/publish/c", b"\xff", {}),
    ("/api/publish", b'{"channel": "c", "data": 1}', {"X-API-Key": "wrong"}),
]


async def answers(srv: Running) -> list[tuple[int, bytes]]:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        out = []
        for path, body, headers in REQUESTS:
            r = await http.post(path, content=body, headers=headers)
            # every server starts its own stream epoch
            out.append((r.status_code, re.sub(rb'"epoch":"\w+"', b'"epoch":""', r.content)))
        return out


@pytest.mark.parametrize("api_key", [None, "sekret"])
async def test_front_answers_publish_requests_like_fastapi(
    serve: Serve, api_key: str | None
) -> None:
    asgi = await answers(await serve(api_key=api_key, fast=False))
    fast = await answers(await serve(api_key=api_key, fast=True))
    assert fast == asgi
    assert {status for status, _ in asgi} >= ({401} if api_key else {200, 400})


def test_front_serves_the_publish_routes_itself() -> None:
    front = Front(create_app(Settings()))
    assert front.route("/api/publish") is not None
    assert front.route("/publish/t0") is not None
    for other in ("/api", "/api/", "/api/a/b", "/publish/", "/publish/a/b", "/push", "/health"):
        assert front.route(other) is None, other
    # the app's own endpoint objects: a second one would register its control handlers twice
    tidings = front.app.state.tidings
    assert front.raw is tidings.raw_endpoint
    assert front.centrifuge is tidings.centrifuge_endpoint


@pytest.mark.parametrize("fast", PATHS)
async def test_publish_many_lets_subscribers_keep_up(serve: Serve, fast: bool) -> None:
    srv = await serve(outbox_limit=32 * 1024, fast=fast)
    async with websockets.connect(f"{srv.ws}/ws/batch") as ws:
        await wait_for(lambda: srv.hub.subscribers("batch") == 1)
        items = [("batch", f"{i:04d}" + "x" * 200) for i in range(1000)]  # 200 KB in all
        positions = await srv.hub.publish_many(items)
        assert [p.offset for p in positions] == list(range(1, 1001))
        got = [await asyncio.wait_for(ws.recv(), 5) for _ in range(1000)]
        assert got == [data for _, data in items]
        assert srv.hub.metrics.slow_clients == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_hand_built_frames_equal_websockets_frames(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    for opcode, build in ((Opcode.TEXT, text_frame), (Opcode.BINARY, binary_frame)):
        expected = WsLibFrame(opcode, data).serialize(mask=False, extensions=[])
        assert build(data) == expected
        assert payload(build(data)) == data
    assert framed(data) == binary_frame(data)  # plain bytes: a binary message
    assert framed("é" * size) == text_frame(("é" * size).encode())
    built = text_frame(data)
    assert framed(built) == built  # pre-built frames go out as they are
    # ... as plain bytes below COPY_BELOW (uvloop takes a subclass through a memoryview),
    # larger ones uncopied
    assert type(framed(built)) is bytes if len(built) < COPY_BELOW else framed(built) is built
    assert type(text_bytes(data)) is bytes and text_bytes(data) == built
    assert type(binary_bytes(data)) is bytes and binary_bytes(data) == binary_frame(data)


def test_framed_centrifuge_encoders_write_the_text_encoders_bytes() -> None:
    """Pushes framed once per publication, packed with ``str`` replies, make the bytes the
    text encoders' frames make once the fast transport frames them."""
    encoders = cf.CentrifugeEncoders()
    plain, framed_plain = encoders.text, encoders.framed
    with_join_leave, framed_with_join_leave = plain.encoder(True), framed_plain.encoder(True)
    info = ClientInfo("c1", "ann", b'{"n":"Ann"}')
    pubs = [
        Publication("ch", orjson.dumps("é" * n), i, "e", info if i % 2 else None)
        for i, n in enumerate((1, 120, 70000, 30), 1)
    ]
    for pub in pubs:  # built once, shared by both framed encoders
        assert framed_plain.push(pub) is framed_with_join_leave.push(pub)
    assert type(framed_plain.push(pubs[0])) is not str
    event = JoinLeave("ch", info, join=False)
    assert framed_plain.join_leave(event) is None
    assert framed(framed_with_join_leave.join_leave(event) or b"") == framed(
        with_join_leave.join_leave(event) or b""
    )
    reply = cf.reply(7, "publish", {})
    for order in ([0], [0, 1], [1, 0, 2], [0, 1, 2, 3]):
        text: list[cf.Frame] = [plain.push(pubs[i]) for i in order]
        built: list[cf.Frame] = [framed_plain.push(pubs[i]) for i in order]
        for frames in (text, built):
            frames.insert(len(frames) // 2, reply)
        for frames in ([reply], text[:1], built[:1], text, built):
            (packed,) = framed_plain.pack(list(frames))
            as_text = [f if isinstance(f, str) else payload(f).decode() for f in frames]
            (expected,) = plain.pack(as_text)
            assert framed(packed) == framed(expected)
    # the next subscriber with the same batch gets the same frame; another batch, its own
    batch: list[cf.Frame] = [framed_plain.push(p) for p in pubs[:3]]
    (first,) = framed_plain.pack(batch)
    assert framed_plain.pack(list(batch)) == [first] and framed_plain.pack(batch)[0] is first
    for other in ([*batch, reply], [reply, *batch], batch[:2], batch[1:]):
        (packed,) = framed_plain.pack(other)
        (expected,) = plain.pack([f if isinstance(f, str) else payload(f).decode() for f in other])
        assert framed(packed) == framed(expected)


CF_CHAT = {"chat": {"join_leave": True, "allow_publish": True}}


async def centrifuge_frames(srv: Running) -> tuple[list[bytes], bytes]:
    """What a Centrifugo client sees: its publishes' pushes coalesced with their replies in
    one frame, then another client's join and leave. The payloads, and every byte received."""
    a = await RawWs.connect(srv.port, "/connection/websocket")
    a.send(1, b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"chat:r","join_leave":true}}')
    payloads = [(await a.frame())[1]]
    (session,) = srv.hub.sessions  # pre-built pushes exactly where writes are direct
    assert session.format is srv.tidings.centrifuge_endpoint.encoders.wire_format(srv.fast)
    # three publishes in one frame: the first push may leave alone (written through), the
    # others are queued, then packed with the four replies into one frame
    commands = [
        f'{{"id":{i},"publish":{{"channel":"chat:r","data":{{"n":{i}}}}}}}' for i in (3, 4, 5)
    ]
    a.send(1, "\n".join([*commands, '{"id":6,"ping":{}}']).encode())
    while b'"id":6' not in payloads[-1]:
        payloads.append((await a.frame())[1])
    b = await RawWs.connect(srv.port, "/connection/websocket")
    b.send(1, b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"chat:r"}}')
    await b.frame()
    payloads.append((await a.frame())[1])  # b's join
    b.close()
    payloads.append((await a.frame())[1])  # b's leave
    a.close()
    return payloads, bytes(a.raw)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "asgi"])
async def test_centrifuge_coalesced_pushes_are_the_text_paths_bytes(
    serve: Serve, fast: bool
) -> None:
    payloads, raw = await centrifuge_frames(await serve(namespaces=CF_CHAT, fast=fast))
    assert raw == b"".join(text_frame(p) for p in payloads)  # text frames, nothing else
    lines = [orjson.loads(line) for p in payloads for line in p.split(b"\n")]
    pubs = [x["push"]["pub"]["data"]["n"] for x in lines if "pub" in x.get("push", {})]
    assert pubs == [3, 4, 5]
    assert [x["id"] for x in lines if "id" in x] == [1, 2, 3, 4, 5, 6]
    assert [k for x in lines for k in x.get("push", {}) if k in ("join", "leave")] == [
        "join",
        "leave",
    ]
    # pushes and replies share a frame: the queued pushes were packed with the replies
    assert any(b'"pub"' in p and b'"id":3' in p for p in payloads)


async def test_centrifuge_fast_and_asgi_paths_send_the_same_messages(serve: Serve) -> None:
    fast, _ = await centrifuge_frames(await serve(namespaces=CF_CHAT, fast=True))
    asgi, _ = await centrifuge_frames(await serve(namespaces=CF_CHAT, fast=False))
    strip = re.compile(rb'"(client|node)":"[^"]*"')  # ids differ between the two servers
    # frame boundaries may differ (only a direct transport writes through), messages do not
    assert strip.sub(b"", b"\n".join(fast)) == strip.sub(b"", b"\n".join(asgi))
