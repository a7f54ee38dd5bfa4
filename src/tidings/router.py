"""The FastAPI routes of a mounted tidings: the HTTP API, health and metrics.

App glue: each publishing route reads the request with starlette and hands it to
:class:`~tidings.api.HttpApi`, which knows no web framework (`tidings serve`'s own HTTP
protocol calls the same methods). Errors and statuses are described in :mod:`tidings.api`.

Mounted under another server (stock uvicorn), these routes guard themselves with what an ASGI
app can see (:class:`GuardedRoute`): ``max_headers`` / ``max_header_size`` (431, RFC 6585
section 5) and ``body_timeout`` (408, RFC 9110 section 15.5.9) on every HTTP route of the
router, and :class:`GuardedApp` does the same for its plain ASGI endpoints (the streaming
transports; the WebSocket handshakes get the 431). The answers are :mod:`tidings.api`'s, the
same bytes as `tidings serve`'s own HTTP protocol sends (serve/guard.py), which applies the
same settings before the head is even complete. README "Production" says what only the
server can do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api import (
    ReadBody,
    Reply,
    body_timed_out,
    headers_too_large,
    json_reply,
    too_many_headers,
)
from .config import Settings

if TYPE_CHECKING:
    from .app import Tidings


def as_response(reply: Reply) -> Response:
    status, body = reply
    return Response(body, status_code=status, media_type="application/json")


def json_response(body: Any, status: int = 200) -> Response:
    return as_response(json_reply(body, status))


log = logging.getLogger("tidings.http")


class ClientGone(Exception):
    """The client closed its connection before the request body was complete."""


class BodyTimeout(Exception):
    """The request body was not complete within ``body_timeout`` seconds."""


async def read_limited(request: Request, limit: int, timeout: float | None = None) -> bytes | None:
    """The body, never buffering more than ``limit`` bytes: None past it.

    ``timeout`` (seconds, None: none) bounds the wait for the whole body, from this call on:
    a body dripping a few bytes at a time does not renew it.

    Raises :class:`ClientGone` if the client disconnects before the body is complete: one
    INFO line is logged (method, path without the query, bytes read), not starlette's
    ``ClientDisconnect`` traceback, since a client that goes away is not a server fault.
    Raises :class:`BodyTimeout` past ``timeout``, logged the same way."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
    except TimeoutError:
        log.info(
            "%s %s: the body was not complete within %g s (%d bytes): 408",
            request.method,
            request.url.path,  # never the query: it may hold a token
            timeout,
            size,
        )
        raise BodyTimeout from None
    except ClientDisconnect:
        log.info(
            "%s %s: the client disconnected after %d bytes of the body",
            request.method,
            request.url.path,  # never the query: it may hold a token
            size,
        )
        raise ClientGone from None
    return b"".join(chunks)


def body_reader(request: Request, timeout: float | None = None) -> ReadBody:
    """``await read(limit)`` over ``request``'s body (:func:`read_limited`), the whole body
    within ``timeout`` seconds (None: no bound)."""
    return functools.partial(read_limited, request, timeout=timeout)


def refused(reply: Reply) -> Response:
    """A guard's answer (one of :mod:`tidings.api`'s: the documented JSON error, code 107, as
    `tidings serve` answers), and the connection closed, since the rest of the request is not
    read."""
    response = as_response(reply)
    response.headers["connection"] = "close"
    return response


def head_refused(headers: list[tuple[bytes, bytes]], settings: Settings) -> Response | None:
    """431 if ``headers`` (an ASGI scope's) are more than ``max_headers`` fields or more than
    ``max_header_size`` bytes (names, values, ``": "`` and CRLF counted, as `tidings serve`
    counts them); None if they are within both. RFC 6585 section 5."""
    if len(headers) > settings.max_headers:
        return refused(too_many_headers(settings.max_headers))
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > settings.max_header_size:
        return refused(headers_too_large(settings.max_header_size))
    return None


class GuardedRoute(APIRoute):
    """An API route that refuses a request whose headers are past ``max_headers`` or
    ``max_header_size`` (431, before the endpoint runs). Its ``settings`` are a class
    attribute (:func:`guarded_route` makes the class), so that FastAPI versions that copy
    included routes (``route_class_override=type(route)``) keep the guard."""

    settings: ClassVar[Settings]

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        settings = self.settings

        async def guarded(request: Request) -> Response:
            refusal = head_refused(request.scope["headers"], settings)
            if refusal is not None:
                log.info("%s %s: headers refused (431)", request.method, request.url.path)
                return refusal
            return await handler(request)

        return guarded


def guarded_route(settings: Settings) -> type[GuardedRoute]:
    """:class:`GuardedRoute` with ``settings``' header limits."""
    return type("GuardedRoute", (GuardedRoute,), {"settings": settings})


#: the ASGI extension that lets a WebSocket app answer its handshake with an HTTP response
#: (the WebSocket Denial Response; uvicorn's websockets, websockets-sansio and wsproto have it)
DENIAL = "websocket.http.response"


