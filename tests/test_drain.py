"""Graceful drain: a stopping node closes its clients so that they lose nothing.

* 100 centrifuge-python clients (recoverable subscriptions) reach node A of two `tidings serve`
  processes on one Redis through a fail-over TCP proxy on one port (new connections go to A
  while it accepts, then to B). Publishing goes on steadily while A is sent SIGTERM: every
  client is closed 3001 "shutdown", reconnects through the proxy to B and recovers
  (``recovered: true``), and has every offset once, in order. A exits in a bounded time.
* A publish whose body is still arriving when the server stops is answered (`tidings serve`'s
  own HTTP path closed such a connection unanswered).
* ``Tidings.drain()`` on both server paths: Centrifugo clients get 3001, raw ones 1012, and a
  connection that arrives while draining is refused the same way.
* The close timeout of `tidings serve`'s WebSocket protocol is the served tidings' setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from centrifuge import (
    Client,
    ClientEventHandler,
    ConnectingContext,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)
from fastapi import FastAPI, WebSocket

from tidings import Tidings
from tidings.app import create_app
from tidings.serve.front import Front
from tidings.serve.websocket import close_timeout

from .cfutil import SECRET, token
from .conftest import Running, Serve
from .engines import ENGINES, WAIT, namespace
from .nodes import Proc, tidings_serve
from .proxy import Proxy

CLIENTS = 100
CHANNELS = [f"feed:{n}" for n in range(4)]
PERIOD = 3.0  # shutdown_period of node A, seconds
CLOSE_TIMEOUT = 2.0
#: bound on a stopping node's exit: the drain period, the close timeouts, and room for a
#: loaded machine; a node that hangs fails the test
EXIT_BOUND = PERIOD + 2 * CLOSE_TIMEOUT + 30.0
SLOW_WAIT = 6 * WAIT  # 100 SDK clients reconnecting on a loaded machine
API_KEY = "drain-key"

CONFIG = """
[namespaces.feed]
history_size = 1000
history_ttl = 600
force_recovery = true
allow_subscribe = "authenticated"
"""


class Changes:
    """One event every recorder sets on any change; :meth:`until` waits on it."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def changed(self) -> None:
        self.event.set()

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        async def wait() -> None:
            while not predicate():
                self.event.clear()
                await self.event.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout}s") from None


class Recorder(ClientEventHandler, SubscriptionEventHandler):
    """One SDK client's life: close codes it reconnected after, subscriptions, publications."""

    def __init__(self, changes: Changes) -> None:
        self.changes = changes
        self.connecting: list[int] = []  # ConnectingContext codes (0: the first connect)
        self.subscribed: list[SubscribedContext] = []
        self.pubs: list[tuple[int, Any]] = []

    async def on_connecting(self, ctx: ConnectingContext) -> None:  # type: ignore[override]
        self.connecting.append(ctx.code)
        self.changes.changed()

    async def on_subscribed(self, ctx: SubscribedContext) -> None:  # type: ignore[override]
        self.subscribed.append(ctx)
        self.changes.changed()

    async def on_publication(self, ctx: PublicationContext) -> None:  # type: ignore[override]
        self.pubs.append((ctx.pub.offset, ctx.pub.data))
        self.changes.changed()


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with namespace(ENGINES["redis"]) as url:
        yield url


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def node(tmp: Path, url: str, name: str, procs: list[Proc]) -> Proc:
    config = tmp / "tidings.toml"
    config.write_text(CONFIG)
    proc = tidings_serve(
        tmp,
        url,
        "--config",
        str(config),
        "--log-level",
        "info",
        name=name,
        env={
            "TIDINGS_API_KEY": API_KEY,
            "TIDINGS_TOKEN_HMAC_SECRET": SECRET,
            "TIDINGS_SHUTDOWN_PERIOD": str(PERIOD),
            "TIDINGS_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT),
            "TIDINGS_MAX_COMMANDS_PER_SECOND": "0",
        },
    )
    procs.append(proc.start())
    return proc


