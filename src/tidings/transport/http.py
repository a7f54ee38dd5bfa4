"""uvicorn's httptools protocol with corked writes: one ``write`` per response, not two.

uvicorn writes a response's head and its body in two ``transport.write`` calls, two syscalls;
profiled under publish load (bench/RESULTS.md) they were half of the server's CPU per request.
Here writes made during one event-loop iteration are joined and leave in one call at the end of
it (as several pipelined responses do). A WebSocket upgrade gets the real transport, so the
fast WebSocket path writes directly. Used by `tidings serve` when httptools is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class Cork:
    """Transport proxy: writes are joined and leave once per loop iteration."""

    __slots__ = ("chunks", "loop", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.chunks: list[bytes] = []
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self.chunks:
            self.loop.call_soon(self.flush)
        self.chunks.append(data)

    def flush(self) -> None:
        chunks = self.chunks
        if chunks:
            self.chunks = []
            if not self.transport.is_closing():
                self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class CorkedHttpTools(HttpToolsProtocol):
    """`tidings serve`'s HTTP protocol: uvicorn's, writing once per response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Cork(transport))  # type: ignore[arg-type]

    def handle_websocket_upgrade(self) -> None:
        cork = self.transport
        if isinstance(cork, Cork):
            cork.flush()
            self.transport = cork.transport
        super().handle_websocket_upgrade()
