"""Nothing lost without being told, over real sockets (issue 10, sections 1 and 2)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets

from .conftest import Serve
from .test_fast import PATHS, wait_for


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("fast", PATHS)
async def test_a_big_batch_does_not_close_a_fast_reader_as_slow(
    serve: Serve, fast: bool, parallel: bool
) -> None:
    """A batch on the memory broker never suspends by itself: the hub lets the writers run,
    so a subscriber reading as fast as it can gets every publication, in order."""
    srv = await serve(outbox_limit=32 * 1024, fast=fast)
    n = 3000  # ~150 KB of publications in one request, against a 32 KiB outbox
    commands = [{"publish": {"channel": "big", "data": f"{i:05d}" + "x" * 40}} for i in range(n)]
    async with websockets.connect(f"{srv.ws}/ws/big") as ws:
        await wait_for(lambda: srv.hub.subscribers("big") == 1)

        async def read() -> list[str]:
            return [str(await asyncio.wait_for(ws.recv(), 10)) for _ in range(n)]

        reader = asyncio.create_task(read())
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{srv.url}/api/batch", json={"commands": commands, "parallel": parallel}
            )
        assert r.status_code == 200
        assert all("publish" in reply for reply in r.json()["replies"])
        got = await reader
    assert got == [f"{i:05d}" + "x" * 40 for i in range(n)]
    assert srv.hub.metrics.slow_clients == 0
