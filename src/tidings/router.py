"""The FastAPI routes of a mounted tidings: the HTTP API, health and metrics.

App glue: each publishing route reads the request with starlette and hands it to
:class:`~tidings.api.HttpApi`, which knows no web framework (`tidings serve`'s own HTTP
protocol calls the same methods). Errors and statuses are described in :mod:`tidings.api`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from .api import ReadBody, Reply, json_reply

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


async def read_limited(request: Request, limit: int) -> bytes | None:
    """The body, never buffering more than ``limit`` bytes: None past it.

    Raises :class:`ClientGone` if the client disconnects before the body is complete: one
    INFO line is logged (method, path without the query, bytes read), not starlette's
    ``ClientDisconnect`` traceback, since a client that goes away is not a server fault."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except ClientDisconnect:
        log.info(
            "%s %s: the client disconnected after %d bytes of the body",
            request.method,
            request.url.path,  # never the query: it may hold a token
            size,
        )
        raise ClientGone from None
    return b"".join(chunks)


def body_reader(request: Request) -> ReadBody:
    """``await read(limit)`` over ``request``'s body (:func:`read_limited`)."""
    return functools.partial(read_limited, request)


def build_router(tidings: Tidings) -> APIRouter:
    router = APIRouter()
    hub = tidings.hub
    http = tidings.http

    reader = body_reader

    async def answered(reply: Awaitable[Reply]) -> Response:
        """The reply, sent once this iteration's publications are flushed (HttpApi.flushed)."""
        try:
            done = await reply
        except ClientGone:  # logged; nobody is there to read an answer
            return Response(status_code=400)
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
