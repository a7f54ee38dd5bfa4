"""Getting queued frames out: the per-iteration flush and the two writers.

A :class:`~tidings.session.Session` queues encoded frames in its bounded outbox; this module
decides when and how they leave. Once per event-loop iteration the :class:`Flusher` hands every
session that queued something to its *writer*, which packs the outbox into as few frames as the
session's wire format allows and writes them. A session's writer is chosen once, when it is
created, from the one capability its transport declares (:func:`takes_frames`):

* :class:`DirectWriter`, for a transport that writes synchronously and takes complete
  WebSocket frames (:class:`DirectTransport`, the fast path of ``tidings serve``): no task, the
  outbox is written in the Flusher's call; while nothing is queued and the socket is open the
  session's ``sink`` is the socket's own transport, so the fan-out writes a pre-built frame
  straight into it with no Python call per subscriber (:func:`fan_out`).
* :class:`QueuedWriter`, for any ASGI server: one writer task per session awaits the ASGI
  ``send``; the Flusher starts each send itself, in that task's name, and the task wakes only
  to finish a send that had to wait for the socket (:mod:`.eager`).

The fan-out (:meth:`Hub._deliver <tidings.hub.Hub>`) hands each encoder group's frame to
:func:`fan_out` in one call; the loops that touch sockets are here, not in the hub.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from .eager import EAGER, resume, step_as
from .errors import Disconnect
from .frames import Frame, WsFrame
from .state import State

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("tidings.delivery")

OPEN = State.OPEN  # a module global: compared once per subscriber per flush


class Transport(Protocol):
    """Moves frames to and from one WebSocket; knows nothing of channels.

    ``framed`` is the one capability a transport declares: True for a :class:`DirectTransport`
    (it takes complete frames and writes synchronously), False for one that takes ASGI-style
    messages (``str`` text, ``bytes`` binary) and may suspend to write."""

    framed: bool

    async def receive(self) -> Frame | None:
        """The next message from the client; None once it is gone."""

    async def send(self, frames: list[Frame]) -> None:
        """Write frames in order (may wait for the socket to drain)."""

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame (``code``, ``reason``: at most 123 UTF-8 bytes) and let the
        connection go."""


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


def takes_frames(transport: Transport) -> bool:
    """True if ``transport`` takes complete WebSocket frames (a :class:`DirectTransport`):
    the wire formats then build each push as a frame, once per publication."""
    return transport.framed


class Writer(Protocol):
    """What a session's frames leave through; one per session, chosen by :func:`writer_for`."""

    def send(self, frame: Frame) -> None:
        """Write ``frame`` now if nothing is queued before it and the socket takes it; else
        queue it (:meth:`Session.enqueue <tidings.session.Session.enqueue>`)."""

    def flush(self) -> None:
        """Hand the session's outbox on (the :class:`Flusher` calls this once per iteration)."""

    def opened(self) -> None:
        """The session opened (its handshake is answered): write what queued meanwhile."""

    def start(self) -> None:
        """The session starts serving (its reader task is running)."""

    def close(self, reason: Disconnect, unresponsive: bool) -> None:
        """The session is closing with ``reason``: write what is queued, then the close frame
        (``unresponsive``: the client stopped reading, stop waiting on its socket)."""

    async def closed(self) -> None:
        """Returns once the close frame is out (or the socket is gone)."""

    def stop(self) -> None:
        """The session is over: let go of the transport and any task."""


def writer_for(session: Session) -> Writer:
    """The writer for ``session``'s transport, from its declared capability (``framed``)."""
    transport = session.transport
    if takes_frames(transport):
        return DirectWriter(session, transport)  # type: ignore[arg-type]
    return QueuedWriter(session)


def fan_out(members: Iterable[Session], frame: Frame, through: bool) -> None:
    """Give ``frame`` (one encoder group's encoding of a publication) to every session in
    ``members``: written at once where nothing is queued before it if ``through``
    (:meth:`Flusher.write_through`), else queued for the iteration's flush."""
    if not through:
        for session in members:
            session.enqueue(frame)
    elif type(frame) is WsFrame:
        DirectWriter.write_through(members, frame)
    else:
        for session in members:
            session.writer.send(frame)


#: publications fanned out in one loop iteration after which publishers yield to the writers
CROWDED = 64