async def test_sdk_clients_move_to_the_other_node_and_lose_nothing(
    tmp_path: Path, redis_url: str, procs: list[Proc]
) -> None:
    a, b = node(tmp_path, redis_url, "a", procs), node(tmp_path, redis_url, "b", procs)
    await asyncio.gather(asyncio.to_thread(a.wait_healthy), asyncio.to_thread(b.wait_healthy))
    proxy = Proxy(a.port, b.port)  # new connections go to the first that accepts
    port = await proxy.start()
    changes = Changes()
    recorders = [Recorder(changes) for _ in range(CLIENTS)]
    clients: list[Client] = []
    published: dict[str, list[tuple[int, Any]]] = {c: [] for c in CHANNELS}
    stop_publishing = asyncio.Event()

    async def publish(http: httpx.AsyncClient) -> None:
        n = 0
        while not stop_publishing.is_set():
            channel = CHANNELS[n % len(CHANNELS)]
            data = {"n": n}
            r = await http.post("/api/publish", json={"channel": channel, "data": data})
            assert r.status_code == 200, r.text
            result = r.json()["result"]
            published[channel].append((result["offset"], data))
            changes.changed()
            n += 1
            await asyncio.sleep(0.01)  # steady, not flat out

    try:
        for i, rec in enumerate(recorders):
            client = Client(
                f"ws://127.0.0.1:{port}/connection/websocket",
                events=rec,
                token=token(f"user{i}"),
                proxy=None,
                timeout=WAIT,
                min_reconnect_delay=0.05,
                max_reconnect_delay=1.0,
            )
            sub = client.new_subscription(CHANNELS[i % len(CHANNELS)], rec, recoverable=True)
            clients.append(client)
            await client.connect()
            await sub.subscribe()
        await changes.until(
            lambda: all(r.subscribed for r in recorders), "every client subscribed", SLOW_WAIT
        )
        assert proxy.chosen == [a.port] * CLIENTS

        headers = {"X-API-Key": API_KEY}
        async with httpx.AsyncClient(base_url=b.url, headers=headers, timeout=WAIT) as http:
            publisher = asyncio.create_task(publish(http))
            await changes.until(
                lambda: all(len(p) >= 5 for p in published.values()), "first publications", WAIT
            )
            a.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            # a hang fails the test; how soon it exits is not asserted
            await asyncio.to_thread(a.wait_exit, EXIT_BOUND)
            await changes.until(
                lambda: all(len(r.subscribed) >= 2 for r in recorders),
                "every client resubscribed on B",
                SLOW_WAIT,
            )
            settled = {c: len(p) for c, p in published.items()}
            await changes.until(
                lambda: all(len(published[c]) >= settled[c] + 5 for c in CHANNELS),
                "publications after the move",
                WAIT,
            )
            stop_publishing.set()
            await publisher

        def complete() -> bool:
            return all(
                len(r.pubs) >= len(published[CHANNELS[i % len(CHANNELS)]])
                for i, r in enumerate(recorders)
            )

        await changes.until(complete, "every publication delivered", SLOW_WAIT)
    finally:
        stop_publishing.set()
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
        await proxy.stop()

    assert f"draining {CLIENTS} connections over {PERIOD:g}s" in a.output()
    assert proxy.chosen[:CLIENTS] == [a.port] * CLIENTS
    assert proxy.chosen[CLIENTS:] and set(proxy.chosen[CLIENTS:]) == {b.port}
    for i, rec in enumerate(recorders):
        channel = CHANNELS[i % len(CHANNELS)]
        # told: shutdown (a later reconnect, if the loaded machine made one time out, is fine)
        assert rec.connecting[0] == 0 and rec.connecting[1] == 3001, (i, rec.connecting)
        first, *again = rec.subscribed
        assert first.recoverable and not first.was_recovering
        assert again and all(s.was_recovering and s.recovered for s in again), (i, again)
        # every offset once, in order, and exactly what was published
        assert rec.pubs == published[channel], (i, channel)
        assert [o for o, _ in rec.pubs] == list(range(1, len(rec.pubs) + 1))


