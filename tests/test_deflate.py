"""permessage-deflate (RFC 7692): negotiated by `tidings serve` without context takeover, one
compressed frame per publication for every subscriber that negotiated it, plain frames for the
others and below the size threshold, incoming compressed messages inflated up to the message
size limit (a decompression bomb closes 1009). Real sockets, the ``websockets`` client,
centrifuge-python and Chromium."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import zlib
from typing import Any

import httpx
import orjson
import pytest
import websockets
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from websockets.extensions.permessage_deflate import PerMessageDeflate

from tidings import Settings
from tidings.frames import payload, text_frame
from tidings.protocol import deflate
from tidings.protocol.deflate import Compressor

from .conftest import Running, Serve
from .wsraw import close_code

PATHS = [pytest.param(False, id="asgi"), pytest.param(True, id="fast")]
TAIL = b"\x00\x00\xff\xff"
CHROME_OFFER = "permessage-deflate; client_max_window_bits"
NAMESPACES: dict[str, Any] = {
    "big": {"compression": True, "allow_publish": True, "history_size": 10},
    "small": {"allow_publish": True},
}


def inflate(data: bytes) -> bytes:
    """One message inflated alone, as a client does under server_no_context_takeover."""
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data + TAIL)


class DeflateWs:
    """A raw client that may offer permessage-deflate and sees each frame's first byte (RSV1)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes):
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def connect(
        cls, port: int, offer: str | None = CHROME_OFFER, path: str = "/connection/websocket"
    ) -> DeflateWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
        key = base64.b64encode(os.urandom(16)).decode()
        extension = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extension}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer, head)

    def extensions(self) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                return value.strip()
        return None

    async def frame(self, seconds: float = 10.0) -> tuple[int, bytes, bytes]:
        """(first byte, payload, the whole frame as written) of the next frame."""
        async with asyncio.timeout(seconds):
            head = await self.reader.readexactly(2)
            n = head[1] & 0x7F
            ext = b""
            if n == 126:
                ext = await self.reader.readexactly(2)
                n = struct.unpack("!H", ext)[0]
            elif n == 127:
                ext = await self.reader.readexactly(8)
                n = struct.unpack("!Q", ext)[0]
            payload = await self.reader.readexactly(n)
        return head[0], payload, head + ext + payload

    async def message(self) -> tuple[bool, bytes]:
        """(compressed, text) of the next text message (pings answered, skipped)."""
        while True:
            first, payload, _ = await self.frame()
            if first & 0x0F == 0x1:
                compressed = bool(first & 0x40)
                text = inflate(payload) if compressed else payload
                if text == b"{}":  # a Centrifugo ping
                    self.send(b"{}")
                    continue
                return compressed, text
            assert first & 0x0F != 0x8, f"closed {close_code(payload)}"

    def send(self, payload: bytes, *, first: int = 0x81) -> None:
        """A masked client frame (``first``: FIN, RSV1 and opcode)."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def command(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.send(orjson.dumps(obj))
        while True:
            _, text = await self.message()
            for line in text.split(b"\n"):
                item = orjson.loads(line)
                if item.get("id") == obj["id"]:
                    return item  # type: ignore[no-any-return]

    async def closed(self, seconds: float = 10.0) -> int:
        while True:
            first, payload, _ = await self.frame(seconds)
            if first & 0x0F == 0x8:
                return close_code(payload)

    def close(self) -> None:
        self.writer.close()


async def publish(srv: Running, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/api/publish", json={"channel": channel, "data": data})
        assert r.status_code == 200 and "result" in r.json(), r.text


async def subscribed(srv: Running, port: int, channel: str, offer: str | None) -> DeflateWs:
    ws = await DeflateWs.connect(port, offer)
    assert "connect" in await ws.command({"id": 1, "connect": {}})
    assert "subscribe" in await ws.command({"id": 2, "subscribe": {"channel": channel}})
    return ws


def big(n: int, size: int = 4000) -> dict[str, Any]:
    return {"n": n, "text": f"publication {n} " + "lorem ipsum dolor sit amet " * (size // 27)}


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every payload :class:`Compressor` compresses, in order."""
    calls: list[bytes] = []
    real = Compressor.compress

    def compress(self: Compressor, payload: bytes) -> bytes:
        calls.append(payload)
        return real(self, payload)

    monkeypatch.setattr(Compressor, "compress", compress)
    return calls


