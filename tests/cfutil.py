"""Helpers for Centrifugo-protocol tests: a raw JSON client and token minting."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import orjson
import websockets

SECRET = "test-secret-that-is-long-enough-for-hs256"
#: the ttl of a token a test lets lapse. ``exp`` is whole seconds (RFC 7519 NumericDate, minted
#: as ``int(now + ttl)``): a ttl=1 token expires 0-1 s after it is minted, possibly before a
#: loaded server reads it (error 109 instead of the test's close); a ttl=2 one lives 1-2 s, and
#: the server still tells ttl 1 (whole seconds left, at least 1) and closes the client 1 s
#: after it accepted the token (credentials.py)
LAPSING = 2


def token(sub: str = "alice", ttl: float | None = 3600, secret: str = SECRET, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, **claims}
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    return jwt.encode(payload, secret, algorithm="HS256")


class Raw:
    """A Centrifugo JSON client on a plain WebSocket: sends commands, sorts replies/pushes."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.replies: dict[int, dict[str, Any]] = {}
        self.pushes: list[dict[str, Any]] = []
        self.frames: list[list[dict[str, Any]]] = []
        self.pings = 0
        self.answer_pings = True
        self._next = 0

    @classmethod
    async def open(cls, url: str) -> Raw:
        return cls(await websockets.connect(f"{url}/connection/websocket"))

    async def send(self, *commands: dict[str, Any]) -> list[int]:
        ids = []
        lines = []
        for command in commands:
            if "id" not in command and "send" not in command and command:
                self._next += 1
                command = {"id": self._next, **command}
            ids.append(command.get("id", 0))
            lines.append(orjson.dumps(command).decode())
        await self.ws.send("\n".join(lines))
        return ids

    async def read_frame(self, wait: float = 5.0) -> list[dict[str, Any]]:
        frame = await asyncio.wait_for(self.ws.recv(), wait)
        assert isinstance(frame, str), "Centrifugo JSON frames are text"
        items = [orjson.loads(line) for line in frame.split("\n")]
        self.frames.append(items)
        for item in items:
            if not item:
                self.pings += 1
                if self.answer_pings:
                    await self.ws.send("{}")
            elif "id" in item:
                self.replies[item["id"]] = item
            else:
                self.pushes.append(item)
        return items

    async def reply(self, cid: int, wait: float = 5.0) -> dict[str, Any]:
        while cid not in self.replies:
            await self.read_frame(wait)
        return self.replies.pop(cid)

    async def call(self, command: str, /, **request: Any) -> dict[str, Any]:
        (cid,) = await self.send({command: request})
        return await self.reply(cid)

    async def connect(self, **request: Any) -> dict[str, Any]:
        answer = await self.call("connect", **request)
        assert "connect" in answer, answer
        return answer["connect"]

    async def subscribe(self, channel: str, **request: Any) -> dict[str, Any]:
        answer = await self.call("subscribe", channel=channel, **request)
        assert "subscribe" in answer, answer
        return answer["subscribe"]

    async def publications(self, channel: str, n: int, wait: float = 5.0) -> list[Any]:
        """The next ``n`` publications pushed in ``channel`` (pub objects), in order."""
        while True:
            pubs = [
                p["push"]["pub"]
                for p in self.pushes
                if p["push"].get("channel") == channel and "pub" in p["push"]
            ]
            if len(pubs) >= n:
                return pubs[:n]
            await self.read_frame(wait)

    async def closed(self, wait: float = 5.0) -> tuple[int, str]:
        """Read until the server closes; the close code and reason."""
        try:
            while True:
                await self.read_frame(wait)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None, "closed without a close frame from the server"
            return exc.rcvd.code, exc.rcvd.reason

    async def close(self) -> None:
        await self.ws.close()
