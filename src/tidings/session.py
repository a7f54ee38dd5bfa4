"""One client connection: a bounded outbox, one writer that coalesces, heartbeats.

Fan-out calls :meth:`Session.enqueue` for every subscriber of a channel. It never awaits and
never grows memory without bound: it appends already-encoded frames to the outbox and marks the
session dirty; once per event-loop iteration the :class:`Flusher` hands every dirty session's
outbox to its writer, which packs the queued frames into as few writes as its wire format allows.
On an ASGI transport the Flusher starts that write itself (:meth:`Session.flush`): a socket that
is not backed up takes it without suspending, so no writer task wakes at all.
A client whose outbox passes ``outbox_limit`` bytes is closed as slow (3008) and its frames are
dropped: one slow reader never holds up the publisher or the other subscribers.

Application-level pings (the Centrifugo protocol's) run on the hub's :class:`~.wheel.Wheel`, not
on a loop timer per session: the first ping goes out at a point spread over ``ping_interval``
(so connections accepted together are not pinged together), each later one ``ping_interval``
after the pong; no pong within ``pong_timeout`` closes the session 3012. Either may be late by
the wheel's resolution (``Hub.wheel``: at most 1 s, a quarter of the shortest such setting).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .eager import resume
from .errors import NO_PONG, SLOW, Disconnect

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("tidings.session")

Frame = str | bytes


class Transport(Protocol):
    """Moves frames to and from one WebSocket; knows nothing of channels."""

    async def receive(self) -> Frame | None:
        """The next message from the client; None once it is gone."""

    async def send(self, frames: list[Frame]) -> None:
        """Write frames in order (may wait for the socket to drain)."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame and let the connection go."""


@runtime_checkable
class DirectTransport(Transport, Protocol):
    """A transport that writes synchronously (the fast path of `tidings serve`).

    A session on it needs no writer task: the :class:`Flusher` writes its outbox in the same
    loop iteration, in one call, and the transport calls ``on_drain`` when a paused socket can
    take more."""

    on_drain: Callable[[], None] | None
    #: False while the socket's buffer is above its high-water mark (an attribute, not a
    #: property: it is read once per subscriber per flush)
    writable: bool
    #: the socket's own transport while a complete frame (a ``WsFrame``) may be written
    #: straight to it: open, writable, no close frame sent; else None. ``on_sink`` is called
    #: when it changes.
    sink: asyncio.WriteTransport | None
    on_sink: Callable[[], None] | None

    def write_frames(self, frames: list[Frame]) -> None:
        """Write ``frames`` now, in one call (the list is reused afterwards: don't keep it)."""

    def write_frame(self, frame: Frame) -> None:
        """Write one frame now (``write_frames([frame])`` without the list)."""

    def finish(self, frames: list[Frame], code: int, reason: str, timeout: float) -> None:
        """Write ``frames`` and a close frame; abort the connection after ``timeout`` seconds
        without the client's close reply. ``receive`` returns None from now on."""


