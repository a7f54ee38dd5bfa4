"""A bare WebSocket client over a raw socket: sees the exact bytes the server writes, and can
stop reading (a slow client) or ignore pings, which well-behaved client libraries never do."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class RawWs:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()  # every byte received after the handshake

    @classmethod
    async def connect(cls, port: int, path: str, *, rcvbuf: int | None = None) -> RawWs:
        sock = socket.socket()
        if rcvbuf is not None:  # before connect, so the TCP window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        limit = 2**16 if rcvbuf is None else rcvbuf
        reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; its bytes are appended to ``raw``."""
        head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        ext = b""
        if n == 126:
            ext = await self.reader.readexactly(2)
            n = struct.unpack("!H", ext)[0]
        elif n == 127:
            ext = await self.reader.readexactly(8)
            n = struct.unpack("!Q", ext)[0]
        payload = await self.reader.readexactly(n)
        self.raw += head + ext + payload
        return head[0] & 0x0F, payload

    async def frames(self, count: int, seconds: float = 10.0) -> list[tuple[int, bytes]]:
        async with asyncio.timeout(seconds):
            return [await self.frame() for _ in range(count)]

    def send(self, opcode: int, payload: bytes) -> None:
        """A masked client frame."""
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)

    async def closed(self, seconds: float = 10.0) -> tuple[int, str]:
        """Skip frames until the server's close frame: its (code, reason)."""
        async with asyncio.timeout(seconds):
            while True:
                opcode, payload = await self.frame()
                if opcode == 0x8:
                    return close_code(payload), payload[2:].decode(errors="replace")

    def close(self) -> None:
        self.writer.close()


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0]) if len(payload) >= 2 else 1005
