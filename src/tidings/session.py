"""One client connection: a bounded outbox, one writer that coalesces, heartbeats.

Fan-out calls :meth:`Session.enqueue` for every subscriber of a channel. It never awaits and
never grows memory without bound: it appends already-encoded frames to the outbox and marks the
session dirty; once per event-loop iteration the :class:`~.delivery.Flusher` hands every dirty
session's outbox to its writer (:mod:`.delivery`), which packs the queued frames into as few
writes as its wire format allows.
A client whose outbox passes ``outbox_limit`` bytes is closed as slow (3008) and its frames are
dropped: one slow reader never holds up the publisher or the other subscribers.

A session's life is one :class:`~tidings.state.State` (CONNECTING, OPEN, CLOSING, CLOSED),
changed only by :meth:`Session._to`, which checks the transition and does what it implies
(writer notified, timers cancelled, sink dropped).

Application-level pings (the Centrifugo protocol's) run on the hub's :class:`~.wheel.Wheel`, not
on a loop timer per session: the first ping goes out at a point spread over ``ping_interval``
(so connections accepted together are not pinged together), each later one ``ping_interval``
after the pong; no pong within ``pong_timeout`` closes the session 3012. Either may be late by
the wheel's resolution (``Hub.wheel``: at most 1 s, a quarter of the shortest such setting).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .delivery import Flusher, Transport, Writer, writer_for
from .errors import NO_PONG, SLOW, Disconnect
from .frames import Frame
from .state import State, Table, check
from .wheel import Member, Wheel

log = logging.getLogger("tidings.session")

CONNECTING, OPEN, CLOSING, CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED

#: a session's legal transitions (:meth:`Session._to`)
TRANSITIONS: Table = {
    CONNECTING: frozenset({OPEN, CLOSING, CLOSED}),
    OPEN: frozenset({CLOSING, CLOSED}),
    CLOSING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class WireFormat(Protocol):
    """How frames are packed for one protocol (raw text, Centrifugo JSON, ...)."""

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Coalesce queued frames into as few frames as the protocol allows."""

    def ping(self) -> Frame | None:
        """An application-level ping, or None when the transport does heartbeats."""


class Host(Protocol):
    """What a session needs of its hub (:class:`~tidings.hub.Hub` is one): sessions do not
    import the hub, so the hub may import them."""

    node_id: str
    settings: Any  # tidings.config.Settings
    metrics: Any  # tidings.hub.Metrics: counts slow clients
    flusher: Flusher
    wheel: Wheel[Member]

    def connect(self, session: Session) -> None:
        """Count ``session`` in (raises :class:`~.errors.Disconnect` when full)."""

    async def forget(self, session: Session) -> None:
        """Forget ``session`` once its connection ended."""


Handler = Callable[["Session", Frame], Awaitable[None]]

_ids = itertools.count(1)


