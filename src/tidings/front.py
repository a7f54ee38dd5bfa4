"""The front door of `tidings serve`: the hot routes without the framework's per-request cost.

Profiled under load (bench/RESULTS.md), FastAPI's middleware stack and routing take most of a
publish request's CPU, and its coroutine chain is most of an idle WebSocket's memory. Here the
three hot routes go straight to the same handlers the FastAPI app registered (so behaviour,
errors and the API-key check are identical: it is the same code); everything else, lifespan
included, goes to the FastAPI app unchanged. A mounted tidings (your own FastAPI app) is not
affected.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

if TYPE_CHECKING:
    from .connection import CentrifugeEndpoint
    from .endpoints import RawEndpoint

log = logging.getLogger("tidings.front")

Handler = Callable[..., Awaitable[Response]]


def _handler(router: APIRouter, path: str, params: list[str]) -> Handler | None:
    """The endpoint function of ``POST path`` if it takes exactly ``params`` (else None: the
    route changed shape, so it is left to FastAPI)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == path and "POST" in (route.methods or ()):
            if list(inspect.signature(route.endpoint).parameters) == params:
                endpoint: Handler = route.endpoint
                return endpoint
            return None
    return None


class Front:
    """ASGI app for `tidings serve`: ``/ws/{channel}``, ``/connection/websocket``,
    ``POST /api/{method}`` (the server
    API, ``publish`` included) and ``POST /publish/{channel}`` directly; anything else through
    ``app``."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.state = app.state
        tidings = app.state.tidings  # create_app() includes tidings.router at the root
        self.raw: RawEndpoint = tidings.raw_endpoint
        self.centrifuge: CentrifugeEndpoint = tidings.centrifuge_endpoint
        self.server_api = _handler(tidings.router, "/api/{method}", ["method", "request"])
        self.publish_text = _handler(tidings.router, "/publish/{channel}", ["channel", "request"])

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Returns the chosen app's awaitable instead of awaiting it: no frame of ours stays
        suspended under every idle WebSocket (~0.4 KiB each). Serve it with
        ``interface="asgi3"``: uvicorn would guess ASGI2 from a non-async ``__call__``."""
        kind = scope["type"]
        if kind == "lifespan":
            return self.app(scope, receive, send)
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if kind == "websocket":
            channel = path[4:] if path.startswith("/ws/") else ""
            if channel and "/" not in channel:
                scope["path_params"] = {"channel": channel}
                return self.raw(scope, receive, send)
            if path == "/connection/websocket":
                return self.centrifuge(scope, receive, send)
        elif kind == "http" and scope["method"] == "POST":
            handler: Handler | None = None
            args: tuple[Any, ...] = ()
            if path.startswith("/api/") and "/" not in path[5:] and path[5:]:
                handler, args = self.server_api, (path[5:],)
            elif path.startswith("/publish/") and "/" not in path[9:] and path[9:]:
                handler, args = self.publish_text, (path[9:],)
            if handler is not None:  # None: not found on the app, FastAPI answers
                return self._answer(handler, args, scope, receive, send)
        return self.app(scope, receive, send)

    @staticmethod
    async def _answer(
        handler: Handler, args: tuple[Any, ...], scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            response = await handler(*args, Request(scope, receive))
        except Exception:
            log.exception("error in %s %s", scope["method"], scope["path"])
            response = PlainTextResponse("Internal Server Error", status_code=500)
        await response(scope, receive, send)
