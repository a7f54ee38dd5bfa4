"""A WebSocket client on a bare socket, for clients that misbehave on purpose.

Real clients (websockets) read and answer pings in the background; these tests need one that
stops reading, never answers pings, or sends what a polite client would not."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


class RawClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = b""

    @classmethod
    async def connect(cls, port: int, path: str, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        client = cls(sock)
        head = b""
        while b"\r\n\r\n" not in head:  # byte by byte: leave any frame after it unread
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))
        return client

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await self.loop.sock_sendall(self.sock, header + mask + masked)

    async def _read(self, n: int, timeout: float) -> bytes:
        while len(self.buffer) < n:
            chunk = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), timeout)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    async def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        """The next frame: (opcode, payload). Raises EOFError when the server hung up."""
        b0, b1 = await self._read(2, timeout)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self._read(2, timeout))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self._read(8, timeout))
        return b0 & 0x0F, await self._read(n, timeout)

    async def close_code(self, timeout: float = 10.0) -> tuple[int, str]:
        """Skip frames until the close frame; its (code, reason)."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return code, payload[2:].decode(errors="replace")

    def close(self) -> None:
        self.sock.close()
