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
import logging
import uuid

import httpx
import jwt
import orjson
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


def refusal(got: bytes) -> tuple[int, dict[str, str], object]:
    """(status, headers with lower-case names, JSON body) of one raw HTTP/1.1 answer."""
    head, _, body = got.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return status, headers, orjson.loads(body[:length])


def assert_refused(got: bytes, status: int, message: str) -> None:
    """``got`` is the guards' answer, the same on both paths (tidings.api): ``status``, the
    documented JSON error 107 with ``message``, and the connection closed."""
    code, headers, body = refusal(got)
    assert code == status, got[:200]
    assert headers["content-type"] == "application/json", headers
    assert headers["connection"] == "close", headers
    assert body == {"error": {"code": 107, "message": message}}, body


async def healthy(srv: Running) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{srv.url}/health", timeout=10)
        assert r.status_code == 200


@pytest.mark.one_path
async def test_dripping_heads_get_408_and_others_are_served(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.5)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 2000
    pairs = [await open_raw(srv) for _ in range(30)]
    drips = [asyncio.ensure_future(drip(w, head, r)) for r, w in pairs]
    await healthy(srv)  # the others do not hold anyone up
    for got in await asyncio.gather(*drips):
        assert_refused(got, 408, "request head not received within 0.5 s")
    for _, w in pairs:
        w.close()


@pytest.mark.one_path
async def test_silent_connection_is_closed_without_an_answer(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.3)
    reader, writer = await open_raw(srv)
    assert await answer(reader) == b""
    writer.close()


@pytest.mark.one_path
async def test_partial_body_gets_408(serve: Serve) -> None:
    srv = await serve(fast=True, body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"channel":'
    )
    got = await answer(reader)
    assert_refused(got, 408, "request body not received within 0.5 s")
    writer.close()


@pytest.mark.one_path
async def test_dripping_body_is_not_renewed_by_each_byte(serve: Serve) -> None:
    srv = await serve(fast=True, body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    got = await drip(writer, b"x" * 5000, reader)
    assert_refused(got, 408, "request body not received within 0.5 s")
    writer.close()


@pytest.mark.one_path
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


@pytest.mark.one_path
async def test_large_head_gets_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    got = await answer(reader)
    assert_refused(got, 431, "request headers larger than 65536 bytes")
    writer.close()


@pytest.mark.one_path
async def test_many_headers_get_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    got = await answer(reader)
    assert_refused(got, 431, "more than 100 header fields")
    writer.close()


@pytest.mark.one_path
async def test_header_count_limit_is_a_setting(serve: Serve) -> None:
    srv = await serve(fast=True, max_headers=10)
    reader, writer = await open_raw(srv)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(11))
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    got = await answer(reader)
    assert_refused(got, 431, "more than 10 header fields")
    writer.close()
    await healthy(srv)  # 9 extra headers are fine (httpx sends a few)


@pytest.mark.one_path
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
    assert_refused(got, 431, "request headers larger than 65536 bytes")
    assert sent < 8 * 1024 * 1024  # refused near the limit, not after the whole header
    writer.close()
    await healthy(srv)


@pytest.mark.one_path
async def test_websocket_handshake_large_head_gets_431(serve: Serve) -> None:
    srv = await serve(fast=True)
    reader, writer = await open_raw(srv)
    writer.write((WS_HEAD + "Cookie: " + "c" * 70_000 + "\r\n\r\n").encode())
    got = await answer(reader)
    assert_refused(got, 431, "request headers larger than 65536 bytes")
    writer.close()


@pytest.mark.one_path
async def test_websocket_handshake_dripping_gets_408(serve: Serve) -> None:
    srv = await serve(fast=True, header_timeout=0.5)
    reader, writer = await open_raw(srv)
    got = await drip(writer, (WS_HEAD + "X-Pad: " + "p" * 2000).encode(), reader)
    assert_refused(got, 408, "request head not received within 0.5 s")
    writer.close()


