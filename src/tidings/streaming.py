"""Centrifugo's other transports: bidirectional emulation over HTTP streaming and SSE, and the
unidirectional transports for clients without an SDK.

Endpoints (ASGI apps; :class:`~tidings.app.Tidings` routes them, and so does `tidings serve`'s
front door). Wire formats follow Centrifuge's handlers (``handler_http_stream.go``,
``handler_sse.go``, ``emulation.go``) and Centrifugo's ``uni_*`` handlers:

- ``POST /connection/http_stream``: the body is the client's first frame (its ``connect``
  command, JSON); the response streams replies and pushes, one JSON object per line.
- ``GET /connection/sse?cf_connect=<first frame>`` (or ``POST`` with it as the body): the same,
  as Server-Sent Events, one ``data:`` event per message.
- ``POST /emulation``: ``{"session": ..., "node": ..., "data": "<frame>"}``: commands for an
  emulated session (the ``session`` and ``node`` its connect reply gave). The node that holds the
  session runs them; any other node forwards them to it through the broker
  (:class:`~tidings.control.Emulation`). Answers 204, or 400 (malformed), 404 (no such session
  on this node), 413 (over ``max_message_size``), 429 (the session has too many frames waiting),
  503 (the broker cannot forward it).
- ``POST /connection/uni_http_stream`` (body: a connect *request*, e.g. ``{"token": "..."}``),
  ``GET /connection/uni_sse?cf_connect=<request>`` (or ``POST``), and the WebSocket
  ``/connection/uni_websocket`` (``?cf_connect=`` or the first message): pushes only. The first
  message is ``{"connect": {...}}``, then ``{"channel": "news", "pub": {...}}`` per publication
  (pushes without the ``{"push": ...}`` wrapper), ``{}`` pings that need no answer, and on a
  stream, ``{"disconnect": {"code": ..., "reason": ...}}`` last.

Every session is a :class:`~tidings.session.Session` run by the Centrifugo
:class:`~tidings.connection.Client` with this node's encoders: the same commands, limits,
heartbeats (pings ``{}``; emulated clients answer through ``/emulation``), slow-client close
and encode-once fan-out as ``/connection/websocket``. A stream has no close frame, so a session
that ends tells the client why with a disconnect push (code and reason as a WebSocket close
would carry them), as Centrifuge does on these transports.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from .auth import scope_origin_allowed
from .control import Emulation
from .delivery import takes_frames
from .endpoints import admit, log_closed, log_refused, refuse_origin
from .errors import (
    SHUTDOWN,
    BadRequest,
    Disconnect,
    TidingsError,
    TokenExpired,
    Unavailable,
)
from .frames import Frame
from .protocol import centrifuge as wire
from .session import Session
from .transport import open_transport
from .transport.stream import EVENTS, LINES, Framing, StreamTransport

if TYPE_CHECKING:
    from .app import Tidings
    from .config import Settings
    from .connection import Client

log = logging.getLogger("tidings.streaming")

#: Centrifuge's query parameter for the first frame / connect request of a GET stream
CONNECT_PARAM = "cf_connect"

#: what a preflight request is told (Centrifuge's handlers answer the same)
PREFLIGHT = [
    (b"access-control-max-age", b"300"),
    (b"access-control-allow-methods", b"POST, OPTIONS"),
]


def _bidi_disconnect(code: int, reason: str) -> Frame:
    return wire.push("", "disconnect", {"code": code, "reason": reason})


def _uni_disconnect(code: int, reason: str) -> Frame:
    return wire.uni_push_bytes("", "disconnect", {"code": code, "reason": reason}).decode()


HTTP_STREAM = LINES.with_disconnect(_bidi_disconnect)
SSE = EVENTS.with_disconnect(_bidi_disconnect)
UNI_HTTP_STREAM = LINES.with_disconnect(_uni_disconnect)
UNI_SSE = EVENTS.with_disconnect(_uni_disconnect)


async def respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A plain answer with no body."""
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": b""})


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, never buffering more than ``limit`` bytes: None past it."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_origin(settings: Settings, scope: Scope) -> bool:
    """Whether the request's ``Origin`` may open a connection or post commands here: the same
    rule as the WebSocket endpoints (:func:`~.auth.scope_origin_allowed`: ``allowed_origins``,
    else same-origin outside dev mode; requests without ``Origin`` pass)."""
    return scope_origin_allowed(settings, scope)


def _connect_refusal(exc: TidingsError) -> Disconnect:
    """The disconnect a refused unidirectional connect gets (it has no reply to carry an error
    code): an expired token 3005, anything else a bad request (3501)."""
    if isinstance(exc, TokenExpired):
        return Disconnect(3005, "token expired")
    if isinstance(exc, Unavailable):
        return Disconnect(3004, "internal server error")
    return Disconnect(3501, f"bad request: {exc.message}"[:123])


