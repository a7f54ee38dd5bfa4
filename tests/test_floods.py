"""Tiny-frame and ping floods on `tidings serve`'s WebSocket protocol (serve/websocket.py):
work per event-loop turn is bounded, fragments per message are bounded, and a client that
pings without reading is aborted with bounded memory. (Stock uvicorn's WebSocket protocols
are uvicorn's: README "Production".)"""

from __future__ import annotations

import asyncio
import os
import struct

import httpx
import pytest
import websockets

from tidings.serve import websocket as fastws

from .conftest import Serve
from .wsraw import RawWs


def masked(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
    mask = os.urandom(4)
    head = struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | len(payload))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_ping_flood_is_parsed_a_bounded_slice_per_turn(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = await serve(fast=True)
    per_entry: list[int] = []
    frame = fastws.FastWebSocket._frame
    entries = {"data_received": fastws.FastWebSocket.data_received}
    entries["_next_turn"] = fastws.FastWebSocket._next_turn
    counted = [0]

    def counting_frame(self: fastws.FastWebSocket, event: object) -> None:
        counted[0] += 1
        frame(self, event)  # type: ignore[arg-type]

    def entry(name: str) -> object:
        original = entries[name]

        def wrapped(self: fastws.FastWebSocket, *args: object) -> None:
            counted[0] = 0
            original(self, *args)  # type: ignore[operator]
            per_entry.append(counted[0])

        return wrapped

    monkeypatch.setattr(fastws.FastWebSocket, "_frame", counting_frame)
    for name in entries:
        monkeypatch.setattr(fastws.FastWebSocket, name, entry(name))
    flooder = await RawWs.connect(srv.port, "/ws/news")
    pings = 200_000
    ping = masked(0x9)
    flooder.writer.write(ping * pings)
    pongs = 0
    async with asyncio.timeout(60):
        while pongs < pings:  # every ping is answered, in the end
            opcode, _ = await flooder.frame()
            pongs += opcode == 0xA
    # one turn never parsed much more than a slice's worth past the budget
    slice_frames = fastws._SLICE // len(ping) + 1
    assert sum(per_entry) >= pings
    assert max(per_entry) <= fastws._FRAMES_PER_TURN + slice_frames
    async with httpx.AsyncClient() as http:  # and the server serves the others
        assert (await http.get(f"{srv.url}/health")).status_code == 200
    flooder.close()


async def test_too_many_fragments_close_1008(serve: Serve) -> None:
    srv = await serve(fast=True)
    ws = await RawWs.connect(srv.port, "/ws/news")
    ws.writer.write(masked(0x1, b"a", fin=False) + masked(0x0, fin=False) * 100_000)
    code, reason = await ws.closed()
    assert (code, reason) == (1008, "too many fragments")
    ws.close()


async def test_fragmented_message_is_reassembled(serve: Serve) -> None:
    srv = await serve(fast=True)
    async with websockets.connect(f"{srv.ws}/ws/news") as listener:
        await asyncio.sleep(0)
        ws = await RawWs.connect(srv.port, "/ws/news")
        parts = [b'"he', b"l", b"", b'lo"']
        ws.writer.write(
            masked(0x1, parts[0], fin=False)
            + b"".join(masked(0x0, p, fin=False) for p in parts[1:-1])
            + masked(0x0, parts[-1])
        )
        assert await asyncio.wait_for(listener.recv(), 10) == '"hello"'
        ws.close()


async def test_a_client_that_pings_and_never_reads_is_aborted(serve: Serve) -> None:
    srv = await serve(fast=True)
    ws = await RawWs.connect(srv.port, "/ws/news", rcvbuf=4096)
    await asyncio.wait_for(_until(lambda: len(srv.hub.sessions) == 1), 10)
    ping = masked(0x9, b"p" * 125)
    batch = ping * 1000  # 131 KB of pings, answered with 127 KB of pongs we never read
    sent = 0
    bound = 64 * 1024 * 1024
    aborted = False
    while sent < bound:
        try:
            ws.writer.write(batch)
            await ws.writer.drain()
        except ConnectionError:
            aborted = True
            break
        sent += len(batch)
        if not srv.hub.sessions:
            aborted = True
            break
    assert aborted, "the server kept answering pings nobody reads"
    await asyncio.wait_for(_until(lambda: not srv.hub.sessions), 10)
    ws.close()


async def _until(predicate: object) -> None:
    while not predicate():  # type: ignore[operator]
        await asyncio.sleep(0.01)
