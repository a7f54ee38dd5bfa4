"""The ASGI path's writer under each of uvicorn's WebSocket implementations.

The Flusher starts each send itself (in the writer task's name); a send that suspends on a
backed-up socket is finished by the writer task, and nothing queued later overtakes it."""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
from typing import Any

import pytest
import websockets
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tidings import Tidings, delivery, eager

from .conftest import IN_CI, Running, Serve, served
from .test_fast import wait_for
from .wsraw import RawWs

#: the ASGI writer under each of uvicorn's WebSocket protocols: never the fast path
pytestmark = pytest.mark.one_path

WS_IMPLS = [
    pytest.param("websockets-sansio"),
    # deprecated by uvicorn and websockets alike, still what `--ws websockets` runs
    pytest.param(
        "websockets",
        marks=[
            pytest.mark.filterwarnings("ignore::DeprecationWarning"),
            pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated"),
        ],
    ),
    pytest.param(
        "wsproto",
        marks=pytest.mark.skipif(  # under CI a dev dependency that is missing fails the run
            importlib.util.find_spec("wsproto") is None and not IN_CI,
            reason="wsproto is not installed (pip install -e '.[dev]')",
        ),
    ),
]

BODY = "x" * 20_000


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count calls of ``tidings.delivery.<name>``, or of ``tidings.eager.<name>`` for
    asyncio's private ``_enter_task`` (still calling it)."""
    calls = [0]
    module: Any = eager if name == "_enter_task" else delivery
    real = getattr(module, name)

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


async def texts(ws: RawWs, count: int) -> list[str]:
    frames = await ws.frames(count, seconds=30)
    assert all(opcode == 0x1 for opcode, _ in frames)
    return [payload.decode() for _, payload in frames]


