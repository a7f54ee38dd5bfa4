"""FastWebSocket's connection state, without a socket: each event moves it through its table,
``writable`` and ``sink`` follow, and an illegal transition fails loudly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from tidings.serve.websocket import FastWebSocket
from tidings.state import IllegalTransition, State

HANDSHAKE = (
    b"GET /ws/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Sock(asyncio.Transport):
    """An asyncio transport that records writes and closes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def connected(app: Any) -> tuple[FastWebSocket, Sock, list[State]]:
    config = uvicorn.Config(app=app, interface="asgi3", ws_ping_interval=None)
    config.load()
    ws = FastWebSocket(config=config, server_state=ServerState(), app_state={})
    sock = Sock()
    ws.connection_made(sock)
    seen: list[State] = []
    ws.on_sink = lambda: seen.append(ws.state)
    ws.data_received(HANDSHAKE)
    return ws, sock, seen


async def until(condition: Any, iterations: int = 100) -> None:
    """Let the loop run until ``condition()`` holds (no I/O here: a few iterations do)."""
    for _ in range(iterations):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def accepting(scope: Any, receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    await receive()  # until the client goes


async def test_the_state_follows_the_connections_life() -> None:
    ws, sock, seen = await connected(accepting)
    assert ws.state is State.CONNECTING and not ws.writable and ws.sink is None
    await until(lambda: ws.state is not State.CONNECTING)  # the app accepts
    assert ws.state is State.OPEN and ws.writable and ws.sink is sock
    assert sock.written[0].startswith(b"HTTP/1.1 101")
    ws.pause_writing()
    assert ws.state is State.PAUSED and not ws.writable and ws.sink is None
    ws.write_frames(["while paused"])  # finish() may still write what is left
    ws.resume_writing()
    assert ws.state is State.OPEN and ws.sink is sock
    ws.finish(["last"], 3000, "bye", 1.0)
    assert ws.state is State.CLOSING and ws.sink is None
    before = len(sock.written)
    ws.write_frames(["after the close"])  # nothing follows a close frame
    ws.pause_writing()  # flow control no longer changes the state
    assert len(sock.written) == before and ws.state is State.CLOSING
    ws.connection_lost(None)
    assert ws.state is State.CLOSED
    assert seen == [State.OPEN, State.PAUSED, State.OPEN, State.CLOSING, State.CLOSED]
    await asyncio.sleep(0)


async def test_a_refused_handshake_goes_from_connecting_to_closing() -> None:
    async def refusing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.close"})

    ws, sock, seen = await connected(refusing)
    await until(lambda: ws.state is not State.CONNECTING)
    assert ws.state is State.CLOSING and sock.written[0].startswith(b"HTTP/1.1 403")
    assert seen == [State.CLOSING]
    ws.connection_lost(None)


async def test_an_illegal_transition_fails_loudly() -> None:
    ws, _, _ = await connected(accepting)
    await until(lambda: ws.state is State.OPEN)
    ws.connection_lost(None)
    with pytest.raises(IllegalTransition, match="CLOSED -> OPEN"):
        ws._to(State.OPEN)
    await asyncio.sleep(0)
