"""Every private part of uvicorn and websockets that `tidings serve`'s protocols rely on.

`tidings serve` is faster than plain uvicorn because its protocols reach below the libraries'
public interfaces (bench/RESULTS.md). Each such reach is listed here, once, and each has a test
in ``tests/test_internals.py`` that fails if a release changes it; pyproject.toml pins uvicorn
and websockets to the releases those tests cover. The asyncio privates the library's own ASGI
writer uses (``_enter_task``/``_leave_task``) are in :mod:`tidings.eager`, tested there too.

websockets (sans-I/O ``ServerProtocol``, :mod:`.websocket`):

* :func:`frames_only`: after the handshake, the handshake parser (a generator that keeps the
  request alive) is replaced by the frame parser ``Protocol.parse`` over the same buffer.
* :func:`limit_incoming`: the ``max_message_size`` attribute is what ``max_size`` set; changing
  it later changes the limit (an endpoint's own limit applies after the handshake).
* :func:`parser_failed`: ``parser_exc`` is set when the parser failed the connection (oversize,
  bad UTF-8, protocol error) and queued a close frame.
* :func:`deflate_negotiated`: after ``accept``, the ``extensions`` attribute lists what the
  handshake response agreed on (a ``PerMessageDeflate`` whose ``local_no_context_takeover``
  is what a frame compressed once for every connection needs); the frame parser inflates
  with them, and fails 1009 once an inflated message passes ``max_message_size``.
* ``close_sent``/``close_rcvd`` (public attributes) and ``fail(code, reason)``.

uvicorn (its protocol classes' constructor interface, ``Config`` and ``ServerState`` fields):

* a WebSocket protocol class is built as ``cls(config=, server_state=, app_state=)`` by the
  HTTP protocol on an upgrade, and ``shutdown()`` is called on each connection in
  ``server_state.connections`` when the server stops;
* :data:`CONFIG_FIELDS` of ``uvicorn.Config`` and :data:`SERVER_STATE_FIELDS` of
  ``uvicorn.server.ServerState`` that :mod:`.websocket` and :mod:`.http` read;
* :data:`HTTP_PARTS`: what :class:`~.http.FastHttp` uses of ``HttpToolsProtocol`` beyond the
  asyncio protocol interface (it subclasses it); :func:`uvicorn_fits` checks them once at run
  time and `tidings serve` falls back to uvicorn's own path if any is missing;
* ``STATUS_LINE``: httptools_impl's ready-made status lines;
* :data:`INVALID_REQUEST`: the WARNING httptools_impl logs (logger ``uvicorn.error``) for every
  parser error, logged before ``send_400_response`` is called.
"""

from __future__ import annotations

import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.protocol import Protocol as WsProtocol
from websockets.server import ServerProtocol

log = logging.getLogger("tidings.serve")

#: httptools_impl's message (``uvicorn.error``, WARNING) for a parser error
INVALID_REQUEST = "Invalid HTTP request received."

#: ``uvicorn.Config`` attributes read by the protocols
CONFIG_FIELDS = (
    "loaded",
    "load",
    "loaded_app",
    "asgi_version",
    "root_path",
    "ws_max_size",
    "ws_per_message_deflate",
    "ws_ping_interval",
    "ws_ping_timeout",
)

#: ``uvicorn.server.ServerState`` attributes read by the protocols
SERVER_STATE_FIELDS = ("connections", "tasks", "default_headers", "total_requests")

#: what FastHttp uses of uvicorn's HttpToolsProtocol beyond the asyncio protocol interface:
#: attributes (set in ``__init__`` or per request) and the methods it calls or overrides
HTTP_PARTS = (
    "app",
    "cycle",
    "pipeline",
    "tasks",
    "server_state",
    "timeout_keep_alive",
    "timeout_keep_alive_task",
    "root_path",
    "limit_concurrency",
    "access_log",
    "parser",
    "flow",
    "loop",
    "headers",
    "expect_100_continue",
    "_start_asgi_task",
    "_unset_keepalive_if_required",
    "on_message_begin",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
    "timeout_keep_alive_handler",
    "handle_websocket_upgrade",
)

#: set by ``on_message_begin`` for each request (FastHttp sets them itself when it answers)
HTTP_REQUEST_PARTS = ("url", "headers", "expect_100_continue", "scope")

_fits: list[bool] = []


def uvicorn_fits(protocol: HttpToolsProtocol) -> bool:
    """Whether this uvicorn has every part in :data:`HTTP_PARTS` (checked once per process;
    if a release lacks one, the publishing routes take uvicorn's own path, with a warning)."""
    if not _fits:
        missing = [name for name in HTTP_PARTS if not hasattr(protocol, name)]
        if missing:
            log.warning("uvicorn lacks %s: publishing requests take its ASGI path", missing)
        _fits.append(not missing)
    return _fits[0]


def frames_only(conn: ServerProtocol) -> None:
    """Go on with websockets' plain frame parser once the handshake is answered.

    The handshake parser keeps the request (headers and all) alive in its generator frame for
    the connection's life, a large part of an idle connection's memory; ``Protocol.parse``
    reads the same buffer and keeps nothing of the request."""
    conn.parser = WsProtocol.parse(conn)
    next(conn.parser)


def limit_incoming(conn: ServerProtocol, max_size: int | None) -> None:
    """Fail the connection with 1009 on an incoming message over ``max_size`` bytes."""
    conn.max_message_size = max_size


def deflate_negotiated(conn: ServerProtocol) -> bool:
    """The handshake agreed on permessage-deflate *without server context takeover*: the
    client inflates every message on its own, so one compressed frame fits every such
    connection. (With context takeover the compressed frames tidings builds would be wrong.)"""
    return any(
        isinstance(ext, PerMessageDeflate) and ext.local_no_context_takeover
        for ext in conn.extensions
    )


def parser_failed(conn: ServerProtocol) -> bool:
    """websockets failed the connection while parsing (it queued the close frame)."""
    return conn.parser_exc is not None


__all__ = [
    "CONFIG_FIELDS",
    "HTTP_PARTS",
    "HTTP_REQUEST_PARTS",
    "INVALID_REQUEST",
    "SERVER_STATE_FIELDS",
    "STATUS_LINE",
    "HttpToolsProtocol",
    "ServerProtocol",
    "deflate_negotiated",
    "frames_only",
    "limit_incoming",
    "parser_failed",
    "uvicorn_fits",
]
