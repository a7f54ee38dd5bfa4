"""FastWebSocket is a complete uvicorn WebSocket protocol: any ASGI app's routes work on it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.exceptions import InvalidStatus

from tidings.serve.websocket import FastWebSocket


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.websocket("/echo")
    async def echo(ws: WebSocket) -> None:
        offered = ws.scope["subprotocols"]
        await ws.accept(subprotocol=offered[0] if offered else None)
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") == "bye":
                    await ws.close(4001, "asked to")
                    return
                if message.get("text") is not None:
                    await ws.send_text(message["text"].upper())
                else:
                    await ws.send_bytes(message["bytes"][::-1])
        except WebSocketDisconnect:
            return

    @app.websocket("/refuse")
    async def refuse(ws: WebSocket) -> None:
        await ws.close()

    return app


@pytest.fixture
async def port() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(echo_app(), ws=FastWebSocket, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 10)


async def test_plain_asgi_app_echoes_text_and_bytes(port: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo", subprotocols=["chat"]) as ws:
        assert ws.subprotocol == "chat"
        # uvicorn's ws_per_message_deflate (on by default) lets FastWebSocket accept the
        # client's offer, without context takeover; the client's compressed messages (the
        # 100 KB one below) are inflated, the app's replies go uncompressed
        [deflate] = ws.protocol.extensions
        assert deflate.remote_no_context_takeover and deflate.local_no_context_takeover
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "HELLO"
        await ws.send(b"\x01\x02\x03")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x03\x02\x01"
        big = "x" * 100_000  # 64-bit length, fragmented by nothing
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 5) == big.upper()


async def test_plain_asgi_app_closes_with_its_code(port: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await ws.send("bye")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "asked to")


async def test_close_before_accept_is_403(port: int) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{port}/refuse")
    assert refused.value.response.status_code == 403


async def test_fragmented_client_message_is_reassembled(port: int) -> None:
    async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
        await ws.send(iter(["frag", "mented"]))
        assert await asyncio.wait_for(ws.recv(), 5) == "FRAGMENTED"
