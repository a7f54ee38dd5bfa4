"""The fast path of ``tidings serve``: our own WebSocket protocol class for uvicorn.

uvicorn takes it as ``uvicorn.Config(ws=FastWebSocket)``. It speaks plain ASGI to every app, so
any WebSocket route still works, and it adds the scope extension ``"tidings.fast"``: a tidings
endpoint that finds it uses this object itself as its transport
(:func:`tidings.transport.open_transport`) and
skips the ASGI message dicts. That transport writes *synchronously*: the hub's :class:`Flusher`
hands a session's whole outbox to :meth:`FastWebSocket.write_frames`, which makes ONE
``transport.write`` of pre-built frames (the raw endpoint's frames are built once per
publication, so every subscriber gets the same ``bytes``). No writer task, no queue, no dict per
message.

* Handshake and incoming frames: ``websockets``' sans-I/O ``ServerProtocol`` (request checks,
  ``Sec-WebSocket-Accept``, unmasking, fragments, ping -> pong, close handshake, UTF-8 check,
  ``max_size`` -> close 1009).
* Outgoing data frames: :mod:`.frames` (unmasked header + payload).
* permessage-deflate (RFC 7692) is accepted only if uvicorn's ``ws_per_message_deflate`` is on
  (`tidings serve` turns it on when the settings compress some namespace,
  :func:`tidings.protocol.deflate.offered`), and then with ``server_no_context_takeover`` and
  ``client_no_context_takeover``: every message stands alone, so a tidings session writes ONE
  compressed frame per publication, built by the fan-out, to every subscriber that negotiated
  it (``deflate`` is True; :mod:`tidings.protocol.deflate`), and keeps no zlib state while
  idle. websockets' ``PerMessageDeflate`` inflates incoming messages and stops at the message
  size limit (1009). A plain ASGI app's messages go uncompressed (allowed per message).
* Flow control: above the transport's high-water mark uvicorn's event loop calls
  :meth:`pause_writing`; from then on frames stay in the session's bounded outbox (it counts
  them; past ``outbox_limit`` the client is closed 3008) until :meth:`resume_writing`.
* Closing: :meth:`finish` writes what is left and a close frame, then waits ``close_timeout`` for
  the client's close reply and *aborts* the TCP connection if it does not come (a client that
  stops reading never empties the buffer, so a graceful close would wait forever).
* State: one :class:`~tidings.state.State` per connection (CONNECTING, OPEN, PAUSED while
  above the high-water mark, CLOSING once a close frame is out, CLOSED once the TCP connection
  is gone), changed only by :meth:`FastWebSocket._to`, which checks the move against
  :data:`TRANSITIONS` and keeps ``writable`` and ``sink`` in step with it.
* Heartbeats: a WebSocket ping every ``ws_ping_interval`` seconds; no pong within
  ``ws_ping_timeout`` closes the connection 1011, as uvicorn's own protocols do. One
  :class:`~tidings.wheel.Wheel` per server drives every connection (not a timer each): the
  first ping is spread over the interval, each may be late by its resolution (:func:`heartbeat`).
* Floods (issue 11): incoming bytes are parsed in slices of :data:`_SLICE` bytes and at most
  :data:`_FRAMES_PER_TURN` frames per event-loop turn; the rest waits (reading paused) for the
  next turn, so a client sending millions of tiny frames shares the loop with the others
  instead of holding it. A message may have at most :data:`_MAX_FRAGMENTS` fragments (else
  close 1008); fragments are joined once, at the end. Control replies (pongs) written while the
  client does not read (the socket above its high-water mark) are counted: past
  :data:`_UNREAD_LIMIT` bytes the connection is aborted as slow, so a client that pings and
  never reads costs bounded memory.
* Memory: an idle tidings connection keeps no scope, request or headers, no task of its own
  beyond the app's, and no per-connection timer (what that costs: ``python -m
  bench.idle_memory``, bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from starlette.types import Message, Scope
from websockets.exceptions import InvalidState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame as LibFrame
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from ..frames import Frame, WsFrame, binary_bytes, framed, text_bytes
from ..state import State, Table, check
from ..transport import EXTENSION
from ..wheel import Wheel
from . import _internals

log = logging.getLogger("uvicorn.error")

#: seconds a close waits for the client's reply, for plain ASGI apps; a served tidings' own
#: ``close_timeout`` setting otherwise (:func:`close_timeout`)
_CLOSE_TIMEOUT = 10.0

#: bytes handed to the frame parser at once, and frames parsed per event-loop turn (floods)
_SLICE = 16_384
_FRAMES_PER_TURN = 1_000
#: fragments one message may have (close 1008 past it)
_MAX_FRAGMENTS = 4_096
#: bytes of pongs and close replies written while the client does not read (then: aborted)
_UNREAD_LIMIT = 65_536

_GONE: Any = object()  # queued when the connection ended: receive() answers None

CONNECTING, OPEN, PAUSED = State.CONNECTING, State.OPEN, State.PAUSED
CLOSING, CLOSED = State.CLOSING, State.CLOSED

#: the connection's legal transitions (:meth:`FastWebSocket._to`). CONNECTING -> CLOSING: the
#: handshake was refused (the HTTP answer is the last thing written); PAUSED: open, but the
#: socket's buffer is above its high-water mark; CLOSING: our close frame, or our reply to the
#: client's, is out (or the handshake was refused); CLOSED: the TCP connection is gone.
TRANSITIONS: Table = {
    CONNECTING: frozenset({OPEN, CLOSING, CLOSED}),
    OPEN: frozenset({PAUSED, CLOSING, CLOSED}),
    PAUSED: frozenset({OPEN, CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class FastWebSocket(asyncio.Protocol):
    """One WebSocket connection under uvicorn: ASGI for any app, direct writes for tidings."""

    #: the capability tidings' delivery reads (delivery.takes_frames): complete frames, written
    #: synchronously
    framed = True

    __slots__ = (
        "_backlog",
        "_connect_sent",
        "_drain",
        "_frag",
        "_inbox",
        "_waiter",
        "app_state",
        "close_code",
        "close_timeout",
        "close_timer",
        "config",
        "conn",
        "deflate",
        "on_drain",
        "on_gone",
        "on_sink",
        "ping_payload",
        "read_paused",
        "response",
        "scope",
        "server_state",
        "sink",
        "state",
        "transport",
        "unread",
        "wheel_bucket",
        "writable",
    )

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        # websockets' default logger, not uvicorn's: its debug checks stay off in production
        self.conn = ServerProtocol(
            max_size=config.ws_max_size,
            extensions=_DEFLATE if config.ws_per_message_deflate else None,
        )
        #: the client accepted permessage-deflate without context takeover (set at the
        #: handshake): frames compressed once per publication may be written to it
        self.deflate = False
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.scope: dict[str, Any] | None = None
        self.response: Any = None
        #: where the connection is (:data:`TRANSITIONS`); changed only by :meth:`_to`
        self.state = CONNECTING
        self.close_code = 1006
        #: ``state is OPEN``, kept by :meth:`_to` (read once per subscriber per flush)
        self.writable = False
        #: reading is paused while a message waits in the inbox (the app applies backpressure
        #: one message at a time): flow control, independent of the connection's state
        self.read_paused = False
        self.on_drain: Any = None  # a Session's flush, called when the socket drains
        #: the socket's transport while OPEN, else None: frames may go straight to it
        #: (delivery.DirectTransport); kept by :meth:`_to`
        self.sink: Any = None
        self.on_sink: Any = None  # a DirectWriter's resink, called when ``sink`` changes
        self._drain: asyncio.Future[None] | None = None
        self._inbox: list[Any] = []
        self._frag: list[Any] | None = None  # [opcode, [fragments]] of a fragmented message
        self._backlog: bytes | None = None  # received, left for the next turn (floods)
        #: bytes of control replies written since the client stopped reading (PAUSED)
        self.unread = 0
        self._connect_sent = False  # the ASGI app got its "websocket.connect"
        self._waiter: asyncio.Future[None] | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        #: seconds a closing connection may take before it is aborted; a tidings endpoint sets
        #: its ``close_timeout`` setting (tidings.transport.open_transport)
        self.close_timeout = _CLOSE_TIMEOUT
        #: called once the TCP connection is gone (the hub counts a connection until then)
        self.on_gone: Any = None
        self.ping_payload: bytes | None = None  # the ping in flight
        self.wheel_bucket: set[Any] | None = None  # heartbeat(): next ping or pong deadline

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        if self.state is not CLOSED:
            self._to(CLOSED)
        self._cancel_timers()
        self._push(_GONE)
        self._wake_writers()
        self.on_drain = None
        on_gone, self.on_gone = self.on_gone, None
        if on_gone is not None:
            on_gone()
        if self.scope is not None:  # not accepted: break the scope <-> protocol cycle now
            self.scope["extensions"].pop(EXTENSION, None)

    def pause_writing(self) -> None:
        if self.state is OPEN:  # before the handshake or once closing, nothing is written
            self._to(PAUSED)

    def resume_writing(self) -> None:
        self.unread = 0
        if self.state is PAUSED:
            self._to(OPEN)
        self._wake_writers()
        if self.on_drain is not None:
            self.on_drain()

    def data_received(self, data: bytes) -> None:
        if self._backlog is not None:  # a flood is being worked through: keep the order
            self._backlog += data
            self.transport.pause_reading()
            return
        if len(data) <= _SLICE:
            self._parse(data)
        else:
            self._parse_slices(data)

    def _parse_slices(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time; past :data:`_FRAMES_PER_TURN` frames, leave the
        rest for the next event-loop turn (reading paused meanwhile)."""
        frames = 0
        size = len(data)
        start = 0
        while start < size:
            frames += self._parse(data[start : start + _SLICE])
            start += _SLICE
            if self.state is CLOSED or self.transport.is_closing():
                return
            if frames >= _FRAMES_PER_TURN and start < size:
                self._backlog = data[start:]
                self.transport.pause_reading()
                asyncio.get_running_loop().call_soon(self._next_turn)
                return

    def _next_turn(self) -> None:
        data = self._backlog
        self._backlog = None
        if data is None or self.state is CLOSED:
            return
        if not self.read_paused:
            self.transport.resume_reading()
        self._parse_slices(data)

    def _parse(self, data: bytes) -> int:
        """Feed ``data`` to the frame parser and handle what it made; the number of events."""
        conn = self.conn
        conn.receive_data(data)
        events = conn.events_received()
        for event in events:
            if isinstance(event, LibFrame):
                self._frame(event)
            elif isinstance(event, Request):
                self._handshake(event)
        if _internals.parser_failed(conn) or (conn.close_sent is not None and not self._closing()):
            self._parser_failed()
        else:
            out = conn.data_to_send()  # pongs and close replies from websockets
            if out:
                if self.state is PAUSED:  # the client does not read what we write
                    self.unread += sum(map(len, out))
                    if self.unread > _UNREAD_LIMIT:
                        self._abort_unread()
                        return len(events)
                self.transport.write(b"".join(out))
        return len(events)

    def _abort_unread(self) -> None:
        """A client that sends pings (or closes) but never reads the answers: abort."""
        log.info("WebSocket client does not read its pongs: aborted as slow")
        self.close_code = 1006
        self._to(CLOSING)
        self._push(_GONE)
        self.transport.abort()

    def eof_received(self) -> bool | None:
        return None

    def shutdown(self) -> None:
        """uvicorn is stopping: close 1012 (service restart), waiting the served tidings'
        ``close_timeout`` for the reply. Under `tidings serve` its sessions were closed already
        (3001, over ``shutdown_period``: serve/launch.py); this closes what is left."""
        state = self.state
        if state is CONNECTING or state is CLOSING or state is CLOSED:
            if state is CONNECTING:
                self._send_500()
            self._close_transport()
            return
        self._push(_GONE)
        self.close_code = 1012
        self._send_close(1012, "", close_timeout(self.config))

    # -- incoming ----------------------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        subprotocols = _offered(request)
        response = self.conn.accept(request)
        if response.status_code != 101:
            self.conn.send_response(response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._to(CLOSING)  # refused: the HTTP answer was the last write
            self._close_transport()
            return
        self.response = response
        self.deflate = _internals.deflate_negotiated(self.conn)
        # websockets' handshake parser keeps the request (headers and all) alive in its
        # generator frame for the connection's life: go on with the plain frame parser, which
        # reads the same buffer and keeps nothing of the request
        _internals.frames_only(self.conn)
        headers = [(_name(k), v.encode("latin-1")) for k, v in request.headers.raw_items()]
        raw_path, _, query = request.path.partition("?")
        config = self.config
        root = config.root_path
        transport = self.transport
        self.scope = {
            "type": "websocket",
            "asgi": {"version": config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if transport.get_extra_info("sslcontext") else "ws",
            "server": _addr(transport.get_extra_info("sockname")),
            "client": _addr(transport.get_extra_info("peername")),
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": root.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query.encode("ascii"),
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "extensions": {EXTENSION: {"transport": self}},
        }
        # the app's coroutine is the task itself (a wrapper coroutine would stay suspended in
        # every idle connection); _app_done does the wrapper's work
        app = config.loaded_app
        task = asyncio.get_running_loop().create_task(
            app(self.scope, self._asgi_receive, self._asgi_send)
        )
        self.server_state.tasks.add(task)
        task.add_done_callback(self._app_done)

    def _frame(self, frame: LibFrame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            # websockets hands over fragments as they come: reassemble them here
            if opcode is not Opcode.CONT:
                self._frag = [opcode, [frame.data]]
            elif self._frag is not None:
                parts = self._frag[1]
                parts.append(frame.data)
                if len(parts) > _MAX_FRAGMENTS:
                    self._frag = None
                    self.conn.fail(1008, "too many fragments")
                    return  # data_received sees parser_exc unset: handled by _parser_failed
            if not frame.fin or self._frag is None:
                return
            kind, parts = self._frag
            self._frag = None
            data = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
            if self._closing():
                return  # past our close: read on only to see the client's close reply
            message: str | bytes = data
            if kind is Opcode.TEXT:
                try:
                    message = data.decode()
                except UnicodeDecodeError:
                    self.conn.fail(1007, "invalid UTF-8")
                    return  # data_received sees parser_exc unset: handled by _parser_failed
            self._push(message)
            if not self.read_paused:  # one message at a time: the app applies backpressure
                self.read_paused = True
                self.transport.pause_reading()
        elif opcode is Opcode.PONG:
            if self.ping_payload is not None and bytes(frame.data) == self.ping_payload:
                self.ping_payload = None
                self._schedule_ping()
        elif opcode is Opcode.CLOSE:
            rcvd = self.conn.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else 1005
            if self._closing():  # the client answered our close: done
                self.transport.close()
                return
            self._to(CLOSING)  # websockets queued the close reply
            self._push(_GONE)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._close_transport()

    def _parser_failed(self) -> None:
        """Oversize (1009), bad UTF-8 (1007), protocol errors (1002): websockets sent the close."""
        sent = self.conn.close_sent
        self.close_code = sent.code if sent is not None else 1006
        if not self._closing():
            self._to(CLOSING)
        self._push(_GONE)
        out = self.conn.data_to_send()
        if out:
            self.transport.write(b"".join(out))
        self._close_transport()

    def _close_transport(self) -> None:
        """Close the TCP connection once what is buffered is written, and abort it if that has
        not happened within ``close_timeout``: a peer that stopped reading never takes the
        buffer, and a plain close would hold its socket (and its place under
        ``max_connections``) for good."""
        self.transport.close()
        if self.close_timer is None and self.state is not CLOSED:
            loop = asyncio.get_running_loop()
            self.close_timer = loop.call_later(self.close_timeout, self.transport.abort)

    @property
    def socket_open(self) -> bool:
        """The TCP connection is not gone yet (:attr:`on_gone` is called when it is)."""
        return self.state is not CLOSED

    def _push(self, item: Any) -> None:
        if item is _GONE and self._inbox and self._inbox[-1] is _GONE:
            return
        self._inbox.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> Frame | None:
        """The next message from the client; None once it is gone or closing (from then on).

        The tidings session awaits this directly, with no wrapper coroutine: an idle
        connection's await chain is one frame shorter."""
        inbox = self._inbox
        while not inbox:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = inbox[0]
        if item is _GONE:
            return None
        del inbox[0]
        if self.read_paused and not inbox:
            self.read_paused = False
            self.transport.resume_reading()
        return item  # type: ignore[no-any-return]

    # -- outgoing ----------------------------------------------------------------------------

    def _accept(self, subprotocol: str | None, extra: list[tuple[bytes, bytes]]) -> None:
        response = self.response
        self.response = None
        del response.headers["Date"]
        for name, value in [*self.server_state.default_headers, *extra]:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        if subprotocol:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        if not self.transport.is_closing():
            self.conn.send_response(response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self._to(OPEN)
            self._schedule_ping(first=True)
        else:  # the client left meanwhile (connection_lost is due): sends raise OSError
            self._to(CLOSED)
        assert self.scope is not None
        log.info('%s - "WebSocket %s" [accepted]', _who(self.scope), self.scope["path"])
        # the app has the scope; without our reference an idle tidings connection can let it
        # (headers and all) go
        self.scope = None

    def _reject(self, status: int) -> None:
        response = self.conn.reject(status, HTTPStatus(status).phrase)
        self.conn.send_response(response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self._to(CLOSING)
        self._push(_GONE)
        self._close_transport()

    def _send_500(self) -> None:
        if self.state is CONNECTING:
            self._reject(500)

    def _send_close(self, code: int, reason: str, timeout: float) -> None:
        if self._closing():
            return
        self._to(CLOSING)
        try:
            self.conn.send_close(code, reason)
        except InvalidState:
            return
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.read_paused:  # read on, to see the close reply
            self.read_paused = False
            self.transport.resume_reading()
        if self.close_timer is None:
            loop = asyncio.get_running_loop()
            self.close_timer = loop.call_later(timeout, self.transport.abort)

    def _to(self, new: State) -> None:
        """Move to ``new`` (:class:`~tidings.state.IllegalTransition` if :data:`TRANSITIONS`
        does not allow it); ``writable`` and ``sink`` follow, and the session hears of it."""
        check(self, TRANSITIONS, self.state, new)
        self.state = new
        self.writable = open_ = new is OPEN
        self.sink = self.transport if open_ else None
        if self.on_sink is not None:
            self.on_sink()

    def _closing(self) -> bool:
        """A close frame (ours, or our reply) is out, or the connection is gone."""
        state = self.state
        return state is CLOSING or state is CLOSED

    def _wake_writers(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def _drained(self) -> None:
        while self.state is PAUSED:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    # -- heartbeats --------------------------------------------------------------------------

    def _schedule_ping(self, first: bool = False) -> None:
        interval = self.config.ws_ping_interval
        if interval and not self._closing():
            wheel = heartbeat(self.server_state, self.config)
            if first:  # spread: connections accepted together are not pinged together
                wheel.spread(self, interval)
            else:
                wheel.schedule(self, interval)

    def on_tick(self) -> None:
        """The server's heartbeat wheel: a ping is due, or the pong is late."""
        if self._closing():
            return
        if self.ping_payload is not None:
            self._ping_timeout()
            return
        self.ping_payload = os.urandom(4)
        self.conn.send_ping(self.ping_payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        timeout = self.config.ws_ping_timeout
        if timeout:
            heartbeat(self.server_state, self.config).schedule(self, timeout)
        else:
            self.ping_payload = None
            self._schedule_ping()

    def _ping_timeout(self) -> None:
        log.info("WebSocket keepalive ping timeout")
        self.conn.fail(1011, "keepalive ping timeout")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self._to(CLOSING)
        self.close_code = 1011
        self._push(_GONE)
        self._close_transport()

    def _cancel_timers(self) -> None:
        if self.wheel_bucket is not None:
            heartbeat(self.server_state, self.config).cancel(self)
        if self.state is CLOSED and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None

    # -- ASGI --------------------------------------------------------------------------------

    def _app_done(self, task: asyncio.Task[Any]) -> None:
        self.server_state.tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            log.error("Exception in ASGI application\n", exc_info=exc)
            self._send_500()
        elif self.state is CONNECTING:
            log.error("ASGI callable returned without completing handshake.")
            self._send_500()
        if self.close_timer is None and self.state is not CLOSED:
            self._close_transport()

    async def _asgi_receive(self) -> Message:
        if not self._connect_sent:
            self._connect_sent = True
            return {"type": "websocket.connect"}
        item = await self.receive()
        if item is None:
            return {"type": "websocket.disconnect", "code": self.close_code}
        if isinstance(item, str):
            return {"type": "websocket.receive", "text": item}
        return {"type": "websocket.receive", "bytes": item}

    async def _asgi_send(self, message: Message) -> None:
        kind = message["type"]
        state = self.state
        if state is CONNECTING:
            if kind == "websocket.accept":
                self._accept(message.get("subprotocol"), list(message.get("headers", [])))
            elif kind == "websocket.close":
                self._reject(403)
            else:
                raise RuntimeError(f"Expected websocket.accept or websocket.close, got {kind!r}")
            return
        if state is CLOSED:
            raise OSError("the client is gone")
        if state is CLOSING:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after sending 'websocket.close'.")
        if kind == "websocket.send":
            await self._drained()
            data = message.get("bytes")
            if data is not None:
                self.transport.write(binary_bytes(data))
            else:
                self.transport.write(text_bytes(message["text"].encode()))
        elif kind == "websocket.close":
            code, reason = message.get("code", 1000), message.get("reason") or ""
            self._send_close(code, reason, close_timeout(self.config))
        else:
            raise RuntimeError(f"Expected 'websocket.send' or 'websocket.close', got {kind!r}")

    # -- the tidings transport (delivery.DirectTransport) ---------------------------------------

    async def accept(self, subprotocol: str | None = None) -> None:
        if self.state is CONNECTING:
            self._accept(subprotocol, [])

    def limit_incoming(self, max_size: int) -> None:
        """Close 1009 on an incoming message over ``max_size`` bytes (the endpoint's limit)."""
        _internals.limit_incoming(self.conn, max_size)

    def write_frames(self, frames: list[Frame]) -> None:
        """Write frames in one call: a :class:`.frames.WsFrame` (built once per publication)
        as it is; ``str``/``bytes`` are text/binary messages framed here, as over ASGI (a wire
        format that coalesces hands over one joined message). Nothing is written before the
        handshake is answered or after a close frame."""
        state = self.state
        if state is not OPEN and state is not PAUSED:
            return
        if len(frames) == 1:
            frame = frames[0]
            self.transport.write(framed(frame))
        else:  # inlined type test: this runs once per frame per subscriber
            self.transport.write(b"".join([f if type(f) is WsFrame else framed(f) for f in frames]))

    def write_frame(self, frame: Frame) -> None:
        state = self.state
        if state is OPEN or state is PAUSED:
            self.transport.write(framed(frame))

    async def send(self, frames: list[Frame]) -> None:
        await self._drained()
        self.write_frames(frames)

    def finish(self, frames: list[Frame], code: int, reason: str, timeout: float) -> None:
        """Write ``frames`` and a close frame now; abort the TCP connection if the client has
        not answered the close within ``timeout`` seconds. Receiving ends at once."""
        self.on_drain = None
        if frames:
            self.write_frames(frames)
        self._push(_GONE)
        self._send_close(code, reason, timeout)

    async def close(self, code: int, reason: str) -> None:
        if self.state is CONNECTING:
            self._reject(403)
        else:
            self._send_close(code, reason, close_timeout(self.config))


def close_timeout(config: Any) -> float:
    """Seconds a close waits for the client's reply: the ``close_timeout`` setting of the
    tidings served by uvicorn ``config`` (found as ``app.state.tidings`` under uvicorn's
    middleware wrappers and the front door), else 10 s."""
    app = config.loaded_app
    for _ in range(8):
        tidings = getattr(getattr(app, "state", None), "tidings", None)
        if tidings is not None:
            return float(tidings.settings.close_timeout)
        app = getattr(app, "app", None)
    return _CLOSE_TIMEOUT


def heartbeat(server_state: Any, config: Any) -> Wheel[FastWebSocket]:
    """The heartbeat wheel of one uvicorn server (one loop): one timer for all its connections,
    not one each (a timer handle per connection, see tidings/wheel.py). Its resolution is a
    quarter of the shorter of ping interval and pong timeout, at most 1 s: a ping or a pong
    deadline is late by less than that."""
    wheel: Wheel[FastWebSocket] | None = getattr(server_state, "tidings_heartbeat", None)
    if wheel is None:
        interval = config.ws_ping_interval
        shortest = min(interval, config.ws_ping_timeout or interval)
        wheel = server_state.tidings_heartbeat = Wheel(min(1.0, shortest / 4))
    return wheel


#: what :class:`FastWebSocket` negotiates when deflate is on: no context takeover either way
#: (shared: the factory is stateless; each connection gets its own ``PerMessageDeflate``)
_DEFLATE = [
    ServerPerMessageDeflateFactory(server_no_context_takeover=True, client_no_context_takeover=True)
]

_NAMES: dict[str, bytes] = {}


def _offered(request: Request) -> list[str]:
    """The subprotocols a handshake offers, each once, in order; blank
    ``Sec-WebSocket-Protocol`` headers (centrifuge-python 0.5 and 0.6 send an empty one) are
    dropped from ``request`` so that websockets' parser, which refuses them with HTTP 400, does
    not see them. Centrifugo treats an empty header as no header (RFC 6455 4.1 lists
    subprotocols as tokens, so an empty element carries nothing)."""
    headers = request.headers
    values = headers.get_all("Sec-WebSocket-Protocol")
    if not values:
        return []
    offered = list(dict.fromkeys(p.strip() for h in values for p in h.split(",")))
    offered = [p for p in offered if p]
    del headers["Sec-WebSocket-Protocol"]
    if offered:
        headers["Sec-WebSocket-Protocol"] = ", ".join(offered)
    return offered


def _name(header: str) -> bytes:
    """Header names as shared ``bytes``, not a copy per connection; lower-cased as ASGI
    requires. Bounded: a client cannot grow the cache with made-up names forever."""
    name = _NAMES.get(header)
    if name is None:
        name = header.lower().encode("ascii")
        if len(_NAMES) < 256:
            _NAMES[header] = name
    return name


def _addr(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None


def _who(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


__all__ = ["EXTENSION", "FastWebSocket", "close_timeout", "heartbeat"]
