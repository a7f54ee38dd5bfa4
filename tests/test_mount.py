"""The README's "mount it in your FastAPI app" example, served for real."""

from __future__ import annotations

import asyncio

import httpx
import websockets
from fastapi import FastAPI

from tidings import Tidings

from .conftest import served


async def test_readme_mount_example() -> None:
    tidings = Tidings(broker_url="memory://")
    app = FastAPI(lifespan=tidings.lifespan)
    app.include_router(tidings.router)

    @app.post("/orders")
    async def create_order(order: dict[str, object]) -> dict[str, object]:
        await tidings.hub.publish("orders", order)
        return {"ok": True}

    async with (
        served(app) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/ws/orders") as ws,
        httpx.AsyncClient() as http,
    ):
        r = await http.post(f"http://127.0.0.1:{port}/orders", json={"id": 7})
        assert r.json() == {"ok": True}
        assert await asyncio.wait_for(ws.recv(), 5) == '{"id":7}'