class _App:
    """An ASGI app bound to one handler (a bound method would be taken by Starlette for a
    request/response function)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return self.handler(scope, receive, send)


class StreamingEndpoints:
    """The HTTP streaming, SSE, emulation and unidirectional endpoints of one node.

    ``paths``: path -> ASGI app for the HTTP ones; ``uni_websocket``: the WebSocket one. The
    emulated sessions of this node are kept by session id (a random UUID: whoever knows it may
    send commands as that connection, so it is only ever told to the connection itself)."""

    def __init__(self, tidings: Tidings) -> None:
        self.tidings = tidings
        #: the Centrifugo endpoint's encoders: a publication is encoded once for WebSocket and
        #: streaming subscribers alike
        self.encoders: wire.CentrifugeEncoders = tidings.centrifuge_endpoint.encoders
        self.sessions: dict[str, Session] = {}
        #: every session on a stream of this node (emulated and unidirectional)
        self.streams: set[Session] = set()
        self.http_stream = _App(self._http_stream)
        self.sse = _App(self._sse)
        self.emulation = _App(self._emulation)
        self.uni_http_stream = _App(self._uni_http_stream)
        self.uni_sse = _App(self._uni_sse)
        self.uni_websocket = _App(self._uni_websocket)
        self.paths: dict[str, _App] = {
            "/connection/http_stream": self.http_stream,
            "/connection/sse": self.sse,
            "/emulation": self.emulation,
            "/connection/uni_http_stream": self.uni_http_stream,
            "/connection/uni_sse": self.uni_sse,
        }
        tidings.hub.on_emulation = self._on_emulation

    # -- reading the first frame -----------------------------------------------------------------

    async def _first(self, scope: Scope, receive: Receive, send: Send, get: bool) -> bytes | None:
        """The first frame (or connect request): from ``?cf_connect=`` on GET (if ``get``), else
        the POST body. Answers preflights and errors itself and returns None then."""
        method = scope["method"]
        if method == "OPTIONS":
            await respond(send, 204, PREFLIGHT)
            return None
        if not check_origin(self.tidings.settings, scope):
            log_refused(scope["path"], 403, "origin not allowed", log)
            await respond(send, 403)
            return None
        limit = self.tidings.settings.max_message_size
        if method == "GET" and get:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given: str = query.get(CONNECT_PARAM, [""])[0]
            if not given:
                await respond(send, 400)
                return None
            data = given.encode()
            if len(data) > limit:
                await respond(send, 413)
                return None
            return data
        if method != "POST":
            allow = b"GET, POST, OPTIONS" if get else b"POST, OPTIONS"
            await respond(send, 405, [(b"allow", allow)])
            return None
        body = await read_body(receive, limit)
        if body is None:
            await respond(send, 413)
            return None
        return body

    # -- bidirectional emulation -----------------------------------------------------------------

    async def _http_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._emulated(scope, receive, send, HTTP_STREAM, get=False)

    async def _sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._emulated(scope, receive, send, SSE, get=True)

    async def _emulated(
        self, scope: Scope, receive: Receive, send: Send, framing: Framing, get: bool
    ) -> None:
        first = await self._first(scope, receive, send, get)
        if first is None:
            return
        try:
            frame = first.decode()
        except UnicodeDecodeError:
            await respond(send, 400)
            return
        path = scope["path"]
        transport = StreamTransport(receive, send, framing)
        session = await self._open(transport, uni=False)
        if session is None:
            return
        sid = str(uuid.uuid4())
        client = self._client(session, path, {"session": sid})
        self.sessions[sid] = session
        transport.deliver(frame)  # the reader handles it first: the connect command
        try:
            await session.serve(client.handle)
        finally:
            del self.sessions[sid]
            await self._finish(path, session, client, transport)

    async def _emulation(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method == "OPTIONS":
            await respond(send, 204, PREFLIGHT)
            return
        if method != "POST":
            await respond(send, 405, [(b"allow", b"POST, OPTIONS")])
            return
        if not check_origin(self.tidings.settings, scope):
            await respond(send, 403)
            return
        # room for the envelope around a frame of up to max_message_size bytes
        body = await read_body(receive, 2 * self.tidings.settings.max_message_size + 1024)
        if body is None:
            await respond(send, 413)
            return
        try:
            request = orjson.loads(body)
            sid, node, data = request["session"], request["node"], request["data"]
            if not (isinstance(sid, str) and isinstance(node, str) and isinstance(data, str)):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            await respond(send, 400)
            return
        if len(data.encode()) > self.tidings.settings.max_message_size:
            await respond(send, 413)
            return
        hub = self.tidings.hub
        if not node or node == hub.node_id:
            await respond(send, self._deliver(sid, data))
            return
        try:
            await hub.send_control(Emulation(node=node, session=sid, data=data))
        except Exception:
            log.warning("could not forward emulation commands to node %s", node, exc_info=True)
            await respond(send, 503)
            return
        await respond(send, 204)

    def _deliver(self, sid: str, data: str) -> int:
        """Hand ``data`` to this node's session ``sid``: the HTTP status that says how it went."""
        session = self.sessions.get(sid)
        if session is None:
            return 404
        transport = session.transport
        assert isinstance(transport, StreamTransport)
        return 204 if transport.deliver(data) else 429

    def _on_emulation(self, message: Emulation) -> None:
        """Commands another node forwarded to one of this node's sessions."""
        if self._deliver(message.session, message.data) != 204:
            log.debug("emulation commands for session %s dropped", message.session)

    # -- unidirectional --------------------------------------------------------------------------

    async def _uni_http_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._uni_stream(scope, receive, send, UNI_HTTP_STREAM, get=False)

    async def _uni_sse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._uni_stream(scope, receive, send, UNI_SSE, get=True)

    async def _uni_stream(
        self, scope: Scope, receive: Receive, send: Send, framing: Framing, get: bool
    ) -> None:
        first = await self._first(scope, receive, send, get)
        if first is None:
            return
        try:
            request = _connect_request(first)
        except BadRequest:
            await respond(send, 400)
            return
        path = scope["path"]
        transport = StreamTransport(receive, send, framing)
        session = await self._open(transport, uni=True)
        if session is None:
            return
        client = self._client(session, path, {"session": str(uuid.uuid4()), "pong": False})
        try:
            await self._uni_serve(session, client, request)
        finally:
            await self._finish(path, session, client, transport)

    async def _uni_websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.tidings.settings
        if not check_origin(settings, scope):  # before the upgrade: HTTP 403
            await refuse_origin(scope["path"], receive, send)
            return
        transport = open_transport(
            scope, receive, send, settings.max_message_size, settings.close_timeout
        )
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get(CONNECT_PARAM, [""])[0]
        await transport.accept()
        fmt = self.encoders.wire_format(takes_frames(transport), uni=True)
        session = Session(self.tidings.hub, transport, fmt, pong_timeout=settings.pong_timeout)
        if not await admit(session):
            return
        path = scope["path"]
        client = self._client(session, path, {"session": str(uuid.uuid4()), "pong": False})
        try:
            raw: Frame | None = given
            if not raw:  # the first message is the connect request
                try:
                    async with asyncio.timeout(settings.connect_timeout):
                        raw = await transport.receive()
                except TimeoutError:
                    raw = None
            try:
                if raw is None:
                    raise BadRequest("no connect request")
                request = _connect_request(raw.encode() if isinstance(raw, str) else raw)
            except BadRequest as exc:
                session.close(Disconnect(3501, f"bad request: {exc.message}"))
                await session.serve(_ignore)
                return
            await self._uni_serve(session, client, request)
        finally:
            await client.close()
            if client.connected:
                log_closed(path, session, log)

    async def _uni_serve(self, session: Session, client: Client, request: dict[str, Any]) -> None:
        """Connect with ``request``, push the result, then stream until either side ends."""
        activations: dict[str, int] = {}
        try:
            result = await client.connect(request, activations)
        except Disconnect as reason:
            session.close(reason)
        except TidingsError as exc:
            session.close(_connect_refusal(exc))
        else:
            session.enqueue(wire.uni_push_bytes("", "connect", result).decode())
            client.subs.activate(activations)
        await session.serve(_ignore)

    # -- shared ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every stream now with a disconnect push (3001 shutdown). A server that stops
        waits for its responses to finish, and a stream has no close frame it could send on
        its own (as it does for a WebSocket): `tidings serve` calls this when it stops."""
        for session in list(self.streams):
            session.close(SHUTDOWN())

    async def _open(self, transport: StreamTransport, uni: bool) -> Session | None:
        hub, settings = self.tidings.hub, self.tidings.settings
        await transport.accept()
        fmt = self.encoders.wire_format(False, uni=uni)
        session = Session(hub, transport, fmt, pong_timeout=settings.pong_timeout)
        if not await admit(session):
            await transport.end()
            return None
        self.streams.add(session)
        return session

    def _client(self, session: Session, path: str, extra: dict[str, Any]) -> Client:
        from .connection import Client  # the connection module imports this one's neighbours

        client = Client(self.tidings, session, path)
        client.extra = extra
        return client

    async def _finish(
        self, path: str, session: Session, client: Client, transport: StreamTransport
    ) -> None:
        self.streams.discard(session)
        try:
            await client.close()
        finally:
            await transport.end()
            if client.connected:
                log_closed(path, session, log)
            elif session.closed_with is not None:
                log_refused(path, session.closed_with.code, session.closed_with.reason, log)


async def _ignore(session: Session, message: Frame) -> None:
    """What a unidirectional client sends after connecting is read and dropped (Centrifugo
    does the same): reading it is how the server learns the client left."""


def _connect_request(data: bytes) -> dict[str, Any]:
    """A connect request (JSON object; empty or ``null``: ``{}``); BadRequest otherwise."""
    if not data.strip():
        return {}
    try:
        request = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadRequest("the connect request is not JSON") from None
    if request is None:
        return {}
    if not isinstance(request, dict):
        raise BadRequest("the connect request must be a JSON object")
    return request


__all__ = ["CONNECT_PARAM", "StreamingEndpoints", "check_origin"]
