"""HTTP streaming transports over ASGI: one long response body carries what the server sends.

Centrifugo's fallback and unidirectional transports (``http_stream``, ``sse``, ``uni_http_stream``,
``uni_sse``) share this transport; they differ in how one packed frame is written to the body
(:data:`LINES`, :data:`EVENTS`) and in the push that says why the stream ended (their framing's
``disconnect``). It is a :class:`~tidings.delivery.Transport` that takes text
(``framed = False``), so sessions on it get a :class:`~tidings.delivery.QueuedWriter`: the same
outbox, limits, slow-client close and encode-once fan-out as WebSocket sessions. Its ASGI
``send`` applies the socket's backpressure, so a client that stops reading fills its own outbox
and is closed as slow (3008); nobody else waits.

What the client sends after the request arrives by other ways (the ``/emulation`` endpoint, see
:mod:`tidings.streaming`), so :meth:`StreamTransport.receive` reads an inbox that
:meth:`StreamTransport.deliver` fills; it returns None once the ASGI server reports the client
gone (``http.disconnect``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import Receive, Send

from ..frames import Frame

#: response headers every stream sends: no caching, no proxy buffering (nginx reads
#: ``X-Accel-Buffering``), as Centrifuge's handlers send them
NO_CACHE = [
    (b"cache-control", b"private, no-cache, no-store, must-revalidate, max-age=0"),
    (b"pragma", b"no-cache"),
    (b"expires", b"0"),
    (b"x-accel-buffering", b"no"),
]

#: frames an emulated session may have waiting to be handled (more: the emulation endpoint
#: answers 429 and the client's commands are its own problem, not the node's memory)
INBOX_LIMIT = 64


def _line(frame: Frame) -> bytes:
    data = frame.encode() if isinstance(frame, str) else frame
    return data + b"\n"


def _event(frame: Frame) -> bytes:
    text = frame if isinstance(frame, str) else frame.decode()
    # an SSE event's data spans one "data:" line per line; EventSource joins them with "\n"
    return b"data: " + text.replace("\n", "\ndata: ").encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Framing:
    """How one stream kind writes: ``write(frame) -> bytes`` for each packed frame,
    ``content_type`` of the response, ``preamble`` sent with the headers, and
    ``disconnect(code, reason) -> frame``: the last thing written (None: nothing)."""

    write: Callable[[Frame], bytes]
    content_type: bytes
    preamble: bytes = b""
    disconnect: Callable[[int, str], Frame] | None = None

    def with_disconnect(self, disconnect: Callable[[int, str], Frame]) -> Framing:
        return Framing(self.write, self.content_type, self.preamble, disconnect)


#: newline-delimited JSON (``http_stream``, ``uni_http_stream``): one frame per line
LINES = Framing(_line, b"application/x-ndjson")
#: Server-Sent Events (``sse``, ``uni_sse``): one frame per event; the preamble (an empty
#: line, as Centrifuge sends) makes proxies and EventSource see the stream open at once
EVENTS = Framing(_event, b"text/event-stream; charset=utf-8", b"\r\n")


class StreamTransport:
    """One streaming HTTP response, as a session's transport.

    ``receive``/``send``: the request's ASGI callables (its body already read);
    ``framing``: how frames are written (:data:`LINES`, :data:`EVENTS`)."""

    __slots__ = ("_receive", "_send", "_watcher", "closed", "framing", "inbox", "started")

    #: frames are payloads (``str``), not pre-built WebSocket frames: a QueuedWriter sends them
    framed = False

    def __init__(self, receive: Receive, send: Send, framing: Framing) -> None:
        self._receive = receive
        self._send = send
        self.framing = framing
        self.inbox: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._watcher: asyncio.Task[None] | None = None
        self.started = False
        self.closed = False

    async def accept(self, subprotocol: str | None = None) -> None:
        """Send the response head (200, streaming) and start watching for the client leaving."""
        headers = [(b"content-type", self.framing.content_type), *NO_CACHE]
        await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        if self.framing.preamble:
            await self._send(
                {"type": "http.response.body", "body": self.framing.preamble, "more_body": True}
            )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Wait for ``http.disconnect`` (the body was read already): then the reader stops."""
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    break
        except (OSError, RuntimeError):
            pass
        self.closed = True
        self.inbox.put_nowait(None)

    def deliver(self, frame: Frame) -> bool:
        """Hand a frame the client sent by another way (``/emulation``) to the session's reader;
        False if :data:`INBOX_LIMIT` frames are already waiting or the stream ended."""
        if self.closed or self.inbox.qsize() >= INBOX_LIMIT:
            return False
        self.inbox.put_nowait(frame)
        return True

    async def receive(self) -> Frame | None:
        return await self.inbox.get()

    async def send(self, frames: list[Frame]) -> None:
        if self.closed:
            raise RuntimeError("the stream has ended")
        write = self.framing.write
        body = write(frames[0]) if len(frames) == 1 else b"".join(map(write, frames))
        await self._send({"type": "http.response.body", "body": body, "more_body": True})

    async def close(self, code: int, reason: str) -> None:
        """End the stream, telling the client why first (the framing's disconnect push): a
        stream has no close frame to carry the code."""
        if self.closed:
            return
        self.closed = True
        body = b""
        disconnect = self.framing.disconnect
        if disconnect is not None and self.started:
            body = self.framing.write(disconnect(code, reason))
        await self.end(body)

    async def end(self, body: bytes = b"") -> None:
        """Finish the response (once), whatever state it is in; a gone client is no error."""
        self.closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(OSError, RuntimeError):
            await self._send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = ["EVENTS", "INBOX_LIMIT", "LINES", "NO_CACHE", "Framing", "StreamTransport"]