def _http_head(port: int, body: bytes) -> socket.socket:
    """A publish whose headers and the first half of its body are sent."""
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        b"POST /api/publish HTTP/1.1\r\nHost: t\r\nX-API-Key: " + API_KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    sock.sendall(head + body[: len(body) // 2])
    return sock


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(WAIT)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def test_publish_in_flight_when_stopping_is_answered(
    tmp_path: Path, redis_url: str, procs: list[Proc]
) -> None:
    a = node(tmp_path, redis_url, "a", procs)
    await asyncio.to_thread(a.wait_healthy)
    body = json.dumps({"channel": "feed:inflight", "data": {"n": 1}}).encode()
    sock = _http_head(a.port, body)
    try:
        # one idle keep-alive connection too: it is closed, unanswered, as nothing was asked
        idle = socket.create_connection(("127.0.0.1", a.port))
        a.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        # logged just before uvicorn's shutdown reaches the connections, with no await between
        await asyncio.to_thread(
            a.wait_until, lambda: "answering requests in flight" in a.output(), "stopping", WAIT
        )
        sock.sendall(body[len(body) // 2 :])
        answer = await asyncio.to_thread(_read_response, sock)
        assert await asyncio.to_thread(_read_response, idle) == b""
        idle.close()
    finally:
        sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["result"]["offset"] == 1
    await asyncio.to_thread(a.wait_exit, EXIT_BOUND)


async def test_drain_closes_centrifuge_3001_raw_1012_and_refuses_newcomers(
    serve: Serve,
) -> None:
    srv: Running = await serve(shutdown_period=0.5)
    cf = await websockets.connect(f"{srv.ws}/connection/websocket")
    await cf.send(json.dumps({"id": 1, "connect": {}}))
    assert "connect" in json.loads(await cf.recv())
    raws = [await websockets.connect(f"{srv.ws}/ws/news") for _ in range(2)]
    draining = asyncio.create_task(srv.tidings.drain())
    codes = []
    for ws in [cf, *raws]:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        codes.append((closed.value.rcvd.code, closed.value.rcvd.reason))
    assert codes == [(3001, "shutdown"), (1012, "service restart"), (1012, "service restart")]
    await asyncio.wait_for(draining, WAIT)
    assert not srv.tidings.hub.sessions
    # the node is draining: a newcomer (the listener is still open here) is closed the same way
    late_cf = await websockets.connect(f"{srv.ws}/connection/websocket")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(late_cf.recv(), WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3001
    late_raw = await websockets.connect(f"{srv.ws}/ws/news")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(late_raw.recv(), WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


def test_fast_websocket_close_timeout_is_the_setting() -> None:
    """`tidings serve`'s WebSocket protocol waits the served tidings' ``close_timeout`` for a
    close reply (it waited 10 s whatever the setting)."""
    app = create_app(close_timeout=0.7, demo=False)
    mine = FastAPI()
    Tidings(close_timeout=1.5).install(mine)
    plain = FastAPI()

    @plain.websocket("/ws")
    async def echo(ws: WebSocket) -> None:
        await ws.accept()

    def timeout_of(asgi: Any) -> float:
        config = uvicorn.Config(asgi, interface="asgi3")
        config.load()
        return close_timeout(config)

    assert timeout_of(Front(app)) == 0.7
    assert timeout_of(mine) == 1.5
    assert timeout_of(plain) == 10.0


async def test_workers_drain_too(tmp_path: Path, redis_url: str, procs: list[Proc]) -> None:
    """`tidings serve --workers 2`: SIGTERM to the supervisor drains every worker (3001)."""
    supervisor = tidings_serve(
        tmp_path, redis_url, "--workers", "2", env={"TIDINGS_SHUTDOWN_PERIOD": "0.5"}
    )
    procs.append(supervisor.start())
    await asyncio.to_thread(supervisor.wait_healthy)
    clients = []
    for _ in range(4):  # the kernel spreads them over both workers, most likely
        ws = await websockets.connect(f"{supervisor.ws}/connection/websocket")
        await ws.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in json.loads(await ws.recv())
        clients.append(ws)
    supervisor.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    for ws in clients:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3001, "shutdown")
    await asyncio.to_thread(supervisor.wait_exit, EXIT_BOUND)


async def test_metrics_expose_what_the_soak_reads(serve: Serve) -> None:
    """/metrics has the process's descriptors and memory and the loop's task count."""
    srv: Running = await serve()
    ws = await websockets.connect(f"{srv.ws}/ws/news")
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            text = (await http.get("/metrics")).text
    finally:
        await ws.close()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["tidings_connections"] == 1
    assert values["tidings_asyncio_tasks"] >= 1  # at least the open connection's
    assert values["process_open_fds"] >= 3  # the listener, the WebSocket, this request
    assert values["process_resident_memory_bytes"] > 0