async def stalled_subscriber(srv: Running, channel: str) -> RawWs:
    ws = await RawWs.connect(srv.port, f"/ws/{channel}", rcvbuf=4096)
    await wait_for(lambda: srv.hub.subscribers(channel) == 1)
    return ws


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
async def test_a_send_that_suspends_keeps_order(
    serve: Serve, ws_impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoffs = count_calls(monkeypatch, "resume")
    eager = count_calls(monkeypatch, "_enter_task")
    srv = await serve(outbox_limit=64 * 2**20, fast=False, uvicorn_options={"ws": ws_impl})
    ws = await stalled_subscriber(srv, "feed")  # reads nothing until everything is queued
    count = 300  # 6 MB: far more than the socket buffers hold, so sends must suspend
    for i in range(count):
        await srv.hub.publish("feed", f"{i}:{BODY}")
        if i % 10 == 9:
            await asyncio.sleep(0)  # the Flusher runs between publications
    assert handoffs[0] >= 1  # the writer task took at least one suspended send over
    got = await texts(ws, count)
    assert [m.split(":", 1)[0] for m in got] == [str(i) for i in range(count)]
    assert all(m.endswith(BODY) for m in got)
    # Drained: the Flusher sends again itself (the session went back to eager sends).
    before = eager[0]
    await srv.hub.publish("feed", "after")
    assert await texts(ws, 1) == ["after"]
    assert eager[0] > before
    ws.close()


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
async def test_slow_client_is_closed_3008_after_what_it_was_sent(
    serve: Serve, ws_impl: str
) -> None:
    srv = await serve(
        outbox_limit=256 * 1024, close_timeout=10, fast=False, uvicorn_options={"ws": ws_impl}
    )
    ws = await stalled_subscriber(srv, "feed")
    sent = 0
    while srv.hub.metrics.slow_clients == 0:
        assert sent < 2000, "the stalled client was never closed as slow"
        await srv.hub.publish("feed", f"{sent}:{BODY}")
        sent += 1
        await asyncio.sleep(0)
    # The client reads again: what got through comes in order, then the close frame.
    received: list[int] = []
    async with asyncio.timeout(30):
        while True:
            opcode, payload = await ws.frame()
            if opcode == 0x8:
                break
            received.append(int(payload.split(b":", 1)[0]))
    assert int.from_bytes(payload[:2], "big") == 3008
    assert received == list(range(len(received))) and len(received) < sent
    ws.send(0x8, payload[:2])  # the close handshake's reply (legacy websockets waits for it)
    await wait_for(lambda: len(srv.hub.sessions) == 0, seconds=10)
    ws.close()


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
async def test_a_stalled_send_is_abandoned_even_before_the_writer_takes_it_over(
    serve: Serve, ws_impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stalled client never reads: its session must still go (after close_timeout)."""
    handoffs = count_calls(monkeypatch, "_Handoff")
    srv = await serve(
        outbox_limit=3_000_000, close_timeout=0.5, fast=False, uvicorn_options={"ws": ws_impl}
    )
    ws = await stalled_subscriber(srv, "feed")
    for _ in range(50):  # fill the socket until a send the Flusher starts suspends
        await srv.hub.publish("feed", "y" * 1_000_000)
        await asyncio.sleep(0)  # the Flusher runs, then this task, then the writer task
        if handoffs[0]:
            break
    assert handoffs[0] == 1 and srv.hub.metrics.slow_clients == 0
    # Still before the writer task runs: this overflows the outbox, and close() must cancel
    # a send that no task awaits yet.
    await srv.hub.publish("feed", "z" * 2_500_000)
    assert srv.hub.metrics.slow_clients == 1
    await wait_for(lambda: len(srv.hub.sessions) == 0, seconds=10)
    ws.close()


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class TimedSend:
    """A user's ASGI middleware whose ``send`` needs a task (``asyncio.timeout``) and reads a
    context variable set for the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        REQUEST_ID.set(f"{scope['type']}:{scope.get('path')}")

        async def timed_send(message: Message) -> None:
            async with asyncio.timeout(5):
                await send(message)
            if message["type"] == "websocket.send":
                self.seen.append(REQUEST_ID.get("unset"))

        await self.app(scope, receive, timed_send)


async def test_eager_sends_run_as_the_writer_task_in_its_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eager = count_calls(monkeypatch, "_enter_task")
    tidings = Tidings(broker_url="memory://")
    app = FastAPI(lifespan=tidings.lifespan)
    app.include_router(tidings.router)
    timed = TimedSend(app)

    async with (
        served(timed) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/ws/news") as ws,
    ):
        await wait_for(lambda: tidings.hub.subscribers("news") == 1)
        for i in range(5):
            await tidings.hub.publish("news", f"n{i}")
            assert await asyncio.wait_for(ws.recv(), 5) == f"n{i}"
    assert eager[0] >= 5  # sent by the Flusher, not by a woken writer task
    assert timed.seen == ["websocket:/ws/news"] * 5


@pytest.mark.parametrize("ws_impl", WS_IMPLS)
async def test_the_server_transport_is_found_under_every_ws_impl(ws_impl: str) -> None:
    """transport/asgi.py's one reach into a server's internals (to abort a socket whose close
    hangs): the protocol object behind an ASGI ``send``, through FastAPI's middleware and a
    user's own ``send``-wrapping middleware, has a ``transport`` with ``abort()``. One check
    per uvicorn WebSocket implementation: if a release moves it, this fails, not production."""
    from starlette.routing import WebSocketRoute

    from tidings.transport.asgi import server_transport

    class Probe:  # an ASGI app, as tidings' endpoints are (not a function taking a WebSocket)
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            transport = server_transport(send)
            found = "none" if transport is None else type(transport).__name__
            await send({"type": "websocket.send", "text": found})
            await send({"type": "websocket.close", "code": 1000})

    def wrapping(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            async def wrapped(message: Message) -> None:
                await send(message)

            await app(scope, receive, wrapped)

        return middleware

    app = FastAPI()
    app.router.routes.append(WebSocketRoute("/probe", Probe()))
    app.add_middleware(wrapping)  # type: ignore[arg-type]
    async with served(app, ws=ws_impl) as (port, _):
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/probe")
        try:
            found = await asyncio.wait_for(ws.recv(), 10)
        finally:
            await ws.close()
    assert found != "none"
    assert "Transport" in str(found)  # asyncio's _SelectorSocketTransport or uvloop's TCPTransport
