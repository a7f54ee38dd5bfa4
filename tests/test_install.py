"""Mounting tidings inside a user's own FastAPI app that has its own routes and lifespan."""

# no `from __future__ import annotations`: FastAPI must see the local dependency objects

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
import websockets
from fastapi import Depends, FastAPI

from tidings import Hub, HubDep, Tidings, get_hub

from .conftest import Serve
from .test_raw import recv_n


def user_app(tidings: Tidings, events: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # tidings is already running here: the app may publish from its own startup
        events.append(f"startup hub_started={tidings.hub.started}")
        yield
        events.append(f"shutdown hub_started={tidings.hub.started}")

    app = FastAPI(lifespan=lifespan)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.post("/orders/{order_id}")
    async def order(
        order_id: int, hub: Annotated[Hub, Depends(tidings.hub_dependency)]
    ) -> dict[str, Any]:
        position = await hub.publish("orders", {"id": order_id})
        return {"offset": position.offset}

    @app.post("/notes")
    async def note(hub: HubDep) -> dict[str, Any]:
        position = await hub.publish("orders", "note")
        return {"offset": position.offset}

    tidings.install(app, prefix="/rt")
    return app


async def test_installed_app_routes_publish_to_raw_subscribers(serve: Serve) -> None:
    events: list[str] = []
    tidings = Tidings(demo=False)
    srv = await serve(app=user_app(tidings, events))
    assert events == ["startup hub_started=True"]
    ws = await websockets.connect(f"{srv.ws}/rt/ws/orders")
    try:
        for _ in range(500):
            if tidings.hub.subscribers("orders"):
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/hello")).json() == {"hello": "world"}
            assert (await http.post("/orders/7")).json() == {"offset": 1}
            assert (await http.post("/notes")).json() == {"offset": 2}
            api = await http.post("/rt/api/publish", json={"channel": "orders", "data": 3})
            assert api.json()["result"]["offset"] == 3
            assert (await http.get("/rt/health")).json()["status"] == "ok"
            assert (await http.post("/api/publish", json={})).status_code == 404  # prefixed
        assert await recv_n(ws, 3) == ['{"id":7}', "note", "3"]
    finally:
        await ws.close()

    srv.server.should_exit = True
    for _ in range(500):
        if len(events) == 2 and not tidings.hub.started:
            break
        await asyncio.sleep(0.01)
    # the user's shutdown ran while tidings was still up; tidings stopped after it
    assert events == ["startup hub_started=True", "shutdown hub_started=True"]
    assert not tidings.hub.started


def test_install_twice_is_refused() -> None:
    app = FastAPI()
    Tidings().install(app)
    with pytest.raises(RuntimeError, match="already"):
        Tidings().install(app)


async def test_get_hub_without_install_says_so() -> None:
    app = FastAPI()

    @app.get("/x")
    async def x(hub: Annotated[Hub, Depends(get_hub)]) -> None:
        return None

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        try:
            await http.get("/x")
        except RuntimeError as exc:
            assert "install" in str(exc)
        else:
            raise AssertionError("get_hub without a Tidings should fail")
