"""The FastAPI routes of a mounted tidings: the HTTP API, health and metrics.

App glue: each publishing route reads the request with starlette and hands it to
:class:`~tidings.api.HttpApi`, which knows no web framework (`tidings serve`'s own HTTP
protocol calls the same methods). Errors and statuses are described in :mod:`tidings.api`.

Mounted under another server (stock uvicorn), these routes guard themselves with what an ASGI
app can see (:class:`GuardedRoute`): ``max_headers`` / ``max_header_size`` (431, RFC 6585
section 5) and ``body_timeout`` (408, RFC 9110 section 15.5.9) on every HTTP route of the
router; `tidings serve` applies the same settings in its own HTTP protocol (serve/guard.py),
before the head is even complete. README "Production" says what only the server can do.
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

from .api import ReadBody, Reply, error_reply, json_reply
from .config import Settings
from .errors import BadRequest

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


def refused(status: int, message: str) -> Response:
    """A guard's answer: the documented JSON error (code 107), and the connection closed,
    since the rest of the request is not read."""
    response = as_response(error_reply(BadRequest(message), status))
    response.headers["connection"] = "close"
    return response


def head_refused(headers: list[tuple[bytes, bytes]], settings: Settings) -> Response | None:
    """431 if ``headers`` (an ASGI scope's) are more than ``max_headers`` fields or more than
    ``max_header_size`` bytes (names, values, ``": "`` and CRLF counted, as `tidings serve`
    counts them); None if they are within both. RFC 6585 section 5."""
    if len(headers) > settings.max_headers:
        return refused(431, f"more than {settings.max_headers} header fields")
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > settings.max_header_size:
        return refused(431, f"request headers larger than {settings.max_header_size} bytes")
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
            return refused(408, f"request body not received within {body_timeout:g} s")
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
