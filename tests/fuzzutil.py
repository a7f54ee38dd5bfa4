"""Helpers for the fuzz tests and ``bench/fuzz_atheris.py``: a server in a thread of its own
(so a synchronous fuzzer can drive it), a blocking raw WebSocket client that can send any
bytes (invalid UTF-8 in a text frame too), and the judge of an exchange: the documented
replies and close codes only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import orjson

from tidings.app import create_app
from tidings.config import Settings
from tidings.serve.front import Front
from tidings.serve.server import server_options

#: close codes a Centrifugo-protocol client may be sent for what it sends (README, "Client
#: protocol"): 1007 invalid UTF-8, 1008 policy, 1009 too big, 3500 invalid token, 3501 bad
#: request, 3502 stale, 3504 connection limit, 3008 slow, 3508 send without handler
CLOSE_CODES = frozenset({1000, 1007, 1008, 1009, 3500, 3501, 3502, 3504, 3008, 3508})
#: error codes of replies (Centrifugo's): never 100, "internal server error"
ERROR_CODES = frozenset({101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112})

SENTINEL = 4_242_424


#: stock uvicorn's own line (with a traceback) for invalid UTF-8 in a text frame: the mounted
#: path's WebSocket protocol is uvicorn's, not tidings' (README "Production"); `tidings serve`
#: closes 1007 without it
UVICORN_OWN = frozenset({("uvicorn.error", "Invalid UTF-8 sequence received from client.")})


class Recorder(logging.Handler):
    """Keeps log records that are errors or carry a traceback (but :data:`UVICORN_OWN`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (record.name, record.getMessage()) in UVICORN_OWN:
            return
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(record)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    recorder = Recorder()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn"), logging.getLogger("tidings")]
    for logger in loggers:
        logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)


class ThreadServer:
    """A tidings server on a free loopback port, run by its own event loop in a thread."""

    def __init__(self, fast: bool, **settings: Any) -> None:
        self.fast = fast
        self.settings = Settings(**settings)
        self.port = 0
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        if not self.ready.wait(30) or self.error is not None:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        import uvicorn

        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        app = create_app(self.settings)
        options: dict[str, Any] = {
            "ws_max_size": self.settings.max_message_size,
            "ws_ping_interval": self.settings.ping_interval,
            "ws_ping_timeout": self.settings.pong_timeout,
        }
        asgi: Any = app
        if self.fast:
            asgi = Front(app)
            options = server_options(self.settings)
            options.pop("loop")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(asgi, log_level="warning", **{"lifespan": "on", **options})
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        self.ready.set()
        await self.stop.wait()
        server.should_exit = True
        await asyncio.wait_for(task, 10)


class RawSync:
    """A blocking WebSocket client that sends whatever frames it is given."""

    def __init__(self, port: int, path: str = "/connection/websocket", timeout: float = 20) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.decode(errors="replace"))

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        with contextlib.suppress(OSError):  # the server may have closed already
            self.sock.sendall(head + mask + masked)

    def _exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes] | None:
        """(opcode, payload) of the server's next frame; None once the socket is closed."""
        head = self._exactly(2)
        if head is None:
            return None
        n = head[1] & 0x7F
        if n == 126:
            ext = self._exactly(2)
            if ext is None:
                return None
            n = struct.unpack("!H", ext)[0]
        elif n == 127:
            ext = self._exactly(8)
            if ext is None:
                return None
            n = struct.unpack("!Q", ext)[0]
        payload = self._exactly(n)
        if payload is None:
            return None
        return head[0] & 0x0F, payload

    def close(self) -> None:
        self.sock.close()


def exchange(
    port: int, frames: list[tuple[int, bytes]], errors: dict[int, int] | None = None
) -> str:
    """Send ``frames`` on a new Centrifugo connection, then a sentinel command; read until its
    reply or the close. The outcome: ``"replied"`` or ``"close NNNN"``. AssertionError for
    anything undocumented (error 100, close 1011, a close without a close frame, a reply
    that is not JSON)."""
    if errors is None:
        errors = {}
    client = RawSync(port)
    try:
        for opcode, payload in frames:
            client.send(opcode, payload)
        client.send(0x1, b'{"id":%d,"rpc":{"method":"fuzz-sentinel"}}' % SENTINEL)
        while True:
            got = client.frame()
            assert got is not None, "the connection ended without a close frame"
            opcode, payload = got
            if opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                assert code in CLOSE_CODES, f"undocumented close {code} {payload[2:]!r}"
                reason = payload[2:].decode(errors="replace")[:40]
                return f"close {code} {reason}".strip()
            if opcode == 0x9:  # a server ping: answer it
                client.send(0xA, payload)
                continue
            assert opcode == 0x1, f"opcode {opcode}"
            for line in payload.split(b"\n"):
                item = orjson.loads(line)
                error = item.get("error")
                if error is not None:
                    assert error["code"] in ERROR_CODES, f"undocumented error {error}"
                    if item.get("id") != SENTINEL:
                        errors[error["code"]] = errors.get(error["code"], 0) + 1
                if item.get("id") == SENTINEL:
                    return "replied"  # errors: the error codes seen meanwhile
    finally:
        client.close()


__all__ = ["CLOSE_CODES", "ERROR_CODES", "RawSync", "Recorder", "ThreadServer", "exchange"]
