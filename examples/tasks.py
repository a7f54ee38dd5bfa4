"""Task notifications: start a slow job over HTTP, watch its progress live over WebSocket.

The classic hand-rolled ``ConnectionManager`` app, on tidings: progress survives a reconnect
(``?since=`` replays what the channel kept), works with several uvicorn workers once a shared
broker is configured (``TIDINGS_BROKER_URL=redis://...``), and a slow browser cannot stall it.

    uvicorn examples.tasks:app
    curl -X POST 'localhost:8000/tasks?steps=5'          # -> {"task": "...", "watch": "/ws/..."}
    tidings subscribe 'tasks:<id>' --since 0              # every step, even watching late
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import FastAPI, Query

from tidings import Tidings

tidings = Tidings(
    namespaces={"tasks": {"history_size": 100, "history_ttl": 3600, "allow_publish": False}}
)
app = FastAPI(title="tasks", lifespan=tidings.lifespan)
app.include_router(tidings.router)
running: set[asyncio.Task[None]] = set()


async def work(task_id: str, steps: int, delay: float) -> None:
    channel = f"tasks:{task_id}"
    for step in range(1, steps + 1):
        await asyncio.sleep(delay)  # the real work would go here
        await tidings.hub.publish(channel, {"task": task_id, "step": step, "of": steps})
    await tidings.hub.publish(channel, {"task": task_id, "done": True})


@app.post("/tasks")
async def start_task(
    steps: int = Query(5, ge=1, le=1000), delay: float = Query(0.5, ge=0, le=60)
) -> dict[str, Any]:
    task_id = uuid.uuid4().hex[:12]
    job = asyncio.get_running_loop().create_task(work(task_id, steps, delay))
    running.add(job)
    job.add_done_callback(running.discard)
    return {"task": task_id, "channel": f"tasks:{task_id}", "watch": f"/ws/tasks:{task_id}?since=0"}
