"""The portable transport: ASGI ``receive``/``send``, so tidings mounts in any ASGI server."""

from __future__ import annotations

from starlette.types import Receive, Send

from ..errors import TOO_BIG, Disconnect
from ..frames import Frame


def _size(data: Frame) -> int:
    return len(data.encode()) if isinstance(data, str) else len(data)


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

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


__all__ = ["AsgiTransport", "Disconnect"]