class GuardedApp:
    """A plain ASGI endpoint of ``Tidings.router`` (the streaming transports and the WebSocket
    endpoints, :mod:`tidings.streaming`, :mod:`tidings.endpoints`) behind the guards of
    :class:`GuardedRoute`, for a tidings mounted under another server:

    * headers past ``max_headers`` / ``max_header_size``: 431 before the endpoint runs (the
      body of :func:`refused`). A WebSocket handshake gets it as an HTTP response before the
      upgrade where the server offers the Denial Response extension (``websocket.http.response``,
      uvicorn), else it is closed 1008 before accepting, which the server answers HTTP 403.
    * an HTTP request body not complete within ``body_timeout`` seconds of the endpoint being
      called (a drip of bytes does not renew it): 408, the connection closed. Only the reading
      of the body is timed; once it is complete, a stream lasts as long as it likes.

    `tidings serve` and `tidings run` hand these paths to the endpoints themselves
    (serve/front.py), behind their own HTTP protocol's guards (serve/guard.py)."""

    __slots__ = ("app", "settings")

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # returns the endpoint's awaitable for a WebSocket: no frame of ours stays suspended
        # under every idle connection (memory per connection)
        refusal = head_refused(scope["headers"], self.settings)
        if refusal is not None:
            log.info("%s %s: headers refused (431)", scope.get("method", "GET"), scope["path"])
            if scope["type"] == "websocket":
                return _deny(refusal, scope, receive, send)
            return refusal(scope, receive, send)
        if scope["type"] == "http":
            return self._timed(scope, receive, send)
        return self.app(scope, receive, send)

    async def _timed(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.settings.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        read = 0
        complete = False

        async def timed_receive() -> Message:
            nonlocal read, complete
            if complete:  # the body is in: a stream waits for the client's disconnect here
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            read += len(message.get("body", b""))
            return message

        try:
            await self.app(scope, timed_receive, send)
        except BodyTimeout:
            log.info(
                "%s %s: the body was not complete within %g s (%d bytes): 408",
                scope["method"],
                scope["path"],  # never the query: it may hold a token
                timeout,
                read,
            )
            # the endpoints read the body before they answer: no response has started
            await refused(body_timed_out(timeout))(scope, receive, send)


async def _deny(response: Response, scope: Scope, receive: Receive, send: Send) -> None:
    """Refuse a WebSocket handshake with ``response`` (before the upgrade), or close 1008
    where the server cannot send an HTTP response for a WebSocket (it answers 403)."""
    await receive()  # websocket.connect
    if DENIAL in (scope.get("extensions") or {}):
        start = {"type": "websocket.http.response.start", "status": response.status_code}
        await send({**start, "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": ""})


def build_router(tidings: Tidings) -> APIRouter:
    router = APIRouter(route_class=guarded_route(tidings.settings))
    hub = tidings.hub
    http = tidings.http
    body_timeout = tidings.settings.body_timeout

    def reader(request: Request) -> ReadBody:
        return body_reader(request, body_timeout)

    async def answered(reply: Awaitable[Reply]) -> Response:
        """The reply, sent once this iteration's publications are flushed (HttpApi.flushed)."""
        try:
            done = await reply
        except ClientGone:  # logged; nobody is there to read an answer
            return Response(status_code=400)
        except BodyTimeout:  # logged
            return refused(body_timed_out(body_timeout))
        await http.flushed()
        return as_response(done)

    openapi: list[bytes] = []

    @router.get("/api/openapi.json", tags=["api"])
    async def server_api_schema() -> Response:
        """The server API's OpenAPI 3.1 document (:mod:`tidings.openapi`)."""
        if not openapi:
            from . import __version__
            from .openapi import document

            openapi.append(orjson.dumps(document(__version__)))
        return Response(openapi[0], media_type="application/json")

    @router.post("/api/{method}", tags=["api"])
    async def server_api(method: str, request: Request) -> Response:
        """Centrifugo's server API: ``publish``, ``broadcast``, ``history``, ``batch``, ..."""
        return await answered(http.server_api(method, request.headers, reader(request)))

    @router.post("/api", tags=["api"])
    async def legacy_api(request: Request) -> Response:
        """Centrifugo's older single endpoint (cent < 5, gocent < 3): newline-delimited
        ``{"id": n, "method": "publish", "params": {...}}``, one reply line each."""
        return await answered(http.legacy_api(request.headers, reader(request)))

    @router.post("/push", tags=["seed"])
    async def push(request: Request) -> Response:
        """The FastAPI + broadcaster example's shape: ``{"channel": str, "message": str}``."""
        return await answered(http.push(request.headers, reader(request)))

    @router.post("/publish/{channel}", tags=["seed"])
    async def publish_text(channel: str, request: Request) -> Response:
        """The tutorial shape: the request body, as text, is the message."""
        return await answered(http.publish_text(channel, request.headers, reader(request)))

    @router.get("/health", tags=["ops"])
    async def health() -> Response:
        """Liveness plus broker connectivity: 503 when the broker cannot be reached."""
        try:
            await hub.broker.ping()
        except Exception as exc:
            return json_response(
                {"status": "error", "broker": {"ok": False, "error": str(exc)}}, 503
            )
        return json_response(
            {
                "status": "ok",
                "node": hub.node_id,
                "broker": {"ok": True, "engine": type(hub.broker).__name__},
                "connections": len(hub.sessions),
                "channels": len(list(hub.channels)),
            }
        )

    @router.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus exposition of the hub's counters."""
        body, content_type = tidings.metrics_exposition()
        return Response(body, media_type=content_type)

    return router
