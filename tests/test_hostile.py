"""Issue 11's defects, each as the attacker's input: refused connections pin nothing, deep
JSON and huge numbers are client errors, tokens stay out of logs, origins are checked.

Every server test here runs on both paths (stock uvicorn, and `tidings serve`'s own
protocols with ``TIDINGS_TEST_FAST=1``) unless it names one."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import importlib
import json
import logging
import os
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest
import websockets

import tidings
from tidings.connection import Client
from tidings.protocol.depth import MAX_DEPTH, too_deep
from tidings.session import Session

from .conftest import Running, Serve
from .engines import ENGINES, namespace
from .wsraw import RawWs

MAX_SAFE = 2**53 - 1  # the largest integer every JSON client reads exactly

SECRET = "hostile-secret-that-is-long-enough-for-hs256"


def live(kind: type) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


def test_no_module_holds_an_exception_instance() -> None:
    """A module-level exception raised again and again extends its ``__traceback__`` each time,
    pinning every raiser's frames: none may exist anywhere in tidings."""
    found = []
    for info in pkgutil.walk_packages(tidings.__path__, "tidings."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            values = value if isinstance(value, tuple | list | frozenset | set) else (value,)
            if isinstance(value, dict):
                values = tuple(value.values())
            if any(isinstance(v, BaseException) for v in values):
                found.append(f"{info.name}.{name}")
    assert found == []


async def refuse(url: str, *frames: str | bytes) -> tuple[int, str]:
    """Connect, send ``frames``, and return the server's close (code, reason)."""
    async with websockets.connect(url, max_size=None) as ws:
        for frame in frames:
            await ws.send(frame)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
    rcvd = closed.value.rcvd
    assert rcvd is not None
    return rcvd.code, rcvd.reason


async def test_refused_connections_leave_no_session_alive(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key", max_connections=1)
    url = f"{srv.ws}/connection/websocket"
    big_token = "a." + "b" * 60_000 + ".c"
    kinds: list[tuple[tuple[str | bytes, ...], int]] = [
        (('{"id":1,"connect":{"token":"a.b.c"}}',), 3500),
        (("{}",), 3501),
        ((b"\x00\x01binary",), 3501),
        ((f'{{"id":1,"connect":{{"token":"{big_token}"}}}}',), 3500),
    ]
    before_sessions, before_clients = live(Session), live(Client)
    for _ in range(20):
        for frames, code in kinds:
            assert (await refuse(url, *frames))[0] == code
    # over max_connections: one held open, the next ones refused with 1013
    async with websockets.connect(url):
        for _ in range(20):
            assert (await refuse(url))[0] == 1013
    # the server forgets closed sessions on its own schedule
    await until(lambda: not srv.hub.sessions, "the refused sessions to be forgotten")
    assert live(Session) <= before_sessions and live(Client) <= before_clients


async def test_send_without_a_handler_leaves_no_session_alive(serve: Serve) -> None:
    srv = await serve()  # dev mode: anonymous connects are accepted, no send handler is set
    url = f"{srv.ws}/connection/websocket"
    before = live(Session)
    for _ in range(20):
        code, _ = await refuse(url, '{"id":1,"connect":{}}', '{"send":{"data":{}}}')
        assert code == 3508
    await until(lambda: not srv.hub.sessions, "the refused sessions to be forgotten")
    assert live(Session) <= before


async def test_long_targets_are_refused_and_queries_never_remembered(serve: Serve) -> None:
    """`tidings serve`'s own HTTP path: routes are remembered by path alone, and a target over
    MAX_TARGET is answered 414 before anything routes it."""
    from tidings.serve.http import MAX_TARGET, _front

    srv = await serve(api_key="key", fast=True)
    front = _front(srv.server.config.loaded_app)
    assert front is not None
    async with httpx.AsyncClient() as http:
        for i in range(50):  # unique queries, each under the bound: answered 401, not kept
            r = await http.post(f"{srv.url}/api/publish?{i}={'q' * 8000}", json={})
            assert r.status_code == 401
        r = await http.post(f"{srv.url}/api/publish?{'q' * MAX_TARGET}", json={})
        assert r.status_code == 414
        # the documented JSON error, as every other refusal of the server's own HTTP
        assert r.headers["content-type"] == "application/json"
        assert r.headers["connection"] == "close"
        assert r.json() == {
            "error": {"code": 107, "message": f"request target longer than {MAX_TARGET} bytes"}
        }
        r = await http.get(f"{srv.url}/ws/news?token={'q' * MAX_TARGET}")
        assert r.status_code == 414
        assert r.json()["error"]["code"] == 107
        # unique long paths are routed, not remembered
        for i in range(50):
            r = await http.post(f"{srv.url}/api/{i}{'p' * 1000}", json={})
            assert r.status_code in (401, 404)
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "data": 1})
        assert r.status_code == 401
    assert set(front._targets) == {b"/api/publish"}