# -- the compressor ------------------------------------------------------------------------------


def test_every_message_stands_alone_and_short_ones_stay_plain() -> None:
    c = Compressor(level=1, min_size=100)
    first = big(1)
    data = orjson.dumps(first)
    once = c.compress(data)
    c.compress(orjson.dumps(big(2)))  # shares much text with the next: no window may carry over
    again = c.compress(data)
    assert once == again == Compressor().compress(data)
    assert inflate(once) == data and len(once) < len(data) / 4
    frame = c.text_frame(data)
    assert frame[0] == 0xC1 and inflate(payload(frame)) == data  # FIN + RSV1 + text
    assert c.text_frame(b"x" * 99) == text_frame(b"x" * 99)  # below min_size: RSV1 clear
    with pytest.raises(ValueError):
        Compressor(level=0)


def test_offered_when_any_namespace_or_the_global_setting_compresses() -> None:
    assert not deflate.offered(Settings())
    assert deflate.offered(Settings(compression=True))
    assert deflate.offered(Settings(namespaces={"a": {"compression": True}}))
    assert deflate.offered(Settings(defaults={"compression": True}))
    on = Settings(compression=True, namespaces={"off": {"compression": False}})
    assert deflate.compressed(on, on.defaults)
    assert not deflate.compressed(on, on.namespaces["off"])
    assert deflate.compressed(
        Settings(namespaces=NAMESPACES), Settings(namespaces=NAMESPACES).namespaces["big"]
    )


# -- negotiation ---------------------------------------------------------------------------------


async def test_fast_path_negotiates_no_context_takeover_and_declines_when_off(serve: Serve) -> None:
    on = await serve(namespaces=NAMESPACES, fast=True)
    ws = await DeflateWs.connect(on.port)
    assert ws.extensions() == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    ws.close()
    off = await serve(fast=True)
    ws = await DeflateWs.connect(off.port)
    assert ws.extensions() is None  # declined: no namespace compresses
    ws.close()


async def test_mounted_path_is_uvicorns_own_per_connection_deflate(serve: Serve) -> None:
    """The mounted path's compression is uvicorn's: context takeover both ways, so every
    connection compresses every message with its own state (documented in the README)."""
    srv = await serve(namespaces=NAMESPACES, fast=False)
    ws = await DeflateWs.connect(srv.port)
    offered = ws.extensions() or ""
    assert offered.startswith("permessage-deflate") and "server_no_context_takeover" not in offered
    ws.close()


# -- one compressed frame per publication --------------------------------------------------------


async def test_one_compressed_frame_per_publication_for_every_deflate_subscriber(
    serve: Serve, counted: list[bytes]
) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=True)
    deflating = [await subscribed(srv, srv.port, "big:room", CHROME_OFFER) for _ in range(6)]
    plain = await subscribed(srv, srv.port, "big:room", None)
    elsewhere = await subscribed(srv, srv.port, "small:room", CHROME_OFFER)
    counted.clear()
    pubs = [big(n) for n in range(1, 4)]
    for data in pubs:
        await publish(srv, "big:room", data)
    await publish(srv, "big:room", {"tiny": True})  # below compression_min_size
    await publish(srv, "small:room", big(9))  # a namespace without compression
    # once per publication, however many subscribers: the big ones, not the tiny one
    assert len(counted) == len(pubs)
    seen: list[list[bytes]] = []
    for ws in deflating:
        frames = []
        for data in pubs:
            first, payload, whole = await ws.frame()
            assert first == 0xC1, hex(first)
            push = orjson.loads(inflate(payload))
            assert push["push"]["pub"]["data"] == data
            frames.append(whole)
        compressed, text = await ws.message()
        assert not compressed and orjson.loads(text)["push"]["pub"]["data"] == {"tiny": True}
        seen.append(frames)
    assert all(frames == seen[0] for frames in seen)  # the same bytes on every connection
    for data in [*pubs, {"tiny": True}]:
        compressed, text = await plain.message()
        assert not compressed and orjson.loads(text)["push"]["pub"]["data"] == data
    compressed, text = await elsewhere.message()
    assert not compressed and orjson.loads(text)["push"]["pub"]["data"] == big(9)
    for ws in [*deflating, plain, elsewhere]:
        ws.close()


