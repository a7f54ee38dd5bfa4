"""The portable transport: ASGI ``receive``/``send``, so tidings mounts in any ASGI server."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from starlette.types import Receive, Send

from ..errors import TOO_BIG, Disconnect
from ..frames import Frame


def _size(data: Frame) -> int:
    return len(data.encode()) if isinstance(data, str) else len(data)


class _Abortable(Protocol):
    def abort(self) -> None: ...


def _transport_of(owner: object) -> _Abortable | None:
    transport = getattr(owner, "transport", None)  # asyncio's or uvloop's transports
    return transport if callable(getattr(transport, "abort", None)) else None


def server_transport(send: Send, depth: int = 6) -> _Abortable | None:
    """The asyncio transport under an ASGI ``send``, or None: the ``transport`` of the protocol
    object ``send`` is a method of (uvicorn's WebSocket protocols), looked for through the
    closures middleware wrap ``send`` in (Starlette's exception handling does), then of the
    protocol whose method runs the current task (the ASGI application's task). Duck typing
    over servers' internals, used for one thing only: aborting a socket whose close hangs.
    ``tests/test_asgi_writer.py::test_the_server_transport_is_found_under_every_ws_impl``
    checks it under each of uvicorn's WebSocket implementations (the pin in pyproject.toml),
    behind FastAPI's middleware and a ``send``-wrapping one; under another server it may find
    nothing, and a hung close then waits for the server's own timeout."""
    seen: set[int] = set()
    todo: list[tuple[Any, int]] = [(send, 0)]
    while todo:
        fn, level = todo.pop()
        if id(fn) in seen or level > depth:
            continue
        seen.add(id(fn))
        found = _transport_of(getattr(fn, "__self__", None))
        if found is not None:
            return found
        for cell in getattr(fn, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    todo.append((cell.cell_contents, level + 1))
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    return _transport_of(frame.f_locals.get("self")) if frame is not None else None


class AsgiTransport:
    """One WebSocket over ASGI messages. Incoming messages over ``max_size`` close it (1009)."""

    __slots__ = ("_receive", "_send", "closed", "max_size")

    #: frames are payloads (``str`` text, ``bytes`` binary), not pre-built WebSocket frames
    framed = False

    def __init__(self, receive: Receive, send: Send, max_size: int) -> None:
        self._receive = receive
        self._send = send
        self.max_size = max_size
        self.closed = False

    async def accept(self, subprotocol: str | None = None) -> None:
        await self._send({"type": "websocket.accept", "subprotocol": subprotocol})

    async def receive(self) -> Frame | None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                data: Frame = text if text is not None else message.get("bytes") or b""
                if len(data) > self.max_size // 4 and _size(data) > self.max_size:
                    raise TOO_BIG()
                return data
            if kind == "websocket.disconnect":
                self.closed = True
                return None

    async def send(self, frames: list[Frame]) -> None:
        send = self._send
        for frame in frames:
            if isinstance(frame, str):
                await send({"type": "websocket.send", "text": frame})
            else:
                await send({"type": "websocket.send", "bytes": frame})

    def abort(self) -> None:
        """Drop the TCP connection now, unsent data and all: a close that did not finish within
        ``close_timeout`` (a peer that stopped reading never takes the close frame, and the
        server would hold its socket for good). ASGI has no such message: this finds the
        server's asyncio transport (:func:`server_transport`); when it cannot, it does nothing
        and the server's own close timeout applies."""
        transport = server_transport(self._send)
        if transport is not None:
            transport.abort()

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


__all__ = ["AsgiTransport", "Disconnect"]
