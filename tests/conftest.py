"""Shared fixtures: a real tidings server under uvicorn on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from tidings import Settings, create_app
from tidings.app import Tidings
from tidings.cli import server_options
from tidings.front import Front

IN_CI = os.environ.get("CI", "").lower() == "true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    """A server started by the ``serve`` fixture."""

    tidings: Tidings
    server: uvicorn.Server
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def hub(self) -> Any:
        return self.tidings.hub


Serve = Callable[..., Awaitable[Running]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(**settings)`` starts a server in this test's loop; stopped at teardown.

    ``fast=True`` serves it as `tidings serve` does (tidings' own WebSocket protocol); the
    default is uvicorn's plain WebSocket protocol, the path of an app mounted elsewhere."""
    started: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(
        settings: Settings | None = None, *, fast: bool = False, **overrides: Any
    ) -> Running:
        if settings is None:
            settings = Settings(**overrides)
        app = create_app(settings)
        asgi: Any = Front(app) if fast else app
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        options = server_options(settings)
        if not fast:
            options["ws"] = "websockets-sansio"
        # the test's own loop runs the server: uvicorn's "loop" setting would not apply
        options.pop("loop")
        config = uvicorn.Config(asgi, log_level="warning", **options)
        server = uvicorn.Server(config)
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        started.append((server, task))
        for _ in range(500):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("server did not start")
        return Running(app.state.tidings, server, port)

    yield start
    for server, _ in started:
        server.should_exit = True
    for _, task in started:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)
