"""Slow, partial and oversized requests on `tidings serve`'s HTTP path (and WebSocket handshake).

uvicorn closes a connection that stays idle between requests (``timeout_keep_alive``), but
a request that has *started* is waited for forever: a client sending one header byte a second,
or a partial body, holds its socket (and a slot of ``max_connections`` for a WebSocket) as long
as it likes ("slowloris"). httptools also takes headers of any size and number, and a single
64 MiB header is buffered whole, stalling every other client while it is copied.

:class:`GuardedHttp` wraps :class:`~.http.FastHttp` (it is the outermost class, so every
parser callback passes through it whichever path the request then takes) and adds, per
connection:

* a **header timeout** (``header_timeout`` seconds): from the connection's opening, or from
  the first byte of a following keep-alive request, until the request's head (request line
  and headers) is complete. A connection that sent part of a head gets ``408 Request Timeout``;
  one that sent nothing is closed without a word (as an idle keep-alive connection is).
* a **body timeout** (``body_timeout`` seconds): from the end of the head until the end of the
  body, for the whole body (a slow drip of a few bytes a second does not renew it). 408 if no
  response has started, then the connection closes.
* **header limits**: ``max_header_size`` bytes of head (request line included, counted as the
  bytes arrive, before the parser buffers them) and ``max_headers`` header fields. Over either:
  ``431 Request Header Fields Too Large`` and the connection closes. RFC 6585 section 5.

Every refusal has the body a mounted tidings answers with (:mod:`tidings.router`, built by the
same functions of :mod:`tidings.api`): ``{"error": {"code": 107, "message": "..."}}``
(``application/json``), the message naming the limit (``request head not received within 10
s``, ``request body not received within 30 s``, ``more than 100 header fields``, ``request
headers larger than 65536 bytes``), and ``connection: close``.

A WebSocket handshake is an HTTP request parsed here first, so the same timeouts and limits
apply to it; once upgraded, the WebSocket protocol's own heartbeats take over. Nothing here
applies to an app mounted under stock uvicorn (README "Production" says what uvicorn offers).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from ..api import (
    Reply,
    body_timed_out,
    head_timed_out,
    headers_too_large,
    too_many_headers,
)
from ..config import Settings
from .http import FastHttp, closing_answer, refusal_answered, refusal_begins

log = logging.getLogger("tidings.http")

_IDLE, _HEAD, _BODY, _DONE = 0, 1, 2, 3

#: seconds a refused connection is read (and dropped) after the answer, before it is closed
LINGER = 2.0


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the status is on the protocol."""


class GuardedHttp(FastHttp):
    """FastHttp with header and body timeouts and header limits (see the module docstring).

    The limits are class attributes: :func:`guarded` makes a subclass carrying a node's
    settings, as uvicorn builds protocols from a class."""

    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 30.0
    max_header_size: ClassVar[int] = 65_536
    max_headers: ClassVar[int] = 100

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = _IDLE
        self.head_bytes = 0
        self.header_count = 0
        self.header_size = 0
        self.refused: Reply | None = None  # the answer a parser callback refused with
        self.deadline: asyncio.TimerHandle | None = None

    # -- timers ------------------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.phase == _IDLE and self.head_bytes == 0:
            transport.close()  # nothing asked: nothing to answer
            return
        cycle = self.cycle
        if cycle is not None and getattr(cycle, "response_started", False):
            transport.close()  # the app answers already: cut it short, do not interleave
            return
        if self.phase == _BODY:
            self._answer(body_timed_out(self.body_timeout))
        else:
            self._answer(head_timed_out(self.header_timeout))

    def _answer(self, reply: Reply) -> None:
        """Write a final answer (status and JSON body) and close: the request is not read any
        further."""
        self._disarm()
        self.phase = _DONE
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(closing_answer(reply, self.server_state.default_headers))
        flush = getattr(transport, "flush", None)  # a Cork holds writes until the loop turns
        if flush is not None:
            flush()
        if transport.can_write_eof():
            # a lingering close: closing with unread bytes from the client (the rest of its
            # head or body) makes the kernel reset the connection, and the client may lose
            # the answer; end our side, read and drop what still comes for LINGER seconds
            transport.write_eof()
            self.deadline = self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.phase == _BODY and self.answer is not None:
            # a request FastHttp answers itself: the same one line as the ASGI routes log
            # (router.read_limited), never the query
            log.info(
                "POST %s: the client disconnected after %d bytes of the body",
                self.url.partition(b"?")[0].decode("latin-1"),
                self.size,
            )
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase == _DONE:
            return  # refused: the answer is out and the connection closing
        if self.phase == _IDLE:
            self.phase = _HEAD
            self.head_bytes = 0
            if self.deadline is None:  # after a keep-alive spell: the head's clock starts now
                self._arm(self.header_timeout)
        if self.phase == _HEAD:
            # counted as they arrive: the parser would buffer a huge header whole (a chunk
            # is bounded by the socket's read size, so it holds at most one past the limit)
            self.head_bytes += len(data)
        super().data_received(data)
        if self.phase == _HEAD and self.head_bytes > self.max_header_size:
            # the head is still incomplete past the limit
            self._answer(headers_too_large(self.max_header_size))

    def send_400_response(self, msg: str) -> None:
        refusal_answered()
        if self.refused is not None:  # our callback stopped the parser, not a bad request
            self._answer(self.refused)
            return
        super().send_400_response(msg)

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.phase = _HEAD
        # bytes before this point in the chunk were earlier requests (pipelined): from here
        # on_header measures this head, and later chunks are counted whole in data_received
        self.head_bytes = 0
        self.header_count = 0
        self.header_size = 0
        if self.deadline is None:  # pipelined: the next head starts inside the same chunk
            self._arm(self.header_timeout)
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        # a head that arrived whole in one chunk is measured here: names, values, ": ", CRLF
        self.header_count += 1
        self.header_size += len(name) + len(value) + 4
        if self.header_count > self.max_headers:
            self.refused = too_many_headers(self.max_headers)
            refusal_begins()
            raise _Refused
        if self.header_size > self.max_header_size:
            self.refused = headers_too_large(self.max_header_size)
            refusal_begins()
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        self.phase = _IDLE
        self.head_bytes = 0
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol's heartbeats take over
        self.phase = _DONE
        super().handle_websocket_upgrade()


def guarded(settings: Settings) -> type[GuardedHttp]:
    """:class:`GuardedHttp` with ``settings``' timeouts (seconds) and header limits."""
    return type(
        "GuardedHttp",
        (GuardedHttp,),
        {
            "header_timeout": settings.header_timeout,
            "body_timeout": settings.body_timeout,
            "max_header_size": settings.max_header_size,
            "max_headers": settings.max_headers,
        },
    )


__all__ = ["GuardedHttp", "guarded"]