def test_depth_counts_brackets_outside_strings_only() -> None:
    assert not too_deep(b'{"a":"' + b"[" * 1000 + b'"}')
    assert not too_deep(b'{"a":"\\"' + b"[" * 1000 + b'"}')  # an escaped quote inside
    assert not too_deep(b"[" * 10 + b"]" * 10 + b"[" * 200, limit=300)
    assert too_deep(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    assert not too_deep(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    assert not too_deep(b"[[]]" * 1000)  # many brackets, shallow


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


async def test_deep_json_is_a_client_error_on_the_api(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await serve()
    async with httpx.AsyncClient() as http, websockets.connect(f"{srv.ws}/ws/c") as ws:
        body = '{"channel":"c","data":' + deep(300) + "}"
        for path in ("/api/publish", "/api"):
            r = await http.post(f"{srv.url}{path}", content=body)
            assert r.json()["error"]["code"] == 107, r.text
        r = await http.post(f"{srv.url}/api/batch", content='{"commands":[' + deep(300) + "]}")
        assert r.json()["error"]["code"] == 107, r.text
        b64 = base64.b64encode(deep(300).encode()).decode()
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "b64data": b64})
        assert r.json()["error"]["code"] == 107, r.text
        ok = deep(100)  # within the limit: published and delivered as sent
        r = await http.post(f"{srv.url}/api/publish", content='{"channel":"c","data":' + ok + "}")
        assert "error" not in r.json(), r.text
        assert await asyncio.wait_for(ws.recv(), 10) == ok
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_deep_json_from_a_client_is_a_documented_close(serve: Serve) -> None:
    srv = await serve()
    url = f"{srv.ws}/connection/websocket"
    code, reason = await refuse(
        url, '{"id":1,"connect":{}}', '{"id":2,"publish":{"channel":"c","data":' + deep(300) + "}}"
    )
    assert code == 3501 and "nested" in reason


@pytest.mark.parametrize("engine", ["memory", "redis"])
async def test_huge_numbers_are_answered_or_refused_with_107(serve: Serve, engine: str) -> None:
    async with namespace(ENGINES[engine]) as broker_url:
        srv = await serve(
            broker_url=broker_url, namespaces={"chat": {"history_size": 10, "history_ttl": 60}}
        )
        async with httpx.AsyncClient() as http:

            async def api(method: str, params: object) -> dict[str, Any]:
                r = await http.post(f"{srv.url}/api/{method}", json=params)
                reply: dict[str, Any] = r.json()
                return reply

            assert "error" not in await api("publish", {"channel": "chat:n", "data": 1})
            for offset, limit in [(10**15, -1), (MAX_SAFE, MAX_SAFE), (1, 10**15)]:
                reply = await api(
                    "history", {"channel": "chat:n", "limit": limit, "since": {"offset": offset}}
                )
                assert "error" not in reply, (offset, limit, reply)
                assert reply["result"]["offset"] == 1
            for offset, limit in [(MAX_SAFE + 1, -1), (2**64, 1), (1, 2**64), (1, -(2**64))]:
                reply = await api(
                    "history", {"channel": "chat:n", "limit": limit, "since": {"offset": offset}}
                )
                assert reply["error"]["code"] == 107, (offset, limit, reply)

        async with websockets.connect(f"{srv.ws}/connection/websocket") as ws:

            async def command(cmd: dict[str, Any]) -> dict[str, Any]:
                await ws.send(json.dumps(cmd))
                reply: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
                return reply

            await command({"id": 1, "connect": {}})
            sub = {"channel": "chat:n", "recoverable": True, "recover": True, "epoch": "x"}
            reply = await command({"id": 2, "subscribe": {**sub, "offset": 10**15}})
            # told it did not recover (false is left out of replies, as Centrifugo does)
            assert reply["subscribe"]["was_recovering"] is True, reply
            assert not reply["subscribe"].get("recovered"), reply
            reply = await command(
                {"id": 3, "subscribe": {**sub, "channel": "chat:m", "offset": 2**63}}
            )
            assert reply["error"]["code"] == 107, reply
            reply = await command({"id": 4, "history": {"channel": "chat:n", "limit": 2**63}})
            assert reply["error"]["code"] == 107, reply
            reply = await command(
                {"id": 5, "history": {"channel": "chat:n", "limit": 1, "since": {"offset": 10**15}}}
            )
            # another epoch ("" given): 112, as Centrifugo answers; never 100
            assert reply["error"]["code"] == 112, reply
            await ws.send(json.dumps({"id": 2**40, "presence": {"channel": "chat:n"}}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


async def handshake(port: int, path: str, origin: str | None, host: str | None = None) -> int:
    """The HTTP status of a WebSocket handshake from ``origin`` (101: accepted)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host or f'127.0.0.1:{port}'}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.close()


WS_PATHS = ("/connection/websocket", "/ws/news?token=x")


async def test_cross_site_websockets_are_refused_in_production(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key", allow_anonymous=True)
    here = f"http://127.0.0.1:{srv.port}"
    for path in WS_PATHS:
        assert await handshake(srv.port, path, "https://evil.example") == 403
        assert await handshake(srv.port, path, "null") == 403
        assert await handshake(srv.port, path, here) == 101  # same origin
        assert await handshake(srv.port, path, None) == 101  # not a browser
        # same host by name and default port
        assert await handshake(srv.port, path, "https://chat.example", "chat.example") == 101
        assert await handshake(srv.port, path, "https://chat.example", "chat.example:443") == 101
        assert await handshake(srv.port, path, "http://chat.example", "chat.example:8080") == 403


async def test_allowed_origins_are_glob_patterns_in_every_mode(serve: Serve) -> None:
    srv = await serve(allowed_origins=["https://*.example.com", "http://localhost:3000"])
    assert srv.tidings.settings.dev_mode
    for path in WS_PATHS:
        assert await handshake(srv.port, path, "https://app.example.com") == 101
        assert await handshake(srv.port, path, "HTTPS://App.Example.com") == 101
        assert await handshake(srv.port, path, "http://localhost:3000") == 101
        assert await handshake(srv.port, path, "https://example.com.evil.example") == 403
        assert await handshake(srv.port, path, f"http://127.0.0.1:{srv.port}") == 403
        assert await handshake(srv.port, path, None) == 101


async def test_dev_mode_accepts_any_origin_without_allowed_origins(serve: Serve) -> None:
    srv = await serve()
    for path in WS_PATHS:
        assert await handshake(srv.port, path, "https://evil.example") == 101


def test_allowed_origins_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings import Settings

    monkeypatch.setenv("TIDINGS_ALLOWED_ORIGINS", '["https://*.example.com"]')
    assert Settings().allowed_origins == ["https://*.example.com"]


async def test_cross_site_posts_need_a_preflight(serve: Serve) -> None:
    srv = await serve()  # dev mode: the API is open, but not to other sites' pages
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    async with httpx.AsyncClient() as http, websockets.connect(f"{srv.ws}/ws/c") as ws:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = await http.post(
                f"{srv.url}/api/publish",
                content='{"channel":"c","data":"pwned"}',
                headers={**evil, "Content-Type": kind},
            )
            assert r.status_code == 403, (kind, r.text)
            r = await http.post(
                f"{srv.url}/publish/c", content="pwned", headers={**evil, "Content-Type": kind}
            )
            assert r.status_code == 403, (kind, r.text)
        no_origin = {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}
        r = await http.post(f"{srv.url}/publish/c", content="pwned", headers=no_origin)
        assert r.status_code == 403
        # what a preflight would have approved, a same-origin page, and non-browsers: published
        r = await http.post(
            f"{srv.url}/api/publish", json={"channel": "c", "data": 1}, headers=evil
        )
        assert r.status_code == 200, r.text
        same = {"Origin": srv.url, "Sec-Fetch-Site": "same-origin", "Content-Type": "text/plain"}
        r = await http.post(f"{srv.url}/publish/c", content="2", headers=same)
        assert r.status_code == 200, r.text
        r = await http.post(f"{srv.url}/publish/c", content="3")
        assert r.status_code == 200, r.text
        assert [await asyncio.wait_for(ws.recv(), 10) for _ in range(3)] == ["1", "2", "3"]


class Everything(logging.Handler):
    """Every record any logger emits, formatted as a handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # the test's own clients are not the server
        if not record.name.startswith(("websockets.client", "httpx", "httpcore")):
            self.lines.append(self.format(record))


@contextlib.contextmanager
def every_log_line() -> Iterator[Everything]:
    """Capture every record at DEBUG from the root logger and from the loggers uvicorn's
    logging config keeps to themselves (propagate=False), as a user's handlers would."""
    handler = Everything()
    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "websockets"]
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    for name in ("uvicorn.access", "uvicorn.error", "websockets"):
        logging.getLogger(name).propagate = False  # one copy each, through ``handler``
    try:
        yield handler
    finally:
        for lg, (level, propagate) in zip(loggers, saved, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


async def test_tokens_are_never_logged(serve: Serve) -> None:
    srv = await serve(
        token_hmac_secret=SECRET,
        api_key="key",
        uvicorn_options={"log_level": "debug", "access_log": True},
    )
    token = jwt.encode({"sub": "alice", "pad": "p" * 400}, SECRET, algorithm="HS256")
    bad = token[:-8] + "AAAAAAAA"  # a bad signature: refused, with its reason logged
    secret_parts = {token.split(".")[1][-40:], token.split(".")[2], bad.split(".")[2]}
    with every_log_line() as logged:
        headers = {"Authorization": f"Bearer {token}", "Cookie": f"session={token[-30:]}"}
        async with websockets.connect(
            f"{srv.ws}/ws/news?token={token}", additional_headers=headers
        ) as ws:
            async with httpx.AsyncClient() as http:
                r = await http.post(
                    f"{srv.url}/api/publish?token={token}",
                    json={"channel": "news", "data": "hi"},
                    headers={"X-API-Key": "key"},
                )
                assert r.status_code == 200
            assert await asyncio.wait_for(ws.recv(), 10) == "hi"
        url = f"{srv.ws}/connection/websocket"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
            assert "connect" in json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (await refuse(url, json.dumps({"id": 1, "connect": {"token": bad}})))[0] == 3500
        assert (await refuse(f"{srv.ws}/ws/news?token={bad}"))[0] == 1008
    text = "\n".join(logged.lines)
    assert "refused" in text  # the capture works: tidings' own lines are in it
    leaked = [part for part in secret_parts if part in text]
    assert leaked == [], text
    assert "token=" not in text.replace("token=***", ""), text


def server_sockets(port: int) -> int:
    """Connected TCP sockets of this process whose local port is ``port``: the server's side
    of its clients' connections (the servers under test run in this process)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                ours.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode in ours:
                    count += 1
    return count


async def until(predicate: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    """Wait for a condition (a deadline, not a measurement)."""
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.05)
    assert predicate(), what


async def stalled_reader(srv: Running, channel: str) -> RawWs:
    """A raw client with a 4 KB receive buffer that stops reading while 3 MB are published
    to it: the server's side holds data it can never write."""
    stalled = await RawWs.connect(srv.port, f"/ws/{channel}", rcvbuf=4096)
    await until(lambda: srv.hub.subscribers(channel) == 1, "subscribed")
    async with httpx.AsyncClient() as http:
        body = "x" * 10_000
        for _ in range(300):
            r = await http.post(f"{srv.url}/api/publish", json={"channel": channel, "data": body})
            assert r.status_code == 200
    return stalled


@pytest.mark.parametrize("how", ["pong timeout", "protocol error", "slow"])
async def test_a_stalled_socket_is_aborted_and_counted_until_gone(serve: Serve, how: str) -> None:
    # Stock uvicorn's own heartbeat never times out here: its ping waits for the full socket
    # to drain before the pong timeout starts; the pong timeout is `tidings serve`'s.
    srv = await serve(
        fast=True if how == "pong timeout" else None,
        max_connections=2,
        ping_interval=0.5 if how == "pong timeout" else 3600,
        pong_timeout=0.5,
        close_timeout=0.5,
        outbox_limit=64 * 1024 if how == "slow" else 64 * 1024 * 1024,
    )
    stalled = await stalled_reader(srv, "z")
    try:
        if how == "protocol error":
            stalled.writer.write(b"\x81\x02hi")  # an unmasked client frame: 1002
        await until(lambda: server_sockets(srv.port) == 0, "the server's socket to be closed")
        await until(lambda: not srv.hub.sessions, "the session to be forgotten")
    finally:
        stalled.close()
    # the limit counts connections that are really there: two fit again
    async with websockets.connect(f"{srv.ws}/ws/a"), websockets.connect(f"{srv.ws}/ws/a"):
        assert (await refuse(f"{srv.ws}/ws/a"))[0] == 1013


async def test_a_closing_socket_counts_until_it_is_gone(serve: Serve) -> None:
    """`tidings serve`: a connection whose close is under way (a protocol error, buffered
    data the peer does not read) still counts under max_connections until its socket goes."""
    srv = await serve(
        fast=True, max_connections=1, close_timeout=600, ping_interval=3600, outbox_limit=2**26
    )
    stalled = await stalled_reader(srv, "z")
    stalled.writer.write(b"\x81\x02hi")  # an unmasked client frame: 1002
    await until(lambda: not srv.hub.sessions, "the session to be forgotten")
    assert server_sockets(srv.port) == 1 and srv.hub.lingering == 1
    assert (await refuse(f"{srv.ws}/ws/a"))[0] == 1013
    stalled.close()  # the peer goes: its socket with it
    await until(lambda: server_sockets(srv.port) == 0, "the socket to be gone")
    await until(lambda: srv.hub.lingering == 0, "the hub to stop counting it")
    async with websockets.connect(f"{srv.ws}/ws/a") as ws:
        async with httpx.AsyncClient() as http:
            await http.post(f"{srv.url}/api/publish", json={"channel": "a", "data": "in"})
        assert await asyncio.wait_for(ws.recv(), 10) == "in"