class WireFormat(Protocol):
    """How frames are packed for one protocol (raw text, Centrifugo JSON, ...)."""

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Coalesce queued frames into as few frames as the protocol allows."""

    def ping(self) -> Frame | None:
        """An application-level ping, or None when the transport does heartbeats."""


Handler = Callable[["Session", Frame], Awaitable[None]]

_ids = itertools.count(1)

try:  # what asyncio's own eager tasks (3.12) do: run a step "as" a task that is not running
    from asyncio.tasks import _enter_task, _leave_task

    EAGER = True
except ImportError:  # pragma: no cover - an asyncio without them: the writer task sends
    EAGER = False


class _Handoff:
    """A send the Flusher started that the writer task must finish (or the error it raised)."""

    __slots__ = ("coro", "error", "size", "step")

    def __init__(
        self,
        coro: Coroutine[Any, Any, None] | None,
        step: Any,
        size: int,
        error: BaseException | None = None,
    ) -> None:
        self.coro = coro
        self.step = step  # what the coroutine yielded: the future it waits on
        self.size = size  # bytes of the batch, counted in Session._pending until it is written
        self.error = error  # thrown into it first (raised instead when there is no coro)


class Flusher:
    """Hands dirty sessions to their writers once per loop iteration, not once per message.

    It also tells the fan-out when queueing buys nothing (:meth:`write_through`): a publication
    that is alone in its loop iteration, after an iteration that coalesced nothing, leaves in
    one write per subscriber either way, and writing it during the fan-out saves a second pass
    over every subscriber (measured at 10 publications/s to 1,000 subscribers: 10.3-11.0 ms of
    CPU per fan-out queued, 8.1 written through, 7.6 for the raw ceiling). Under load, when
    several publications arrive per iteration, they are queued and leave together."""

    __slots__ = ("_after", "_dirty", "_loop", "_published", "_scheduled", "busy")

    def __init__(self) -> None:
        self._dirty: list[Session] = []
        self._scheduled = False
        self._after: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published = 0  # publications fanned out in this loop iteration
        #: the last iteration had several publications: queue, they are likely to coalesce
        self.busy = False

    @property
    def pending(self) -> bool:
        """A flush is scheduled for the end of this loop iteration."""
        return self._scheduled

    def after(self) -> asyncio.Future[None] | None:
        """Done once the flush scheduled for this loop iteration has run; None if none is.

        A publisher answered over ASGI awaits it, so it cannot run ahead of the fan-out and
        pile messages up in every outbox (`tidings serve`'s own HTTP path defers its write
        instead, see transport/http.py)."""
        if not self._scheduled:
            return None
        if self._after is None:
            self._after = asyncio.get_running_loop().create_future()
        return self._after

    def write_through(self) -> bool:
        """Count a publication in; True if it should be written straight through: it is the
        first in this iteration (later ones are queued behind it) and the last iteration had
        at most one."""
        self._published += 1
        if self._scheduled or self.busy:
            return False
        self.schedule()  # ends the iteration's count; publications after this one are queued
        return True

    def mark(self, session: Session) -> None:
        self._dirty.append(session)
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        self._scheduled = True
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        self.busy = self._published > 1
        self._published = 0
        for session in dirty:
            session.flush()
        after, self._after = self._after, None
        if after is not None and not after.done():
            after.set_result(None)


class Session:
    """One connected client. ``user``/``info`` are set by whichever protocol authenticates it."""

    __slots__ = (
        "__weakref__",
        "_closing",
        "_context",
        "_direct",
        "_dirty",
        "_eager",
        "_flusher",
        "_handoff",
        "_outbox",
        "_pending",
        "_pinged",
        "_reader",
        "_receiving",
        "_sending",
        "_state",
        "_wakeup",
        "_writer",
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
    )

    def __init__(
        self,
        hub: Hub,
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
        self._state: dict[str, Any] | None = None
        #: the protocol's own object for this connection (the Centrifugo ``Client``), if any
        self.protocol: Any = None
        self.limit = hub.settings.outbox_limit
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.closed_with: Disconnect | None = None
        self._flusher = hub.flusher
        self._outbox: list[Frame] = []
        self._pending = 0  # bytes queued or being written
        self._dirty = False
        self._closing = False
        self._direct = transport if isinstance(transport, DirectTransport) else None
        #: the socket's transport while a pre-framed push may bypass the outbox (see
        #: :meth:`_resink`): the fan-out's write-through writes to it with no Python frame
        #: between
        self.sink: asyncio.WriteTransport | None = None
        if self._direct is None:
            self._wakeup = asyncio.Event()
        else:  # no writer task, so no wake-up event (~0.8 KiB per idle connection)
            self._direct.on_drain = self.flush
            self._direct.on_sink = self._resink
            self.sink = self._direct.sink
        self._reader: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._context: contextvars.Context | None = None  # the writer's
        #: True while the writer task waits with nothing in flight: flush() may send eagerly
        self._eager = False
        self._handoff: _Handoff | None = None
        self._receiving = False
        self._sending = False
        self._pinged = False  # a ping is out, its pong not back yet
        self.wheel_bucket: set[Any] | None = None  # the hub's Wheel: next ping or pong deadline

    def __repr__(self) -> str:
        return f"<Session {self.client_id} user={self.user!r} channels={len(self.channels)}>"

    @property
    def state(self) -> dict[str, Any]:
        """Free-form per-connection data for the application (created when first used)."""
        if self._state is None:
            self._state = {}
        return self._state

    # -- outgoing --------------------------------------------------------------------------------

    def enqueue(self, frame: Frame) -> None:
        """Queue one encoded frame. Synchronous and bounded: the fan-out's only per-client cost."""
        if self._closing:
            return
        pending = self._pending + len(frame)
        if pending > self.limit:
            self.hub.metrics.slow_clients += 1
            log.warning("closing slow client %s: %d bytes queued", self.client_id, pending)
            self.close(SLOW)
            return
        self._pending = pending
        self._outbox.append(frame)
        self.sink = None  # queued frames go first
        if not self._dirty:
            self._dirty = True
            flusher = self._flusher  # Flusher.mark, inlined: once per subscriber per flush
            flusher._dirty.append(self)
            if not flusher._scheduled:
                flusher.schedule()

    def send(self, frame: Frame) -> None:
        """Write ``frame`` at once when nothing is queued before it and the socket takes it (a
        direct transport); else :meth:`enqueue` it."""
        direct = self._direct
        if direct is not None and not self._outbox and direct.writable and not self._closing:
            direct.write_frame(frame)
        else:
            self.enqueue(frame)

    def flush(self) -> None:
        """Hand the outbox on: written here on a direct transport, else started here (see
        :meth:`_send_eagerly`) or left to the writer task."""
        self._dirty = False
        direct = self._direct
        if direct is None:
            if self._eager and self._outbox:
                self._send_eagerly()
            else:
                self._wakeup.set()
        elif self._outbox and not self._closing and direct.writable:
            outbox = self._outbox
            self._pending = 0
            direct.write_frames(self.format.pack(outbox))
            outbox.clear()  # written synchronously: the list is reused, not reallocated
            self.sink = direct.sink

    def _resink(self) -> None:
        """``sink`` is the transport's while nothing is queued and the session is open: a
        frame written there cannot overtake a queued one, nor follow a close. Called by the
        transport when its own sink changes (paused, drained, closing)."""
        direct = self._direct
        self.sink = (
            direct.sink if direct is not None and not self._outbox and not self._closing else None
        )

    def _send_eagerly(self) -> None:
        """Start the writer's next send here, as the writer task would: no task switch at all.

        The ASGI ``send`` runs one step in the writer task's name and context (so code in it
        that needs a current task, e.g. ``asyncio.timeout``, works). Usually it writes to a
        socket that is not backed up and returns at once; if it suspends instead, the writer
        task takes the suspended coroutine over and awaits it before anything queued later."""
        writer, context = self._writer, self._context
        assert writer is not None and context is not None  # _eager is only set by the writer
        loop = writer.get_loop()
        try:
            _enter_task(loop, writer)
        except RuntimeError:  # called from inside a task: the writer task sends
            self._wakeup.set()
            return
        batch, self._outbox = self._outbox, []
        size = self._pending  # nothing is in flight: all that is pending is in this batch
        try:
            coro = self.transport.send(self.format.pack(batch))
            step = context.run(coro.send, None)
        except StopIteration:
            self._pending -= size
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the writer raises it as if its own send had
            self._handoff = _Handoff(None, None, size, exc)
        else:
            self._handoff = _Handoff(coro, step, size)
            self._sending = True
        finally:
            _leave_task(loop, writer)
        self._eager = False
        self._wakeup.set()

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self, reason: Disconnect) -> None:
        """Close soon with ``reason``; what is still queued is dropped if the client is slow."""
        if self._closing:
            return
        self._closing = True
        self.sink = None
        self.closed_with = reason
        self._cancel_timers()
        unresponsive = reason is SLOW or reason is NO_PONG
        if unresponsive:  # the client is not reading: what is queued would never get through
            self._outbox.clear()
            self._pending = 0
        if self._direct is None:
            self._eager = False
            self._wakeup.set()
            if unresponsive and self._sending:  # stop waiting on its full socket, then close
                if self._handoff is not None:  # not yet taken over by the writer
                    self._handoff.error = asyncio.CancelledError()
                elif self._writer is not None:
                    self._writer.cancel()
            return
        batch, self._outbox = self._outbox, []
        self._pending = 0
        frames = self.format.pack(batch) if batch else []
        self._direct.finish(frames, reason.code, reason.reason, self.hub.settings.close_timeout)

    async def _write_loop(self) -> None:
        """The only writer of an ASGI connection: drains the outbox in batches, then closes.

        While it waits with nothing in flight the Flusher starts its sends (``_eager``); it
        wakes only to finish one of those that suspended, to write what queued up meanwhile,
        or to close."""
        transport, wire = self.transport, self.format
        try:
            while True:
                self._eager = EAGER and not self._closing
                await self._wakeup.wait()
                self._eager = False
                self._wakeup.clear()
                while True:
                    sending: Awaitable[None]
                    handoff = self._handoff
                    if handoff is not None:  # the Flusher's send: first, it was queued first
                        self._handoff = None
                        if handoff.coro is None:  # it failed at once
                            raise handoff.error or RuntimeError("send failed")
                        sending = resume(handoff.coro, handoff.step, handoff.error)
                        size = handoff.size
                    elif self._outbox:
                        batch, self._outbox = self._outbox, []
                        size = sum(map(len, batch))
                        sending = transport.send(wire.pack(batch))
                    else:
                        break
                    self._sending = True
                    try:
                        await sending
                    except asyncio.CancelledError:
                        if not self._closing:  # not our own abort: a real cancellation
                            raise
                        break  # close() gave up on a client that stopped reading
                    finally:
                        self._sending = False
                    self._pending -= size
                if self._closing:
                    break
        except (OSError, RuntimeError):
            # The socket is gone; nothing more can be written, not even a close frame.
            if self.closed_with is None:
                self.closed_with = Disconnect(1006, "gone")
            self._closing = True
            return
        finally:
            self._eager = False
            if self._handoff is not None and self._handoff.coro is not None:
                self._handoff.coro.close()  # cancelled before it could take the send over
            self._handoff = None
        reason = self.closed_with or Disconnect(1000, "")
        try:
            async with asyncio.timeout(self.hub.settings.close_timeout):
                await transport.close(reason.code, reason.reason)
        except (TimeoutError, OSError, RuntimeError):
            pass
        finally:
            if self._receiving and self._reader is not None:
                self._reader.cancel()

    # -- heartbeats ------------------------------------------------------------------------------

    def _schedule_ping(self, first: bool = False) -> None:
        interval = self.ping_interval
        if interval and not self._closing:
            if first:  # somewhere in the interval: clients that came together are pinged apart
                self.hub.wheel.spread(self, interval)
            else:
                self.hub.wheel.schedule(self, interval)

    def on_tick(self) -> None:
        """The hub's wheel: a ping is due, or the pong is late."""
        if self._closing:
            return
        if self._pinged:
            self.close(NO_PONG)
            return
        frame = self.format.ping()
        if frame is None:
            return
        self.enqueue(frame)
        if not self._closing:  # enqueue closes a slow client
            self._pinged = True
            self.hub.wheel.schedule(self, self.pong_timeout)

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

    def _cancel_timers(self) -> None:
        self.hub.wheel.cancel(self)

    # -- the connection's life -------------------------------------------------------------------

    async def serve(self, handle: Handler) -> None:
        """Run until the client or the server ends the connection; ``handle`` gets each message.

        Messages are handled one at a time, in order: a client that floods waits for its own
        commands, and its socket applies backpressure to it."""
        self._reader = asyncio.current_task()
        writer = None  # a direct transport is written by flush() and close(), not by a task
        if self._direct is None:
            # its own context, which flush() also runs its eager sends in
            context = self._context = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            writer = self._writer = loop.create_task(self._write_loop(), context=context)
        self._schedule_ping(first=True)
        try:
            while not self._closing:
                try:
                    self._receiving = True
                    message = await self.transport.receive()
                    self._receiving = False
                    if message is None:  # the client is gone: nothing more to write
                        self._closing = True
                        self.sink = None
                        if self.closed_with is None:
                            self.closed_with = Disconnect(1000, "client closed")
                        return
                    await handle(self, message)
                except Disconnect as reason:
                    self._receiving = False
                    self.close(reason)
                except Exception:
                    log.exception("error handling a message from %s", self.client_id)
                    self.close(Disconnect(1011, "internal error"))
            if writer is not None:
                await asyncio.shield(writer)  # it sends what is queued, then the close frame
        except asyncio.CancelledError:
            # The writer cancels a reader blocked in receive() once the close frame is out.
            if not self._closing:
                raise
        finally:
            self._closing = True
            self._cancel_timers()
            self._outbox.clear()
            if writer is not None and not writer.done():
                writer.cancel()
            self.sink = None
            if self._direct is not None:
                self._direct.on_drain = self._direct.on_sink = None
            await self.hub.forget(self)