class Flusher:
    """Hands dirty sessions to their writers once per loop iteration, not once per message.

    It also tells the fan-out when queueing buys nothing (:meth:`write_through`): a publication
    that is alone in its loop iteration, after an iteration that coalesced nothing, leaves in
    one write per subscriber either way, and writing it during the fan-out saves a second pass
    over every subscriber (bench/RESULTS.md). Under load, when several publications arrive per
    iteration, they are queued and leave together."""

    __slots__ = ("_after", "_dirty", "_loop", "_published", "_scheduled", "busy")

    def __init__(self) -> None:
        self._dirty: list[Writer] = []
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
        instead, see serve/http.py)."""
        if not self._scheduled:
            return None
        if self._after is None:
            self._after = asyncio.get_running_loop().create_future()
        return self._after

    @property
    def crowded(self) -> bool:
        """This loop iteration fanned out so many publications (:data:`CROWDED`) that a
        publisher should let the writers run before it publishes more: a loop that never
        suspends (a batch on the memory broker) would otherwise fill every outbox and close
        fast readers as slow (3008)."""
        return self._published >= CROWDED

    def write_through(self) -> bool:
        """Count a publication in; True if it should be written straight through: it is the
        first in this iteration (later ones are queued behind it) and the last iteration had
        at most one."""
        self._published += 1
        if self._scheduled or self.busy:
            return False
        self.schedule()  # ends the iteration's count; publications after this one are queued
        return True

    def mark(self, writer: Writer) -> None:
        """Flush ``writer`` at the end of this loop iteration."""
        self._dirty.append(writer)
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
        for writer in dirty:
            writer.flush()
        after, self._after = self._after, None
        if after is not None and not after.done():
            after.set_result(None)


class DirectWriter:
    """Writes a session's frames synchronously into a :class:`DirectTransport`.

    Keeps ``session.sink``: the socket's transport while nothing is queued and the session is
    live (a frame written there can neither overtake a queued one nor follow a close), else
    None. The transport reports its own sink's changes (paused, drained, closing) through
    ``on_sink``; the session's own changes (queued, flushed, closing) come through here."""

    __slots__ = ("session", "transport")

    def __init__(self, session: Session, transport: DirectTransport) -> None:
        self.session = session
        self.transport = transport
        transport.on_drain = self.flush
        transport.on_sink = self.resink
        session.sink = transport.sink

    @staticmethod
    def write_through(members: Iterable[Session], frame: WsFrame) -> None:
        """The fan-out's hot loop: a complete frame straight into each open socket, no Python
        frame between (bench/RESULTS.md); a session with something queued, or paused, or on
        another writer (no sink) takes it through its writer instead."""
        data = bytes(frame)  # uvloop writes a bytes subclass through a memoryview
        for session in members:
            sink = session.sink
            if sink is None:
                session.writer.send(frame)
            else:
                sink.write(data)

    def send(self, frame: Frame) -> None:
        session = self.session
        if not session._outbox and self.transport.writable and session._state is OPEN:
            self.transport.write_frame(frame)
        else:
            session.enqueue(frame)

    def flush(self) -> None:
        session = self.session
        session._dirty = False
        outbox = session._outbox
        transport = self.transport
        if outbox and transport.writable and session._state is OPEN:
            session._pending = 0
            transport.write_frames(session.format.pack(outbox))
            outbox.clear()  # written synchronously: the list is reused, not reallocated
            session.sink = transport.sink

    def resink(self) -> None:
        """The transport's sink changed: the session's follows it while nothing is queued."""
        session = self.session
        live = not session._outbox and session._state is OPEN
        session.sink = self.transport.sink if live else None

    def opened(self) -> None:
        self.flush()
        self.resink()

    def start(self) -> None:
        return None  # no task: flush() and close() write

    def close(self, reason: Disconnect, unresponsive: bool) -> None:
        session = self.session
        batch, session._outbox = session._outbox, []
        session._pending = 0
        frames = session.format.pack(batch) if batch else []
        timeout = session.hub.settings.close_timeout
        self.transport.finish(frames, reason.code, reason.reason, timeout)

    async def closed(self) -> None:
        return None  # finish() wrote the close frame; the transport handles the rest

    def stop(self) -> None:
        self.transport.on_drain = self.transport.on_sink = None


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


class _Phase(enum.Enum):
    """Where a :class:`QueuedWriter`'s task is (one value instead of two booleans)."""

    AWAKE = "awake"  # running, or not started: the Flusher wakes it to send
    WAITING = "waiting"  # waits with nothing in flight: the Flusher may start a send itself
    SENDING = "sending"  # a send is in flight (its own, or one the Flusher handed over)
    DONE = "done"  # ended: the close frame is out or the socket is gone


AWAKE, WAITING, SENDING, DONE = _Phase.AWAKE, _Phase.WAITING, _Phase.SENDING, _Phase.DONE


