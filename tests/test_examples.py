"""The task-notification example app, served for real."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import websockets
from examples import tasks

from .conftest import served


async def test_task_progress_arrives_in_order_even_when_watching_late() -> None:
    async with served(tasks.app) as (port, _):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            started = (await http.post("/tasks", params={"steps": 4, "delay": 0.05})).json()
        await asyncio.sleep(0.12)  # the job is already under way when we start watching
        async with websockets.connect(f"ws://127.0.0.1:{port}{started['watch']}") as ws:
            events = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(5)]
            # Clients may not publish into task channels.
            await ws.send("spoof")
            with contextlib.suppress(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 1008
    assert [e.get("step") for e in events[:4]] == [1, 2, 3, 4]
    assert events[4] == {"task": started["task"], "done": True}
