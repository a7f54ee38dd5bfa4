"""The writers without I/O: frames in, the transport calls they make out.

As python-websockets' ``tests/test_protocol.py`` does for its sans-I/O protocol: each test
drives a session and its writer with scripted transports and asserts exactly what they were
asked to write, in which calls and in which order. No socket, no server; the event loop only
runs the Flusher's once-per-iteration callback and the ASGI writer's task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tidings import Settings
from tidings.brokers.memory import MemoryBroker
from tidings.delivery import DirectWriter, QueuedWriter, fan_out, takes_frames
from tidings.errors import SLOW, Disconnect
from tidings.frames import Frame, WsFrame, text_frame
from tidings.hub import Hub
from tidings.session import Session
from tidings.state import IllegalTransition, State


class Joined:
    """A wire format that coalesces: several queued frames leave as one, '|'-joined."""

    def pack(self, frames: list[Frame]) -> list[Frame]:
        if len(frames) == 1:
            return list(frames)
        return [b"|".join(f if isinstance(f, bytes) else f.encode() for f in frames)]

    def ping(self) -> Frame | None:
        return None


class Sock:
    """The socket's own transport, as a sink: records the bytes written straight into it."""

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class Direct:
    """A scripted DirectTransport: records every call; the test opens, pauses, drains it."""

    framed = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.sock = Sock()
        self.writable = False  # until the handshake is answered
        self.sink: Any = None
        self.on_drain: Any = None
        self.on_sink: Any = None

    # what the protocol does on its own events
    def accepted(self) -> None:
        self.writable, self.sink = True, self.sock
        if self.on_sink is not None:
            self.on_sink()

    def pause(self) -> None:
        self.writable, self.sink = False, None
        if self.on_sink is not None:
            self.on_sink()

    def drain(self) -> None:
        self.accepted()
        if self.on_drain is not None:
            self.on_drain()

    # the DirectTransport interface
    def write_frames(self, frames: list[Frame]) -> None:
        self.calls.append(("write_frames", list(frames)))

    def write_frame(self, frame: Frame) -> None:
        self.calls.append(("write_frame", frame))

    def finish(self, frames: list[Frame], code: int, reason: str, timeout: float) -> None:
        self.calls.append(("finish", list(frames), code, reason))
        self.sink = None

    async def receive(self) -> Frame | None:
        await asyncio.Event().wait()
        return None

    async def send(self, frames: list[Frame]) -> None:
        raise AssertionError("a direct transport's session never awaits send()")

    async def close(self, code: int, reason: str) -> None:
        raise AssertionError("a direct transport's session closes through finish()")


class Asgi:
    """A scripted ASGI-style transport: ``send`` suspends while ``gate`` is not set."""

    framed = False

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.tasks: list[asyncio.Task[Any] | None] = []  # the task each send ran "in"
        self.gone = asyncio.Event()

    async def receive(self) -> Frame | None:
        await self.gone.wait()
        return None

    async def send(self, frames: list[Frame]) -> None:
        self.tasks.append(asyncio.current_task())
        if not self.gate.is_set():
            self.calls.append(("send-suspended", list(frames)))
            await self.gate.wait()
        self.calls.append(("send", list(frames)))

    async def close(self, code: int, reason: str) -> None:
        self.calls.append(("close", code, reason))


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    hub = Hub(MemoryBroker(), Settings(outbox_limit=1024, close_timeout=1))
    yield hub
    await hub.stop()


async def next_iteration() -> None:
    """Let the Flusher's callback (scheduled with call_soon) run."""
    await asyncio.sleep(0)


async def until(condition: Any, iterations: int = 100) -> None:
    """Let the loop run until ``condition()`` holds (no I/O here: a few iterations do)."""
    for _ in range(iterations):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def waiting(session: Session) -> bool:
    """The session's writer task waits with nothing in flight."""
    writer = session.writer
    return isinstance(writer, QueuedWriter) and writer._phase.name == "WAITING"


def session_on(hub: Hub, transport: Any) -> Session:
    session = Session(hub, transport, Joined())
    hub.connect(session)
    return session


# -- the choice of writer --------------------------------------------------------------------


