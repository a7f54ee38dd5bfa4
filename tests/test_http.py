"""`tidings serve`'s own HTTP path (serve/http.py) against uvicorn's ASGI path.

The publishing routes are answered straight from httptools' callbacks on the fast path; these
tests hold it to the ASGI path's exact bytes, and to HTTP/1.1's rules for pipelined requests,
over real sockets, with a broker that never suspends (memory) and one that does (Redis)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import pytest

from tidings.serve import _internals
from tidings.serve.front import Front
from tidings.serve.http import FastHttp

from .conftest import Running, Serve
from .engines import ENGINES, namespace

WAIT = 10.0


def request(
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    version: str = "1.1",
    chunked: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        parts = [body[:half], body[half:]]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def responses(port: int, sent: list[bytes], *, pipelined: bool) -> list[bytes]:
    """Send the requests on one connection, all in one write or each after the previous
    answer; the responses (fewer if the server closes first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[bytes] = []
    try:
        if pipelined:
            writer.write(b"".join(sent))
        async with asyncio.timeout(WAIT):
            for data in sent:
                if not pipelined:
                    writer.write(data)
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = re.search(rb"\r\ncontent-length: (\d+)\r\n", head)
                assert length is not None, head
                out.append(head + await reader.readexactly(int(length[1])))
    finally:
        writer.close()
    return out


def normalized(response: bytes) -> bytes:
    """A response without what differs between two servers: date, stream epochs, node ids."""
    response = re.sub(rb"\r\ndate: [^\r]*", b"", response)
    return re.sub(rb'"(epoch|node)":"\w+"', rb'"\1":""', response)


def exchanges(api_key: str | None) -> list[bytes]:
    key = {"X-API-Key": api_key} if api_key else {}
    ok = {**key, "Content-Type": "application/json"}
    return [
        request("/publish/c", b"some text", key),
        request("/publish/c", b"\xff", key),
        request("/publish/c", b"x" * 3000, key),  # over max_message_size + 1024
        request("/publish/c", b"y" * 3000, key, chunked=True),
        request("/publish/bad%20channel", b"x", key),
        request("/publish/bad!", b"x", key),
        request("/publish/c?x=1", b"query", key),
        request("/api/publish", b'{"channel": "c", "data": {"n": 1}}', ok),
        request("/api/publish", b'{"channel": "c", "data": 2}', ok, chunked=True),
        request("/api/publish", b"not json", ok),
        request("/api/publish", b"[1]", ok),
        request("/api/publish", b'{"channel": "c"}', ok),
        request("/api/publish", b'{"channel": "$private", "data": 1}', ok),
        request(
            "/api/publish",
            b'{"channel": "bad channel!", "data": 1}',
            {**ok, "X-Centrifugo-Error-Mode": "transport"},
        ),
        request("/api/publish", b'{"channel": "c", "data": "' + b"z" * 5000 + b'"}', ok),
        request("/api/broadcast", b'{"channels": ["a", "b"], "data": 3}', ok),
        request("/api/batch", b'{"commands": [{"publish": {"channel": "c", "data": 4}}]}', ok),
        request("/api/history", b'{"channel": "c"}', ok),
        request("/api/history", b"", ok),  # no params at all
        request("/api/nope", b"{}", ok),
        request("/api/publish", b'{"channel": "c", "data": 5}', {"X-API-Key": "wrong"}),
        request("/api/publish", b'{"channel": "c", "data": 6}', {"Authorization": "apikey no"}),
        request("/health", method="GET"),
        request("/api/publish", b'{"channel": "c", "data": 7}', {**ok, "Connection": "close"}),
    ]


async def transcript(srv: Running, api_key: str | None) -> list[bytes]:
    """Every exchange on one keep-alive connection (the last one closes it), then HTTP/1.0."""
    sent = exchanges(api_key)
    got = await responses(srv.port, sent, pipelined=False)
    old = request("/publish/c", b"1.0", {"X-API-Key": api_key} if api_key else {}, version="1.0")
    got += await responses(srv.port, [old], pipelined=False)
    return [normalized(r) for r in got]


def spy_on_asgi_answers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the requests answered through the ASGI cycle (Front._answer) from now on."""
    through_asgi: list[str] = []
    answer = Front._answer

    def spy(front: Front, call: Any, scope: Any, receive: Any, send: Any) -> Any:
        through_asgi.append(scope["path"])
        return answer(front, call, scope, receive, send)

    monkeypatch.setattr(Front, "_answer", spy)
    return through_asgi


@pytest.mark.one_path  # compares both paths
@pytest.mark.parametrize("api_key", [None, "sekret"])
async def test_fast_http_answers_with_the_asgi_paths_bytes(
    serve: Serve, api_key: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = {"api_key": api_key, "max_message_size": 1000, "api_max_body_size": 4096}
    asgi = await transcript(await serve(fast=False, **limits), api_key)
    fast_srv = await serve(fast=True, **limits)
    assert issubclass(fast_srv.server.config.http_protocol_class, FastHttp)
    through_asgi = spy_on_asgi_answers(monkeypatch)
    fast = await transcript(fast_srv, api_key)
    # only what FastHttp leaves to uvicorn took the ASGI cycle: a %-escaped path, and a body
    # declared larger than any route takes
    assert through_asgi == ["/publish/bad channel", "/api/publish"]
    assert len(asgi) == len(exchanges(api_key)) + 1
    for i, (a, f) in enumerate(zip(asgi, fast, strict=True)):
        assert f == a, f"exchange {i}"
    statuses = {int(r.split(b" ", 2)[1]) for r in asgi}
    assert statuses == {200, 400, 404, 413} | ({401} if api_key else set())
    assert asgi[-2].endswith(b"connection: close\r\n\r\n" + asgi[-2].split(b"\r\n\r\n")[1])
    assert b'"offset":1' in asgi[0]


@pytest.mark.parametrize("fast", [False, True])
async def test_pipelined_requests_are_answered_in_order(serve: Serve, fast: bool) -> None:
    srv = await serve(fast=fast)
    sent = []
    for i in range(30):
        sent.append(request(f"/publish/p{i % 3}", b"m%d" % i))
        if i % 7 == 3:
            sent.append(request("/health", method="GET"))
    got = await responses(srv.port, sent, pipelined=True)
    assert len(got) == len(sent)
    offsets = [
        orjson.loads(r.split(b"\r\n\r\n", 1)[1]).get("result", {}).get("offset")
        for r in got
        if b'"result"' in r
    ]
    assert offsets == [i // 3 + 1 for i in range(30)]
    assert sum(b'"status":"ok"' in r for r in got) == len(sent) - 30


@pytest.mark.one_path  # FastHttp only
async def test_pipelined_publishes_on_a_broker_that_suspends(serve: Serve) -> None:
    """Redis: each answer waits for the broker, so pipelined requests queue behind it."""
    async with namespace(ENGINES["redis"]) as url:
        srv = await serve(fast=True, broker_url=url)
        assert not srv.hub.broker.synchronous
        sent = [request("/publish/r", b"m%d" % i) for i in range(20)]
        sent.insert(5, request("/health", method="GET"))
        sent.append(request("/api/publish", b'{"channel": "r", "data": 1}'))
        got = await responses(srv.port, sent, pipelined=True)
        bodies = [orjson.loads(r.split(b"\r\n\r\n", 1)[1]) for r in got]
        assert [b["result"]["offset"] for b in bodies if "result" in b] == list(range(1, 22))
        assert bodies[5]["status"] == "ok"
        history = await srv.hub.history("r")
        assert [p.data for p in history.publications][:20] == [b'"m%d"' % i for i in range(20)]


@pytest.mark.one_path  # FastHttp only
async def test_idle_keep_alive_connection_is_closed(serve: Serve) -> None:
    srv = await serve(fast=True, uvicorn_options={"timeout_keep_alive": 0.2})
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(request("/publish/k", b"x"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"connection: close" not in head
        rest = await asyncio.wait_for(reader.read(), WAIT)  # b"" once the server closes
        assert rest.startswith(b'{"result"')
        assert reader.at_eof()
    finally:
        writer.close()


@pytest.mark.one_path  # FastHttp only
async def test_an_unfamiliar_uvicorn_gets_its_own_path(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If uvicorn's internals change, publishing still works, through uvicorn's ASGI cycle."""
    monkeypatch.setattr(_internals, "_fits", [False])
    through_asgi = spy_on_asgi_answers(monkeypatch)
    srv = await serve(fast=True)
    got = await responses(srv.port, [request("/publish/u", b"x")], pipelined=False)
    assert got[0].startswith(b"HTTP/1.1 200 OK") and b'"offset":1' in got[0]
    assert through_asgi == ["/publish/u"]