@pytest.mark.one_path
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


@pytest.mark.one_path
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


# -- both paths: a mounted tidings (stock uvicorn) guards its own routes (router.py) ----------
# and answers as `tidings serve` does (serve/guard.py): the same statuses and bodies

#: the streaming endpoints (tidings.streaming): all take POST, reading the body first
STREAMS = [
    "/connection/http_stream",
    "/connection/sse",
    "/emulation",
    "/connection/uni_http_stream",
    "/connection/uni_sse",
]
#: the WebSocket endpoints
SOCKETS = ["/ws/news", "/connection/websocket", "/connection/uni_websocket"]
MANY = b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))


async def test_partial_body_gets_408_and_others_are_served(serve: Serve) -> None:
    srv = await serve(body_timeout=1.0)
    stalled = [await open_raw(srv) for _ in range(5)]
    for _, writer in stalled:  # half a body, then nothing
        writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"channel":'
        )
    await healthy(srv)  # the others do not wait for them
    for reader, writer in stalled:
        got = await answer(reader)  # the answer comes, then the server ends the connection
        assert_refused(got, 408, "request body not received within 1 s")
        writer.close()
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        (MANY, "more than 100 header fields"),
        (b"X-Big: " + b"a" * 100_000 + b"\r\n", "request headers larger than 65536 bytes"),
    ],
    ids=["10000 headers", "a 100 KB header"],
)
async def test_routes_refuse_large_heads_with_431(serve: Serve, headers: bytes, what: str) -> None:
    srv = await serve()
    for target in (b"POST /api/publish", b"GET /health", *(b"POST " + p.encode() for p in STREAMS)):
        reader, writer = await open_raw(srv)
        writer.write(
            target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + headers + b"\r\n{}"
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        got = await answer(reader)
        assert_refused(got, 431, what)
        writer.close()
    await healthy(srv)


@pytest.mark.parametrize("path", STREAMS)
async def test_streaming_bodies_get_408(serve: Serve, path: str) -> None:
    # the connect frame (http_stream, sse, uni_*) or the commands (/emulation) never complete
    srv = await serve(body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"connect":' % path.encode()
    )
    got = await answer(reader)
    assert_refused(got, 408, "request body not received within 0.5 s")
    writer.close()
    await healthy(srv)


async def test_streaming_body_dripped_is_not_renewed_by_each_byte(
    serve: Serve, server_path: str
) -> None:
    srv = await serve(body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(
        b"POST /connection/http_stream HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    )
    try:
        got = await drip(writer, b" " * 5000, reader)
    except ConnectionResetError:
        # stock uvicorn closes at once after the 408, with the client's bytes still coming in:
        # the kernel may reset the connection before the client reads the answer (`tidings
        # serve` lingers, serve/guard.py); either way the request is not held
        assert server_path == "uvicorn"
    else:
        assert_refused(got, 408, "request body not received within 0.5 s")
    writer.close()


async def test_stream_outlives_the_body_timeout(serve: Serve) -> None:
    # only the reading of the body is timed: a stream that connected lasts past it and delivers
    secret = "slow-requests-secret-long-enough-for-hs256"
    srv = await serve(token_hmac_secret=secret, api_key="k", body_timeout=0.3)
    channel = f"news-{uuid.uuid4().hex}"
    connect = {"token": jwt.encode({"sub": "u", "channels": [channel]}, secret, "HS256")}
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", f"{srv.url}/connection/uni_http_stream", json=connect) as r,
    ):
        assert r.status_code == 200
        lines = r.aiter_lines()
        assert "connect" in orjson.loads(await asyncio.wait_for(anext(lines), 10))
        await asyncio.sleep(1.0)  # a deadline well past body_timeout, not a measurement
        await srv.hub.publish(channel, "still here")
        pushed = orjson.loads(await asyncio.wait_for(anext(lines), 10))
        assert pushed["pub"]["data"] == "still here", pushed


@pytest.mark.parametrize("path", SOCKETS)
@pytest.mark.parametrize("count", [10_000, 120])
async def test_websocket_handshake_with_too_many_headers_gets_431(
    serve: Serve, server_path: str, path: str, count: int
) -> None:
    # under stock uvicorn with its default WebSocket protocol (websockets-sansio) a handshake
    # of more than 128 header fields never reaches the app: uvicorn holds it unanswered
    # (README "Production"); wsproto hands any handshake to the app, which refuses it
    options = {"ws": "wsproto"} if server_path == "uvicorn" and count > 128 else None
    srv = await serve(uvicorn_options=options)
    reader, writer = await open_raw(srv)
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(count))
    writer.write(WS_HEAD.replace("/ws/news", path).encode() + many + b"\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    got = await answer(reader)
    assert_refused(got, 431, "more than 100 header fields")
    writer.close()
    await healthy(srv)


async def test_websocket_refusal_without_the_denial_extension_is_a_close() -> None:
    # a server that cannot send an HTTP response for a WebSocket: closed 1008 before accepting
    from tidings.router import GuardedApp

    async def endpoint(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the endpoint ran")

    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    headers = [(b"x-%d" % i, b"1") for i in range(101)]
    scope = {"type": "websocket", "path": "/ws/news", "headers": headers, "extensions": {}}
    await GuardedApp(endpoint, Settings())(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": ""}]


async def test_admin_login_is_guarded(serve: Serve) -> None:
    srv = await serve(api_key="k", admin_password="correct horse battery staple", body_timeout=0.5)
    reader, writer = await open_raw(srv)
    writer.write(
        b"POST /admin/login HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + MANY + b"\r\n{}"
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    assert_refused(await answer(reader), 431, "more than 100 header fields")
    writer.close()
    reader, writer = await open_raw(srv)
    writer.write(b'POST /admin/login HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"pass')
    assert_refused(await answer(reader), 408, "request body not received within 0.5 s")
    writer.close()


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
        r = await http.post(f"{srv.url}/connection/uni_http_stream", content=b"{}", headers=many)
        assert r.status_code == 431, r.text


@pytest.mark.one_path
async def test_refusals_are_not_logged_as_invalid_requests(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """uvicorn logs "Invalid HTTP request received." (WARNING) for every parser error; a 431
    or 414 that tidings serve chose is answered with its own status, not logged as one (a
    client sending them on purpose would fill the log). A request that is not HTTP still is:
    the message checked here is uvicorn's own (serve/_internals.INVALID_REQUEST)."""
    from tidings.serve._internals import INVALID_REQUEST
    from tidings.serve.http import MAX_TARGET

    srv = await serve(fast=True)
    uvicorn_log = logging.getLogger("uvicorn.error")  # its parent "uvicorn" does not propagate
    uvicorn_log.addHandler(caplog.handler)
    try:
        await refuse_then_garble(srv, caplog, INVALID_REQUEST, MAX_TARGET)
    finally:
        uvicorn_log.removeHandler(caplog.handler)


async def refuse_then_garble(
    srv: Running, caplog: pytest.LogCaptureFixture, invalid: str, max_target: int
) -> None:
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"):
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        for head in (
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n",
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
            b"GET /health?" + b"q" * max_target + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            reader, writer = await open_raw(srv)
            writer.write(head)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            got = await answer(reader)
            assert got.split(b" ", 2)[1] in (b"431", b"414")
            writer.close()
        assert invalid not in caplog.text
        reader, writer = await open_raw(srv)
        writer.write(b"\x16\x03\x01 not http at all\r\n\r\n")  # e.g. TLS to a plain port
        got = await answer(reader)
        assert got.split(b" ", 2)[1] == b"400"
        writer.close()
        assert caplog.text.count(invalid) == 1