async def test_the_writer_follows_the_transports_one_capability(hub: Hub) -> None:
    direct, asgi = session_on(hub, Direct()), session_on(hub, Asgi())
    assert takes_frames(direct.transport) and not takes_frames(asgi.transport)
    assert type(direct.writer) is DirectWriter and type(asgi.writer) is QueuedWriter
    assert direct.transport.on_drain == direct.writer.flush  # type: ignore[attr-defined]


# -- DirectWriter ----------------------------------------------------------------------------


async def test_direct_frames_queued_before_open_leave_in_one_write_at_open(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    session.enqueue("a")
    session.enqueue(b"b")
    await next_iteration()
    assert transport.calls == []  # CONNECTING: nothing is written before the handshake
    assert session.sink is None
    transport.accepted()
    assert session.sink is None  # something is queued: nothing may overtake it
    session.open()
    assert transport.calls == [("write_frames", [b"a|b"])]
    assert session.connection_state is State.OPEN
    assert session.sink is transport.sock  # now empty: pushes may go straight through


async def test_direct_flush_packs_an_iteration_into_one_write(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    for frame in ("1", "2", "3"):
        session.enqueue(frame)
    assert session.sink is None and transport.calls == []
    await next_iteration()
    assert transport.calls == [("write_frames", [b"1|2|3"])]
    assert session.sink is transport.sock


async def test_direct_send_writes_at_once_only_when_nothing_is_queued(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    session.send("now")
    assert transport.calls == [("write_frame", "now")]
    session.enqueue("queued")
    session.send("after")  # must not overtake "queued"
    assert transport.calls == [("write_frame", "now")]
    await next_iteration()
    assert transport.calls[-1] == ("write_frames", [b"queued|after"])


async def test_direct_paused_socket_queues_until_it_drains(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    transport.pause()
    assert session.sink is None
    session.send("1")
    session.send("2")
    await next_iteration()
    assert transport.calls == []  # paused: the Flusher leaves the outbox alone
    transport.drain()
    assert transport.calls == [("write_frames", [b"1|2"])]
    assert session.sink is transport.sock


async def test_fan_out_writes_a_complete_frame_straight_into_each_sink(hub: Hub) -> None:
    """The hot loop: plain bytes into every open, empty session's socket; a session with a
    queue gets it behind its queue; a closing one gets nothing."""
    transports = [Direct() for _ in range(3)]
    sessions = [session_on(hub, t) for t in transports]
    for transport, session in zip(transports, sessions, strict=True):
        transport.accepted()
        session.open()
    sessions[1].enqueue("reply")
    sessions[2].close(Disconnect(3000, "bye"))
    frame = text_frame(b"pub")
    fan_out(sessions, frame, through=True)
    assert transports[0].sock.data == [b"\x81\x03pub"]
    assert type(transports[0].sock.data[0]) is bytes  # not the WsFrame subclass
    assert transports[1].sock.data == [] and transports[2].sock.data == []
    await next_iteration()
    assert transports[1].calls == [("write_frames", [b"reply|" + frame])]
    assert transports[2].calls == [("finish", [], 3000, "bye")]


async def test_fan_out_queues_when_not_through(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    fan_out([session], text_frame(b"1"), through=False)
    fan_out([session], text_frame(b"2"), through=False)
    assert transport.sock.data == [] and transport.calls == []
    await next_iteration()
    [(_, [packed])] = transport.calls
    assert packed == text_frame(b"1") + b"|" + text_frame(b"2")


async def test_direct_close_writes_the_queue_then_the_close_frame(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    session.enqueue("last")
    session.close(Disconnect(3000, "bye"))
    assert transport.calls == [("finish", ["last"], 3000, "bye")]
    assert session.closing and session.sink is None
    session.enqueue("dropped")  # closing: nothing more is queued
    session.send("dropped")
    await next_iteration()
    assert transport.calls == [("finish", ["last"], 3000, "bye")]


async def test_a_slow_client_is_closed_and_its_queue_dropped(hub: Hub) -> None:
    transport = Direct()
    session = session_on(hub, transport)
    transport.accepted()
    session.open()
    transport.pause()
    session.enqueue("x" * 600)
    session.enqueue("y" * 600)  # 1,200 bytes > outbox_limit (1,024)
    assert transport.calls == [("finish", [], SLOW.code, SLOW.reason)]
    assert hub.metrics.slow_clients == 1 and session.closed_with.code == SLOW.code


# -- the session's states --------------------------------------------------------------------


async def test_illegal_transitions_fail_loudly(hub: Hub) -> None:
    session = session_on(hub, Direct())
    session.open()
    with pytest.raises(IllegalTransition, match="OPEN -> OPEN"):
        session.open()
    session.close(Disconnect(3000, "bye"))
    session.close(Disconnect(3001, "again"))  # already closing: not a transition, a no-op
    assert session.closed_with is not None and session.closed_with.code == 3000
    with pytest.raises(IllegalTransition, match="CLOSING -> OPEN"):
        session.open()


async def test_serve_ends_closed_and_cannot_be_served_again(hub: Hub) -> None:
    transport = Asgi()
    session = session_on(hub, transport)

    async def ignore(session: Session, frame: Frame) -> None:
        return None

    serving = asyncio.create_task(session.serve(ignore))
    await next_iteration()
    assert session.connection_state is State.OPEN
    transport.gone.set()  # the client left
    await serving
    assert session.connection_state is State.CLOSED
    assert session.closed_with is not None
    assert (session.closed_with.code, session.closed_with.reason) == (1000, "client closed")
    assert session not in hub.sessions
    with pytest.raises(RuntimeError):
        await session.serve(ignore)


# -- QueuedWriter (ASGI) ---------------------------------------------------------------------


async def test_queued_writer_sends_from_the_flusher_in_the_writer_tasks_name(hub: Hub) -> None:
    """No task wakes for a send that does not suspend: the Flusher runs it, as the writer
    task (asyncio.current_task() is that task inside send)."""
    transport = Asgi()
    session = session_on(hub, transport)
    serving = asyncio.create_task(session.serve(lambda s, f: asyncio.sleep(0)))
    await until(lambda: waiting(session))  # the writer task starts and waits
    writer = session.writer
    assert isinstance(writer, QueuedWriter)
    session.enqueue("a")
    session.enqueue("b")
    await next_iteration()
    assert transport.calls == [("send", [b"a|b"])]
    assert transport.tasks == [writer._task]
    assert session._pending == 0
    transport.gone.set()
    await serving


async def test_queued_writer_finishes_a_suspended_send_before_later_frames(hub: Hub) -> None:
    transport = Asgi()
    session = session_on(hub, transport)
    serving = asyncio.create_task(session.serve(lambda s, f: asyncio.sleep(0)))
    await until(lambda: waiting(session))
    transport.gate.clear()  # the socket is backed up: the next send suspends
    session.enqueue("1")
    await next_iteration()
    assert transport.calls == [("send-suspended", ["1"])]
    session.enqueue("2")
    session.enqueue("3")
    await next_iteration()
    assert transport.calls == [("send-suspended", ["1"])]  # waits behind the suspended send
    transport.gate.set()
    await until(lambda: len(transport.calls) == 3)
    assert transport.calls == [("send-suspended", ["1"]), ("send", ["1"]), ("send", [b"2|3"])]
    session.close(Disconnect(3000, "bye"))
    await until(lambda: len(transport.calls) == 4)
    assert transport.calls[-1] == ("close", 3000, "bye")
    await serving
    assert session.connection_state is State.CLOSED


async def test_queued_writer_gives_up_on_a_slow_client_stuck_in_send(hub: Hub) -> None:
    transport = Asgi()
    session = session_on(hub, transport)
    serving = asyncio.create_task(session.serve(lambda s, f: asyncio.sleep(0)))
    await until(lambda: waiting(session))
    transport.gate.clear()
    session.enqueue("x" * 600)
    await next_iteration()
    session.enqueue("y" * 600)  # over the limit while the first send is stuck
    assert session.closed_with.code == SLOW.code
    await asyncio.wait_for(serving, 5)
    assert transport.calls == [("send-suspended", ["x" * 600]), ("close", 3008, "slow")]


# -- frames ----------------------------------------------------------------------------------


def test_a_ws_frame_is_the_bytes_websockets_would_send() -> None:
    assert isinstance(text_frame(b"hi"), WsFrame)
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 200)[:4] == b"\x81\x7e\x00\xc8"
    assert text_frame(b"x" * 70_000)[:10] == b"\x81\x7f" + (70_000).to_bytes(8, "big")