async def test_raw_endpoint_one_compressed_frame_per_publication(
    serve: Serve, counted: list[bytes]
) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=True)
    deflating = [await DeflateWs.connect(srv.port, path="/ws/big:raw") for _ in range(4)]
    plain = await DeflateWs.connect(srv.port, None, path="/ws/big:raw")
    elsewhere = await DeflateWs.connect(srv.port, path="/ws/small:raw")
    for channel, n in (("big:raw", 5), ("small:raw", 1)):  # subscribed before the 101
        assert srv.hub.subscribers(channel) == n
    text = "x" * 100 + "".join(f"line {i}\n" for i in range(300))
    await publish(srv, "big:raw", text)
    await publish(srv, "big:raw", "short")
    await publish(srv, "small:raw", text)
    assert counted == [text.encode()]
    frames = []
    for ws in deflating:
        first, data, whole = await ws.frame()
        assert first == 0xC1 and inflate(data).decode() == text
        assert await ws.message() == (False, b"short")
        frames.append(whole)
    assert len(set(frames)) == 1
    assert await plain.message() == (False, text.encode())
    assert await elsewhere.message() == (False, text.encode())
    for ws in [*deflating, plain, elsewhere]:
        ws.close()


async def test_large_replies_are_compressed_per_session(serve: Serve) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=True)
    ws = await subscribed(srv, srv.port, "big:log", CHROME_OFFER)
    for n in range(3):
        await publish(srv, "big:log", big(n))
    for _ in range(3):
        assert (await ws.message())[0]
    ws.send(orjson.dumps({"id": 3, "history": {"channel": "big:log", "limit": 3}}))
    compressed, text = await ws.message()
    reply = orjson.loads(text)
    assert compressed and [p["data"] for p in reply["history"]["publications"]] == [
        big(n) for n in range(3)
    ]
    ws.close()


# -- incoming: compressed client frames and the decompression bomb -------------------------------


async def test_compressed_fragmented_commands_are_inflated(serve: Serve) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=True)
    ws = await DeflateWs.connect(srv.port)
    command = orjson.dumps({"id": 1, "connect": {"data": {"pad": "x" * 3000}}})
    data = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = data.compress(command) + data.flush(zlib.Z_SYNC_FLUSH)
    assert body.endswith(TAIL)
    body = body[:-4]
    half = len(body) // 2
    ws.send(body[:half], first=0x41)  # text, RSV1, not final
    ws.send(body[half:], first=0x80)  # continuation, final
    _, text = await ws.message()
    assert orjson.loads(text)["id"] == 1 and "connect" in orjson.loads(text)
    ws.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_decompression_bomb_closes_1009(serve: Serve, fast: bool) -> None:
    srv = await serve(namespaces=NAMESPACES, max_message_size=65_536, fast=fast)
    ws = await DeflateWs.connect(srv.port)
    assert ws.extensions()
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(b" " * (64 * 65_536)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    assert len(body) < 8192  # a small frame...
    ws.send(body[:-4], first=0xC1)  # ...that inflates to 64 times the limit
    assert await ws.closed() == 1009
    ws.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_fragmented_bomb_closes_1009(serve: Serve, fast: bool) -> None:
    """Each fragment inflates under the limit; the message does not."""
    srv = await serve(namespaces=NAMESPACES, max_message_size=65_536, fast=fast)
    ws = await DeflateWs.connect(srv.port)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"{" * 40_000
    ws.send(z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH), first=0x41)
    ws.send(z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH), first=0x00)
    ws.send(z.compress(chunk) + z.flush(zlib.Z_SYNC_FLUSH), first=0x80)
    assert await ws.closed() == 1009
    ws.close()


# -- client libraries ----------------------------------------------------------------------------


