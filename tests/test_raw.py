"""The seed patterns over real sockets: raw WebSocket per channel, HTTP publish."""

from __future__ import annotations

import asyncio

import httpx
import websockets

from .conftest import Serve


async def recv_n(ws: websockets.ClientConnection, n: int, wait: float = 5.0) -> list[str]:
    out = []
    for _ in range(n):
        msg = await asyncio.wait_for(ws.recv(), wait)
        out.append(msg if isinstance(msg, str) else msg.decode())
    return out


async def test_http_publish_reaches_three_subscribers_in_order(serve: Serve) -> None:
    srv = await serve()
    subs = [await websockets.connect(f"{srv.ws}/ws/news") for _ in range(3)]
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            offsets = []
            for i in range(50):
                r = await http.post("/api/publish", json={"channel": "news", "data": f"m{i}"})
                assert r.status_code == 200
                offsets.append(r.json()["result"]["offset"])
        assert offsets == list(range(1, 51))
        for ws in subs:
            assert await recv_n(ws, 50) == [f"m{i}" for i in range(50)]
    finally:
        for ws in subs:
            await ws.close()
