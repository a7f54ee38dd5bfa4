"""The front door of `tidings serve`: the hot routes without the framework's per-request cost.

Profiled under load (bench/RESULTS.md), FastAPI's middleware stack and routing take most of a
publish request's CPU, and its coroutine chain is most of an idle WebSocket's memory. Here the
hot routes go straight to the code the FastAPI routes call (the WebSocket endpoints, and
:class:`~tidings.api.HttpApi` for publishing), so behaviour, errors and the API-key check are
identical: it is the same code. Everything else, lifespan included, goes to the FastAPI app
unchanged. Under `tidings run` (serve/mounted.py) a Front stands before the user's app, with
the ``prefix`` its tidings routes were included under.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..api import Headers, ReadBody, Reply
from ..router import read_limited

if TYPE_CHECKING:
    from ..api import HttpApi
    from ..app import Tidings
    from ..connection import CentrifugeEndpoint
    from ..endpoints import RawEndpoint
    from ..streaming import StreamingEndpoints

log = logging.getLogger("tidings.front")

#: an HttpApi method with its path argument bound
Answer = Callable[[Headers, ReadBody], Coroutine[Any, Any, Reply]]

#: request paths whose route Front remembers (then it starts over)
MAX_TARGETS = 4096
#: longest path remembered, in bytes: longer ones are routed each time (no hot route is long)
MAX_REMEMBERED = 256

INTERNAL_ERROR = (500, b"Internal Server Error", b"text/plain; charset=utf-8")


class Front:
    """ASGI app for `tidings serve`: ``/ws/{channel}``, ``/connection/websocket``, the
    streaming transports (:mod:`tidings.streaming`), ``POST /api/{method}`` (the server API,
    ``publish`` included) and ``POST /publish/{channel}`` directly; anything else through
    ``app``.

    ``tidings`` defaults to ``app.state.tidings`` (create_app() includes its router at the
    root); ``prefix`` (``"/rt"``, no trailing slash) is where the app included its router."""

    def __init__(self, app: FastAPI, tidings: Tidings | None = None, prefix: str = "") -> None:
        self.app = app
        self.state = app.state
        if tidings is None:
            tidings = app.state.tidings
        assert tidings is not None
        self.prefix = prefix.rstrip("/")
        self.raw: RawEndpoint = tidings.raw_endpoint
        self.centrifuge: CentrifugeEndpoint = tidings.centrifuge_endpoint
        self.http: HttpApi = tidings.http
        self.streaming: StreamingEndpoints = tidings.streaming
        self._targets: dict[bytes, Answer | None] = {}

    def route(self, path: str) -> Answer | None:
        """The answer of ``POST path`` if it is one of the hot routes (shared with
        serve/http.py, which serves them without an ASGI cycle)."""
        if self.prefix:
            if not path.startswith(self.prefix):
                return None
            path = path[len(self.prefix) :]
        if path.startswith("/api/"):
            method = path[5:]
            if method and "/" not in method:
                return functools.partial(self.http.server_api, method)
        elif path.startswith("/publish/"):
            channel = path[9:]
            if channel and "/" not in channel:
                return functools.partial(self.http.publish_text, channel)
        return None

    def route_target(self, target: bytes) -> Answer | None:
        """:meth:`route` for a raw request target (path and query), remembered by path:
        publishers post to the same few URLs again and again. Only paths are kept, and only
        short ones, so unique queries or long paths cannot grow the memory (the query never
        changes the route). %-escaped paths are left to the ASGI path, which unquotes them."""
        path = target.partition(b"?")[0]
        try:
            return self._targets[path]
        except KeyError:
            pass
        answer = None
        if path[:1] == b"/" and b"%" not in path:
            answer = self.route(path.decode("latin-1"))
        if len(path) <= MAX_REMEMBERED:
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[path] = answer
        return answer

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Returns the chosen app's awaitable instead of awaiting it: no frame of ours stays
        suspended under every idle WebSocket (memory per connection). Serve it with
        ``interface="asgi3"``: uvicorn would guess ASGI2 from a non-async ``__call__``."""
        kind = scope["type"]
        if kind == "lifespan":
            return self.app(scope, receive, send)
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if kind == "websocket":
            if self.prefix:
                if not path.startswith(self.prefix):
                    return self.app(scope, receive, send)
                path = path[len(self.prefix) :]
            channel = path[4:] if path.startswith("/ws/") else ""
            if channel and "/" not in channel:
                scope["path_params"] = {"channel": channel}
                return self.raw(scope, receive, send)
            if path == "/connection/websocket":
                return self.centrifuge(scope, receive, send)
            if path == "/connection/uni_websocket":
                return self.streaming.uni_websocket(scope, receive, send)
        elif kind == "http":
            stream = None
            if not self.prefix:
                stream = self.streaming.paths.get(path)
            elif path.startswith(self.prefix):
                stream = self.streaming.paths.get(path[len(self.prefix) :])
            if stream is not None:  # http_stream, sse, /emulation, uni_*: streamed responses
                return stream(scope, receive, send)
            if scope["method"] == "POST":
                answer = self.route(path)
                if answer is not None:
                    return self._answer(answer, scope, receive, send)
        return self.app(scope, receive, send)

    async def _answer(self, answer: Answer, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        content_type = b"application/json"
        try:
            status, body = await answer(request.headers, lambda n: read_limited(request, n))
            await self.http.flushed()
        except Exception:
            log.exception("error in %s %s", scope["method"], scope["path"])
            status, body, content_type = INTERNAL_ERROR
        headers = [(b"content-length", b"%d" % len(body)), (b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
