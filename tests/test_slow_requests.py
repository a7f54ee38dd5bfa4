"""Slow, partial and oversized requests on `tidings serve`'s HTTP path and WebSocket handshake
(serve/guard.py): header and body timeouts (408), header size and count limits (431).

The fast path, and at the end what a tidings mounted under stock uvicorn guards itself
(router.GuardedRoute: body timeout and header limits on its HTTP routes; README "Production"
says what is left to uvicorn). Every loop is bounded and every wait has a deadline; nothing
here measures time.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from tidings.config import Settings

from .conftest import Running, Serve

WS_HEAD = (
    "GET /ws/news HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def open_raw(srv: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", srv.port)


async def answer(reader: asyncio.StreamReader, deadline: float = 20.0) -> bytes:
    """Everything the server writes until it closes the connection (a deadline, not a timing)."""
    return await asyncio.wait_for(reader.read(), deadline)


async def drip(writer: asyncio.StreamWriter, data: bytes, reader: asyncio.StreamReader) -> bytes:
    """Send ``data`` one byte at a time until the server closes; what it answered."""
    closed = asyncio.ensure_future(answer(reader, 60))
    for i in range(len(data)):
        if closed.done():
            break
        with contextlib.suppress(ConnectionError):
            writer.write(data[i : i + 1])
            await writer.drain()
        await asyncio.wait([closed], timeout=0.05)
    else:
        raise AssertionError("the server held a dripping request for its whole length")
    return await closed


async def healthy(srv: Running) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{srv.url}/health", timeout=10)
        assert r.status_code == 200


async def test_dripping_heads_get_408_and_others_are_served(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.5)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 2000
    pairs = [await open_raw(srv) for _ in range(30)]
    drips = [asyncio.ensure_future(drip(w, head, r)) for r, w in pairs]
    await healthy(srv)  # the others do not hold anyone up
    for got in await asyncio.gather(*drips):
        assert got.startswith(b"HTTP/1.1 408 "), got[:80]
        assert b"connection: close" in got.lower()
    for _, w in pairs:
        w.close()


async def test_silent_connection_is_closed_without_an_answer(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.3)
    reader, writer = await open_raw(srv)
    assert await answer(reader) == b""
    writer.close()


async def test_partial_body_gets_408(serve: Serve) -> None:
    srv = await serve(fast=True, body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"channel":'
    )
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    writer.close()


async def test_dripping_body_is_not_renewed_by_each_byte(serve: Serve) -> None:
    srv = await serve(fast=True, body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    got = await drip(writer, b"x" * 5000, reader)
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    writer.close()


async def test_keep_alive_requests_are_timed_each_on_their_own(serve: Serve) -> None:
    # a connection that answered once and then starts a second head late is judged from that
    # head's first byte, not from the connection's opening
    srv = await serve(fast=True, header_timeout=1.0)
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1})
            assert r.status_code == 200
            r = await http.get(f"{srv.url}/health")
            assert r.status_code == 200


async def test_large_head_gets_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    writer.close()


async def test_many_headers_get_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    writer.close()


async def test_header_count_limit_is_a_setting(serve: Serve) -> None:
    srv = await serve(fast=True, max_headers=10)
    reader, writer = await open_raw(srv)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(11))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    writer.close()
    await healthy(srv)  # 9 extra headers are fine (httpx sends a few)


async def test_huge_single_header_is_cut_short_and_stalls_no_one(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    closed = asyncio.ensure_future(answer(reader))
    chunk = b"a" * 65_536
    sent = 0
    while sent < 64 * 1024 * 1024 and not closed.done():  # at most 64 MiB, stops at the close
        try:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
        except (ConnectionError, TimeoutError):
            break
        sent += len(chunk)
        if sent == 1024 * 1024:
            await healthy(srv)
    got = await closed
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    assert sent < 8 * 1024 * 1024  # refused near the limit, not after the whole header
    writer.close()
    await healthy(srv)


async def test_websocket_handshake_large_head_gets_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    writer.write((WS_HEAD + "Cookie: " + "c" * 70_000 + "\r\n\r\n").encode())
    got = await answer(reader)
    assert got.startswith(b"HTTP/1.1 431 "), got[:80]
    writer.close()


async def test_websocket_handshake_dripping_gets_408(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.5)
    reader, writer = await open_raw(srv)
    got = await drip(writer, (WS_HEAD + "X-Pad: " + "p" * 2000).encode(), reader)
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    writer.close()


async def test_websocket_after_handshake_is_not_timed_out(serve: Serve) -> None:
    import websockets

    srv = await serve(fast=True, header_timeout=0.3, body_timeout=0.3)
    async with websockets.connect(f"{srv.ws}/ws/news") as ws:
        # a deadline well past both timeouts: the connection stays open and delivers
        await asyncio.sleep(1.0)
        await srv.hub.publish("news", "still here")
        assert await asyncio.wait_for(ws.recv(), 10) == "still here"


@pytest.mark.parametrize(
    ("variable", "field", "value"),
    [
        ("TIDINGS_HEADER_TIMEOUT", "header_timeout", 3.5),
        ("TIDINGS_BODY_TIMEOUT", "body_timeout", 7.0),
        ("TIDINGS_MAX_HEADER_SIZE", "max_header_size", 8192),
        ("TIDINGS_MAX_HEADERS", "max_headers", 50),
    ],
)
def test_limits_from_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, field: str, value: float
) -> None:
    monkeypatch.setenv(variable, str(value))
    assert getattr(Settings(), field) == value


async def test_many_pipelined_requests_are_not_one_large_head(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    one = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 60 + b"\r\n\r\n"
    count = 2000  # ~200 KB in one write: far past max_header_size, each head small
    writer.write(one * count + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = await answer(reader, 60)
    assert got.count(b"HTTP/1.1 200 ") == count + 1
    assert b" 431 " not in got
    writer.close()


# -- a tidings mounted under stock uvicorn: what its routes guard themselves (router.py) -------


@pytest.mark.one_path
async def test_mounted_partial_body_gets_408_and_others_are_served(serve: Serve) -> None:
    srv = await serve(fast=False, body_timeout=1.0)
    stalled = [await open_raw(srv) for _ in range(5)]
    for _, writer in stalled:  # half a body, then nothing
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"channel":'
        )
    await healthy(srv)  # the others do not wait for them
    for reader, writer in stalled:
        got = await answer(reader)  # the answer comes, then the server ends the connection
        assert got.startswith(b"HTTP/1.1 408 "), got[:80]
        assert b"connection: close" in got.lower()
        assert b'"code":107' in got and b"not received within 1 s" in got, got
        writer.close()
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1})
        assert r.status_code == 200, r.text


@pytest.mark.one_path
@pytest.mark.parametrize(
    ("headers", "what"),
    [
        (b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)), b"more than 100 header fields"),
        (b"X-Big: " + b"a" * 100_000 + b"\r\n", b"larger than 65536 bytes"),
    ],
    ids=["10000 headers", "a 100 KB header"],
)
async def test_mounted_routes_refuse_large_heads_with_431(
    serve: Serve, headers: bytes, what: bytes
) -> None:
    srv = await serve(fast=False)
    for target in (b"POST /api/publish", b"GET /health"):
        reader, writer = await open_raw(srv)
        writer.write(
            target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + headers + b"\r\n{}"
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        got = await answer(reader)
        assert got.startswith(b"HTTP/1.1 431 "), got[:80]
        assert b'"code":107' in got and what in got, got[-200:]
        writer.close()
    await healthy(srv)


@pytest.mark.one_path
async def test_mounted_header_limits_are_settings(serve: Serve) -> None:
    srv = await serve(fast=False, max_headers=10, max_header_size=2048)
    async with httpx.AsyncClient() as http:
        many = {f"X-{i}": "1" for i in range(11)}
        r = await http.post(
            f"{srv.url}/api/publish", json={"channel": "c", "data": 1}, headers=many
        )
        assert r.status_code == 431, r.text
        big = {"X-Big": "b" * 2048}
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1}, headers=big)
        assert r.status_code == 431, r.text
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1})
        assert r.status_code == 200, r.text
