"""A Redis restarted without persistence while subscribers are open (issue 10, section 1):
the new epoch reaches every subscriber as a fact, and the first publish after the restart is
answered (a stale pooled connection is retried once, safely). A private redis-server: the test
kills it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import websockets

from . import redis_servers
from .conftest import IN_CI, Serve, free_port
from .test_fast import wait_for


@pytest.fixture
def private_redis() -> Iterator[tuple[redis_servers.Servers, int]]:
    if not redis_servers.available():
        message = "redis-server / redis-cli not installed"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    servers, port = redis_servers.Servers(), free_port()
    servers.start(port)
    try:
        yield servers, port
    finally:
        servers.stop()


async def test_a_redis_restart_closes_raw_subscribers_3010_and_publishes_go_on(
    serve: Serve, private_redis: tuple[redis_servers.Servers, int]
) -> None:
    servers, port = private_redis
    srv = await serve(broker_url=f"redis://127.0.0.1:{port}/0")
    async with websockets.connect(f"{srv.ws}/ws/room") as ws, httpx.AsyncClient() as http:
        await wait_for(lambda: srv.hub.subscribers("room") == 1)
        first = await http.post(f"{srv.url}/api/publish", json={"channel": "room", "data": 1})
        assert first.json()["result"]["offset"] == 1
        assert await asyncio.wait_for(ws.recv(), 10) == "1"
        servers.kill(port)
        servers.start(port)  # empty: the stream starts again, a new epoch
        answers = []
        for i in (2, 3, 4):  # the first goes over a pooled connection the restart made stale
            r = await http.post(f"{srv.url}/api/publish", json={"channel": "room", "data": i})
            answers.append(r.json()["result"])
        assert [a["offset"] for a in answers] == [1, 2, 3]
        assert answers[0]["epoch"] != first.json()["result"]["epoch"]
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:  # never 2, 3, 4 spliced after 1 as if the stream went on
                assert await asyncio.wait_for(ws.recv(), 30) not in ("2", "3", "4")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010
    assert srv.hub.metrics.gaps_lost >= 1
    async with websockets.connect(f"{srv.ws}/ws/room") as again:  # a reload gets the new stream
        await wait_for(lambda: srv.hub.subscribers("room") == 1)
        await srv.hub.publish("room", 5)
        assert await asyncio.wait_for(again.recv(), 10) == "5"