@pytest.mark.parametrize("fast", PATHS)
async def test_websockets_client_gets_payloads_intact(serve: Serve, fast: bool) -> None:
    """The ``websockets`` client offers deflate by default (context takeover and all)."""
    srv = await serve(namespaces=NAMESPACES, fast=fast)
    async with websockets.connect(f"{srv.ws}/connection/websocket", max_size=None) as ws:
        [ext] = ws.protocol.extensions
        assert isinstance(ext, PerMessageDeflate)
        assert ext.remote_no_context_takeover is fast  # the server's frames stand alone

        got: list[Any] = []  # publication data, in the order pushed
        replies: dict[int, dict[str, Any]] = {}

        async def read() -> None:
            for line in str(await asyncio.wait_for(ws.recv(), 10)).split("\n"):
                item = orjson.loads(line)
                if "push" in item:
                    got.append(item["push"]["pub"]["data"])
                elif "id" in item:
                    replies[item["id"]] = item

        async def call(cid: int, **command: Any) -> dict[str, Any]:
            await ws.send(orjson.dumps({"id": cid, **command}).decode())
            while cid not in replies:
                await read()
            return replies.pop(cid)

        assert "connect" in await call(1, connect={})
        assert "subscribe" in await call(2, subscribe={"channel": "big:ws"})
        sizes = [10, 600, 5000, 50_000]  # the largest command stays under max_message_size
        for cid, size in enumerate(sizes, start=3):  # compressed by the client, several in a row
            assert "publish" in await call(
                cid, publish={"channel": "big:ws", "data": big(size, size)}
            )
        while len(got) < len(sizes):
            await read()
        assert got == [big(size, size) for size in sizes]


class Pubs(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: asyncio.Queue[PublicationContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.pubs.put(ctx)


@pytest.mark.parametrize("fast", PATHS)
async def test_centrifuge_python_over_deflate(serve: Serve, fast: bool) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=fast)
    client = Client(f"{srv.ws}/connection/websocket", proxy=None)
    await client.connect()
    try:
        await client.ready()
        events = Pubs()
        sub = client.new_subscription("big:sdk", events)
        await sub.subscribe()
        await sub.ready()
        for n in range(3):
            await publish(srv, "big:sdk", big(n, 20_000))
        for n in range(3):
            assert (await asyncio.wait_for(events.pubs.get(), 10)).pub.data == big(n, 20_000)
        history = await sub.history(limit=3)
        assert [p.data for p in history.publications] == [big(n, 20_000) for n in range(3)]
        await sub.publish(big(7, 9000))  # a compressed command from the SDK
        assert (await asyncio.wait_for(events.pubs.get(), 10)).pub.data == big(7, 9000)
    finally:
        await client.disconnect()


# -- a browser -----------------------------------------------------------------------------------


PAGE_SCRIPT = """
async (url) => {
  const ws = new WebSocket(url);
  window.got = [];
  window.replies = {};
  ws.onmessage = (e) => {
    for (const line of e.data.split("\\n")) {
      const m = JSON.parse(line);
      if (m.push) window.got.push(m.push.pub.data);
      else if (m.id) window.replies[m.id] = m;
      else ws.send("{}");
    }
  };
  await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = fail; });
  window.ws = ws;
  ws.send(JSON.stringify({id: 1, connect: {}}));
  ws.send(JSON.stringify({id: 2, subscribe: {channel: "big:browser"}}));
  return ws.extensions;
}
"""




async def test_chromium_negotiates_deflate_and_gets_payloads_intact(
    serve: Serve, browser: Any, counted: list[bytes]
) -> None:
    srv = await serve(namespaces=NAMESPACES, fast=True)
    page = await browser.new_page()
    await page.goto(f"{srv.url}/health")  # same origin as the WebSocket
    extensions = await page.evaluate(PAGE_SCRIPT, f"{srv.ws}/connection/websocket")
    assert extensions == (
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    await page.wait_for_function("window.replies[2] !== undefined", timeout=10_000)
    counted.clear()
    sizes = [5, 700, 8000, 60_000, 200_000]
    for size in sizes:
        await publish(srv, "big:browser", big(size, size))
    await page.wait_for_function(f"window.got.length === {len(sizes)}", timeout=10_000)
    assert await page.evaluate("window.got") == [big(size, size) for size in sizes]
    assert len(counted) == len(sizes) - 1  # the 5-byte one stays under compression_min_size
    # the browser's own commands arrive compressed; a large one is inflated and answered
    await page.evaluate(
        "window.ws.send(JSON.stringify({id: 3, publish: {channel: 'big:browser', "
        "data: {pad: 'z'.repeat(30000)}}}))"
    )
    await page.wait_for_function(f"window.got.length === {len(sizes) + 1}", timeout=10_000)
    assert await page.evaluate("window.got[window.got.length - 1].pad.length") == 30000
    await page.close()
