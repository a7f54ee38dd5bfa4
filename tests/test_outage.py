"""A broker outage is a clear, retryable error everywhere, never a 500 or a traceback."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from tidings import Settings, create_app
from tidings.brokers.base import BrokerUnavailable, ClientInfo, HistoryOptions, StreamPosition
from tidings.brokers.memory import MemoryBroker

from .conftest import Serve


class FlakyBroker(MemoryBroker):
    """The in-memory engine with a switch that makes it unreachable."""

    down = False

    def _check(self) -> None:
        if self.down:
            raise BrokerUnavailable("broker unreachable (test)")

    async def ping(self) -> None:
        self._check()

    async def subscribe(self, channel: str) -> None:
        self._check()
        await super().subscribe(channel)

    async def publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        self._check()
        return await super().publish(channel, data, history, info=info, tags=tags)


async def test_outage_answers_retryable_errors_and_recovers(serve: Serve) -> None:
    app = create_app(Settings())
    broker = FlakyBroker()
    app.state.tidings.broker = app.state.tidings.hub.broker = broker
    srv = await serve(app=app)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        broker.down = True
        r = await http.post("/api/publish", json={"channel": "news", "data": 1})
        assert r.status_code == 200
        assert r.json()["error"]["code"] == 100
        assert "unreachable" in r.json()["error"]["message"]
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["broker"]["ok"] is False
        async with websockets.connect(f"{srv.ws}/ws/news") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert not srv.hub.sessions

        broker.down = False
        async with websockets.connect(f"{srv.ws}/ws/news") as ws:
            r = await http.post("/api/publish", json={"channel": "news", "data": "back"})
            assert r.json()["result"]["offset"] == 1
            assert await asyncio.wait_for(ws.recv(), 5) == "back"
        assert (await http.get("/health")).status_code == 200