class Session:
    """One connected client. ``user``/``info`` are set by whichever protocol authenticates it.

    ``hub``: the :class:`Host` it belongs to; ``transport``: its :class:`~.delivery.Transport`
    (the writer is chosen from it once, :func:`~.delivery.writer_for`); ``wire``: how queued
    frames are packed and pinged; ``ping_interval``/``pong_timeout``: seconds, for protocols
    with application-level pings (None: no pings)."""

    __slots__ = (
        "__weakref__",
        "_dirty",
        "_ended",
        "_flusher",
        "_outbox",
        "_pending",
        "_pinged",
        "_reader",
        "_receiving",
        "_state",
        "_userdata",
        "channels",
        "client_id",
        "closed_with",
        "format",
        "hub",
        "info",
        "limit",
        "ping_interval",
        "pong_timeout",
        "protocol",
        "sink",
        "transport",
        "user",
        "wheel_bucket",
        "writer",
    )

    def __init__(
        self,
        hub: Host,
        transport: Transport,
        wire: WireFormat,
        *,
        ping_interval: float | None = None,
        pong_timeout: float = 10.0,
    ) -> None:
        self.hub = hub
        self.transport = transport
        self.format = wire
        self.client_id = f"{hub.node_id}-{next(_ids)}"
        self.user = ""
        self.info: bytes | None = None
        self.channels: set[str] = set()
        self._userdata: dict[str, Any] | None = None
        #: the protocol's own object for this connection (the Centrifugo ``Client``), if any
        self.protocol: Any = None
        self.limit = hub.settings.outbox_limit
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self._state = CONNECTING
        #: CLOSING or CLOSED, derived from ``_state`` by :meth:`_to` alone: the one check the
        #: fan-out's enqueue makes (a module-global enum lookup and compare per delivery shows
        #: in the fan-out's profile)
        self._ended = False
        #: why it closed (set with the move to CLOSING, or CLOSED for a client that left)
        self.closed_with: Disconnect | None = None
        self._flusher = hub.flusher
        self._outbox: list[Frame] = []
        self._pending = 0  # bytes queued or being written
        self._dirty = False  # handed to the Flusher for this iteration
        #: the socket's transport while a pre-framed push may bypass the outbox: the
        #: fan-out's write-through writes to it with no Python frame between; kept by a
        #: :class:`~.delivery.DirectWriter`, always None on other writers
        self.sink: asyncio.WriteTransport | None = None
        self.writer: Writer = writer_for(self)
        self._reader: asyncio.Task[Any] | None = None
        self._receiving = False  # the reader waits in transport.receive()
        self._pinged = False  # a ping is out, its pong not back yet
        self.wheel_bucket: set[Any] | None = None  # the hub's Wheel: next ping or pong deadline

    def __repr__(self) -> str:
        return (
            f"<Session {self.client_id} {self._state.name} user={self.user!r} "
            f"channels={len(self.channels)}>"
        )

    @property
    def state(self) -> dict[str, Any]:
        """Free-form per-connection data for the application (created when first used)."""
        if self._userdata is None:
            self._userdata = {}
        return self._userdata

    @property
    def connection_state(self) -> State:
        """Where the connection is in its life (see :class:`~tidings.state.State`)."""
        return self._state

    @property
    def closing(self) -> bool:
        """Closing or closed: nothing more is queued."""
        return self._ended

    # -- state -----------------------------------------------------------------------------------

    def _to(self, new: State, reason: Disconnect | None = None, *, gone: bool = False) -> None:
        """Move to ``new`` (raises :class:`~tidings.state.IllegalTransition` if the table does
        not allow it) and do what the move implies; ``reason``: why, when closing; ``gone``:
        the socket is gone, so the writer is not asked to send a close frame."""
        check(self, TRANSITIONS, self._state, new)
        self._state = new
        self._ended = new is CLOSING or new is CLOSED
        if new is OPEN:
            self.writer.opened()
            return
        # CLOSING or CLOSED: nothing new is written straight through, no more pings
        self.sink = None
        if self.closed_with is None and reason is not None:
            self.closed_with = reason
        self.hub.wheel.cancel(self)
        if new is CLOSED:
            self._outbox.clear()
            self.writer.stop()
        elif not gone:
            assert reason is not None
            unresponsive = reason.code in (SLOW.code, NO_PONG.code)
            if unresponsive:  # the client is not reading: what is queued would never get through
                self._outbox.clear()
                self._pending = 0
            self.writer.close(reason, unresponsive)

    def open(self) -> None:
        """The handshake is answered: write what queued meanwhile, and from now on as it comes."""
        self._to(OPEN)

    def close(self, reason: Disconnect) -> None:
        """Close soon with ``reason``; what is still queued is dropped if the client is slow
        (:data:`~.errors.SLOW`) or did not answer a ping (:data:`~.errors.NO_PONG`). Does
        nothing if it is already closing."""
        if not self.closing:
            self._to(CLOSING, reason)

    def lost(self, reason: Disconnect) -> None:
        """The writer found the socket gone: nothing more can be written, not even a close."""
        if not self._ended:
            self._to(CLOSING, reason, gone=True)

    def stop_reading(self) -> None:
        """The close frame is out: a reader still waiting for a message stops waiting."""
        if self._receiving and self._reader is not None:
            self._reader.cancel()

    # -- outgoing --------------------------------------------------------------------------------

    def enqueue(self, frame: Frame) -> None:
        """Queue one encoded frame. Synchronous and bounded: the fan-out's only per-client cost.

        Past ``outbox_limit`` bytes the session is closed as slow (3008, :data:`~.errors.SLOW`)
        instead; a closing session drops it."""
        if self._ended:
            return
        pending = self._pending + len(frame)
        if pending > self.limit:
            self.hub.metrics.slow_clients += 1
            log.warning("closing slow client %s: %d bytes queued", self.client_id, pending)
            self.close(SLOW())
            return
        self._pending = pending
        self._outbox.append(frame)
        self.sink = None  # queued frames go first
        if not self._dirty:
            self._dirty = True
            flusher = self._flusher  # Flusher.mark, inlined: once per subscriber per flush
            flusher._dirty.append(self.writer)
            if not flusher._scheduled:
                flusher.schedule()

    def send(self, frame: Frame) -> None:
        """Write ``frame`` at once when nothing is queued before it and the socket takes it;
        else :meth:`enqueue` it."""
        self.writer.send(frame)

    def flush(self) -> None:
        """Hand the outbox to the writer now (the Flusher does this once per iteration)."""
        self.writer.flush()

    # -- heartbeats ------------------------------------------------------------------------------

    def _schedule_ping(self, first: bool = False) -> None:
        interval = self.ping_interval
        if interval and not self.closing:
            if first:  # somewhere in the interval: clients that came together are pinged apart
                self.hub.wheel.spread(self, interval)
            else:
                self.hub.wheel.schedule(self, interval)

    def on_tick(self) -> None:
        """The hub's wheel: a ping is due, or the pong is late."""
        if self.closing:
            return
        if self._pinged:
            self.close(NO_PONG())
            return
        frame = self.format.ping()
        if frame is None:
            return
        self.enqueue(frame)
        if self.closing:  # enqueue closes a slow client
            return
        if getattr(self.format, "expects_pong", True):
            self._pinged = True
            self.hub.wheel.schedule(self, self.pong_timeout)
        else:  # a unidirectional client cannot answer: the ping only keeps the stream alive
            self._schedule_ping()

    def start_heartbeats(self, interval: float) -> None:
        """Start pinging now (protocols whose clients must not be pinged before a handshake)."""
        self.ping_interval = interval
        if self.wheel_bucket is None and not self._pinged:
            self._schedule_ping(first=True)

    def pong(self) -> None:
        """The client answered; the next ping goes out ``ping_interval`` after this one."""
        if self._pinged:
            self._pinged = False
            self._schedule_ping()  # replaces the pong deadline

    # -- the connection's life -------------------------------------------------------------------

    async def serve(self, handle: Handler) -> None:
        """Run until the client or the server ends the connection; ``handle`` gets each message.

        Opens the session first if :meth:`open` was not called. Messages are handled one at a
        time, in order: a client that floods waits for its own commands, and its socket applies
        backpressure to it. Raises :class:`~tidings.state.IllegalTransition` if the session was
        served already."""
        if self._reader is not None:
            raise RuntimeError(f"{self!r} is served already")
        if self._state is CONNECTING:
            self._to(OPEN)
        self._reader = asyncio.current_task()
        self.writer.start()
        self._schedule_ping(first=True)
        try:
            while self._state is OPEN:
                try:
                    self._receiving = True
                    message = await self.transport.receive()
                    self._receiving = False
                    if message is None:  # the client is gone: nothing more to write
                        self._to(CLOSED, Disconnect(1000, "client closed"))
                        return
                    await handle(self, message)
                except Disconnect as reason:
                    self._receiving = False
                    self.close(reason)
                except Exception:
                    log.exception("error handling a message from %s", self.client_id)
                    self.close(Disconnect(1011, "internal error"))
            await self.writer.closed()  # what is queued, then the close frame
        except asyncio.CancelledError:
            # The writer cancels a reader blocked in receive() once the close frame is out.
            if not self.closing:
                raise
        finally:
            if self._state is not CLOSED:
                self._to(CLOSED)
            await self.hub.forget(self)


__all__ = ["Frame", "Host", "Session", "Transport", "WireFormat"]