class QueuedWriter:
    """The writer of an ASGI connection: one task awaits ``transport.send`` per batch.

    While that task waits with nothing in flight the Flusher starts its sends itself
    (:meth:`_send_eagerly`): a socket that is not backed up takes the batch without
    suspending, so no task wakes at all. A send that suspends is handed to the task, which
    finishes it before anything queued later."""

    __slots__ = ("_context", "_handoff", "_phase", "_task", "_wakeup", "session")

    def __init__(self, session: Session) -> None:
        self.session = session
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._context: contextvars.Context | None = None  # the task's
        self._phase = AWAKE
        self._handoff: _Handoff | None = None

    def send(self, frame: Frame) -> None:
        self.session.enqueue(frame)  # an ASGI send may suspend: it goes through the task

    def flush(self) -> None:
        self.session._dirty = False
        if self._phase is WAITING and self.session._outbox:
            self._send_eagerly()
        else:
            self._wakeup.set()

    def opened(self) -> None:
        self.flush()  # the task, once started, sends what queued meanwhile

    def start(self) -> None:
        # its own context, which flush() also runs its eager sends in
        context = self._context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._write_loop(), context=context)

    def close(self, reason: Disconnect, unresponsive: bool) -> None:
        if self._phase is WAITING:
            self._phase = AWAKE  # the task sends what is left, then the close frame
        self._wakeup.set()
        if unresponsive and self._phase is SENDING:  # stop waiting on its full socket
            if self._handoff is not None:  # not yet taken over by the task
                self._handoff.error = asyncio.CancelledError()
            elif self._task is not None:
                self._task.cancel()

    async def closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)  # it sends what is queued, then the close frame

    def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _send_eagerly(self) -> None:
        """Start the task's next send here, as the task would: no task switch at all.

        The ASGI ``send`` runs one step in the writer task's name and context (so code in it
        that needs a current task, e.g. ``asyncio.timeout``, works). Usually it writes to a
        socket that is not backed up and returns at once; if it suspends instead, the task
        takes the suspended coroutine over and awaits it before anything queued later."""
        task, context = self._task, self._context
        assert task is not None and context is not None  # only the task sets WAITING
        session = self.session
        size = session._pending  # nothing is in flight: all that is pending is in this batch
        stepped = step_as(task, context, self._start_send)
        if stepped is None:  # called from inside a task: the writer task sends
            self._wakeup.set()
            return
        coro, step, error = stepped
        if coro is None and error is None:  # written without suspending
            session._pending -= size
            return
        if coro is None:  # the task raises it as if its own send had
            self._handoff = _Handoff(None, None, size, error)
            self._phase = AWAKE
        else:
            self._handoff = _Handoff(coro, step, size)
            self._phase = SENDING
        self._wakeup.set()

    def _start_send(self) -> Coroutine[Any, Any, None]:
        session = self.session
        batch, session._outbox = session._outbox, []
        return session.transport.send(session.format.pack(batch))

    async def _write_loop(self) -> None:
        """Drains the outbox in batches, then closes: the only writer of its connection."""
        session = self.session
        transport, wire = session.transport, session.format
        try:
            while True:
                if EAGER and not session.closing:
                    self._phase = WAITING
                await self._wakeup.wait()
                if self._phase is WAITING:  # else the Flusher handed a send over (SENDING)
                    self._phase = AWAKE
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
                    elif session._outbox:
                        batch, session._outbox = session._outbox, []
                        size = sum(map(len, batch))
                        sending = transport.send(wire.pack(batch))
                    else:
                        break
                    self._phase = SENDING
                    try:
                        await sending
                    except asyncio.CancelledError:
                        if not session.closing:  # not our own abort: a real cancellation
                            raise
                        break  # close() gave up on a client that stopped reading
                    finally:
                        self._phase = AWAKE
                    session._pending -= size
                if session.closing:
                    break
        except (OSError, RuntimeError):
            # The socket is gone; nothing more can be written, not even a close frame.
            session.lost(Disconnect(1006, "gone"))
            return
        finally:
            self._phase = DONE
            if self._handoff is not None and self._handoff.coro is not None:
                self._handoff.coro.close()  # cancelled before it could take the send over
            self._handoff = None
        reason = session.closed_with or Disconnect(1000, "")
        timeout = session.hub.settings.close_timeout
        finished = False
        try:
            async with asyncio.timeout(timeout):
                await transport.close(reason.code, reason.reason)
            finished = True
        except (TimeoutError, OSError, RuntimeError):
            pass
        finally:
            session.stop_reading()
        # Every close gets a deadline: the server's own close may wait on a peer that stopped
        # reading for good (its buffered frames, then the close frame, never leave).
        abort = getattr(transport, "abort", None)
        if abort is not None:
            if finished:  # a no-op by then if the server closed the socket
                asyncio.get_running_loop().call_later(timeout, abort)
            else:
                abort()


__all__ = [
    "DirectTransport",
    "DirectWriter",
    "Flusher",
    "QueuedWriter",
    "Transport",
    "Writer",
    "fan_out",
    "takes_frames",
    "writer_for",
]
