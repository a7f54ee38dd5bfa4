"""uvicorn's httptools protocol with corked writes: one ``write`` per response, not two.

uvicorn writes a response's head and its body in two ``transport.write`` calls, two syscalls;
profiled under publish load they were most of the server's CPU per request (bench/RESULTS.md).
Here writes made during one event-loop iteration are joined and leave in one call at the end of
it (as several pipelined responses do). A WebSocket upgrade gets the real transport, so the
fast WebSocket path writes directly. Used by `tidings serve` when httptools is installed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from .. import eager
from ..api import Reply, target_too_long
from ._internals import INVALID_REQUEST, STATUS_LINE, HttpToolsProtocol, uvicorn_fits
from .front import INTERNAL_ERROR, Answer, Front

log = logging.getLogger("tidings.http")

#: longest request target (path and query string) accepted, in bytes; a longer one is answered
#: 414 and the connection closed, before any routing or application code sees it. Room for a
#: large JWT in ``?token=`` (browsers cannot set WebSocket headers) and then some; nginx's
#: default (``large_client_header_buffers``) is 8 KiB.
MAX_TARGET = 16 * 1024



def closing_answer(reply: Reply, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A final answer's bytes: ``reply``'s status and JSON body, the server's default headers
    (``server``, ``date``) and ``connection: close`` (the request is not read any further)."""
    status, body = reply
    head = [STATUS_LINE[status]]
    head += [b"%s: %s\r\n" % h for h in default_headers]
    head.append(
        b"content-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % len(body)
    )
    return b"".join(head) + body


class _OwnRefusals(logging.Filter):
    """Drops uvicorn's "Invalid HTTP request received." WARNING when the parser error is one a
    callback raised on purpose to refuse a request (414, 431): that request is answered with
    its own status and JSON error, it was not invalid HTTP, and a client sending such requests
    on purpose should not fill the log. Any other parser error is still logged."""

    #: a callback is stopping the parser on purpose; cleared by the next send_400_response
    #: (called right after uvicorn's warning), so it never outlives the one refusal
    refusing = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_OwnRefusals.refusing and record.msg == INVALID_REQUEST)


logging.getLogger("uvicorn.error").addFilter(_OwnRefusals())


def refusal_begins() -> None:
    """Say that the parser error about to be raised is a refusal (:class:`_OwnRefusals`)."""
    _OwnRefusals.refusing = True


def refusal_answered() -> None:
    """The refusal reached ``send_400_response``: log parser errors as usual again."""
    _OwnRefusals.refusing = False


class TargetTooLong(Exception):
    """Raised from the parser's URL callback to stop parsing a target over MAX_TARGET."""


class Cork:
    """Transport proxy: writes are joined and leave once per loop iteration, or (``held``)
    when the holder flushes."""

    __slots__ = ("chunks", "held", "loop", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.chunks: list[bytes] = []
        self.held = False
        self.loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self.chunks and not self.held:
            self.loop.call_soon(self.flush)
        self.chunks.append(data)

    def flush(self) -> None:
        chunks = self.chunks
        if chunks:
            self.chunks = []
            if not self.transport.is_closing():
                self.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:  # asked twice per response: not through __getattr__
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class CorkedHttpTools(HttpToolsProtocol):
    """`tidings serve`'s HTTP protocol: uvicorn's, writing once per response."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(Cork(transport))  # type: ignore[arg-type]

    def handle_websocket_upgrade(self) -> None:
        cork = self.transport
        if isinstance(cork, Cork):
            cork.flush()
            self.transport = cork.transport
        super().handle_websocket_upgrade()


class _Body:
    """The request body as the HttpApi reads it: ``await body(limit)``."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None) -> None:
        self.data = data

    async def __call__(self, limit: int) -> bytes | None:
        data = self.data
        return data if data is not None and len(data) <= limit else None


class _Headers(Mapping[str, str]):
    """The request's headers as the HttpApi reads them (a name's first value, as starlette's
    ``Headers``), decoded only when asked for: it asks for two or three of them."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw  # names already lower-case (uvicorn's on_header)

    def get(self, key: str, default: Any = None) -> Any:
        name = key.encode("latin-1")
        for n, v in self.raw:
            if n == name:
                return v.decode("latin-1")
        return default

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return str(value)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(n.decode("latin-1") for n, _ in self.raw))

    def __len__(self) -> int:
        return len({n for n, _ in self.raw})


class _Answering:
    """Stands in for uvicorn's request cycle while an answer waits (a networked broker):
    uvicorn queues pipelined requests behind it, and marks it on disconnect or shutdown."""

    __slots__ = ("disconnected", "keep_alive", "response_complete")

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False

    @property
    def message_event(self) -> _Answering:
        return self  # connection_lost() sets it: nothing waits on it here

    def set(self) -> None:
        pass


def _front(app: Any) -> Front | None:
    """The Front under uvicorn's middleware wrappers, if the app is `tidings serve`'s."""
    for _ in range(8):
        if isinstance(app, Front):
            return app
        app = getattr(app, "app", None)
    return None


class FastHttp(CorkedHttpTools):
    """`tidings serve`'s HTTP protocol: answers the publishing routes itself.

    uvicorn answers every request through an ASGI cycle: a task, an ``asyncio.Event``, message
    dicts, starlette's Request and Response; under publish load that was over half of the CPU
    (bench/RESULTS.md). ``POST /api/{method}`` and ``POST /publish/{channel}`` go here straight
    from httptools' callbacks to :class:`~tidings.api.HttpApi` (the code the FastAPI routes
    call), run eagerly when the broker never suspends, and the response is written in the same
    loop iteration, right after the publication's frames (see :meth:`data_received`). Any
    request that needs more (``Expect: 100-continue``, a body declared over the limit, one
    pipelined behind a request still being answered, a paused socket) takes uvicorn's path to
    the same code. Anything else is uvicorn's, unchanged.

    The keep-alive timeout is kept lazily: one timer per idle spell that checks when the
    connection was last answered, not a timer armed after every response and cancelled by the
    next request.
    """

    _served: tuple[list[tuple[bytes, bytes]], bytes] = ([], b"")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        front = _front(self.app)
        if self.root_path or self.limit_concurrency is not None or self.access_log:
            front = None  # settings this path does not implement: uvicorn's path does
        if front is not None and not uvicorn_fits(self):
            front = None
        self.front = front
        self.eager = front is not None and front.http.hub.broker.synchronous
        self.flusher = front.http.hub.flusher if front is not None else None
        self.max_body = max(front.http.text_limit, front.http.api_limit) if front else 0
        self.answer: Answer | None = None
        self.answering: _Answering | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.declared = 0  # Content-Length
        self.keep_alive = True
        self.idle_since: float | None = None
        #: the server is stopping: the request being read is the last one answered
        self.stopping = False
        self.too_long = False

    def on_url(self, url: bytes) -> None:
        if self.discarding:  # behind a closing answer: parsed, never executed
            return
        # httptools hands the target over in pieces and keeps no bound: without one, a
        # request line could grow until the peer stops sending
        self.url += url
        if len(self.url) > MAX_TARGET:
            self.too_long = True
            self.url = b""
            refusal_begins()
            raise TargetTooLong

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a parser error; 414 when it was a target over MAX_TARGET."""
        refusal_answered()
        if not self.too_long:
            super().send_400_response(msg)
            return
        self.transport.write(
            closing_answer(target_too_long(MAX_TARGET), self.server_state.default_headers)
        )
        self.transport.close()
        #: the request being parsed arrived behind a response that closed the connection
        #: (HTTP/1.0, ``Connection: close``): it cannot be answered, so it is not executed
        self.discarding = False

    def data_received(self, data: bytes) -> None:
        """Answers written while parsing ``data`` (several, if pipelined) leave in one write
        at the end: at once, or, when publications are queued for the Flusher, right after it
        (its callback was scheduled first). A publisher is answered once its publication is in
        the subscribers' sockets, so it cannot run ahead of the fan-out and pile messages up:
        answering at once raised the p99 latency at 5,000 subscribers well above the raw
        ceiling's, which answers after its writes (bench/RESULTS.md, "Figures behind the
        code"; docs/delivery.md)."""
        cork: Any = self.transport  # a Cork until a WebSocket upgrade
        if type(cork) is not Cork:
            super().data_received(data)
            return
        cork.held = True
        try:
            super().data_received(data)
        finally:
            cork.held = False
            if cork.chunks:
                if self.flusher is not None and self.flusher.pending:
                    cork.loop.call_soon(cork.flush)
                else:
                    cork.flush()

    def on_message_begin(self) -> None:
        # Requests pipelined behind one whose answer closed the connection are parsed from
        # the same read, but nobody will hear their answer: executing them would make a
        # client that retries do it twice (uvicorn's own path queues them and never runs them).
        self.discarding = self.transport.is_closing()
        if self.discarding:
            return
        if self.front is None:
            super().on_message_begin()
        else:  # uvicorn's scope is built in on_headers_complete, only if uvicorn needs it
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self.declared = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.discarding:
            return
        name = name.lower()
        if name == b"content-length":
            self.declared = int(value) if value.isdigit() else 0
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.discarding:
            return
        if self.front is not None:
            if self._take(self.front):
                return
            url, headers, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.headers, self.expect_100_continue = url, headers, expect
            self.scope["headers"] = headers
        super().on_headers_complete()

    def _take(self, front: Front) -> bool:
        """Answer this request here? Only the hot routes, and only when nothing is ahead."""
        parser = self.parser
        if parser.get_method() != b"POST" or self.expect_100_continue or parser.should_upgrade():
            return False
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.pipeline:
            return False
        if self.flow.write_paused or self.declared > self.max_body:
            # uvicorn's cycle waits for the client to read; and answers a body declared too
            # large without reading it
            return False
        answer = front.route_target(self.url)
        if answer is None:
            return False
        self.answer = answer
        self.chunks = []
        self.size = 0
        return True

    def on_body(self, body: bytes) -> None:
        if self.discarding:
            return
        if self.answer is None:
            super().on_body(body)
            return
        self.size += len(body)
        if self.size <= self.max_body:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.discarding:
            return
        answer = self.answer
        if answer is None:
            super().on_message_complete()
            return
        self.answer = None
        parser = self.parser
        self.keep_alive = keep_alive = (
            parser.should_keep_alive() and parser.get_http_version() != "1.0" and not self.stopping
        )
        chunks = self.chunks
        body = None
        if self.size <= self.max_body:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        coro = answer(_Headers(self.headers), _Body(body))
        if not eager.run(coro, self._answered, eager=self.eager, tasks=self.tasks):
            self.cycle = self.answering = _Answering(keep_alive)  # type: ignore[assignment]

    def _answered(self, reply: Reply | None, exc: BaseException | None) -> None:
        state = self.answering
        if state is not None:  # it had to wait
            self.answering = None
            state.response_complete = True
            if state.disconnected:
                return
            keep_alive = state.keep_alive
        else:
            keep_alive = self.keep_alive
        if exc is not None or reply is None:
            if not isinstance(exc, Exception):  # cancelled: the server is going away
                self.transport.close()
                return
            log.error("error in POST %s", self.url.decode("latin-1"), exc_info=exc)
            status, body, content_type = INTERNAL_ERROR
        else:
            status, body = reply
            content_type = b"application/json"
        transport = self.transport
        if transport.is_closing():
            return
        served = FastHttp._served
        if served[0] is not self.server_state.default_headers:  # uvicorn renews it every second
            default = self.server_state.default_headers
            served = FastHttp._served = (default, b"".join(b"%s: %s\r\n" % h for h in default))
        transport.write(
            b"%s%scontent-length: %d\r\ncontent-type: %s\r\n%s\r\n%s"
            % (
                STATUS_LINE[status],
                served[1],
                len(body),
                content_type,
                b"" if keep_alive else b"connection: close\r\n",
                body,
            )
        )
        if not keep_alive:
            transport.close()
        self.on_response_complete()

    # -- keep-alive, lazily ------------------------------------------------------------------

    def on_response_complete(self) -> None:
        """uvicorn's (count it, start the next pipelined request), with a lazy idle timer."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self.idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _unset_keepalive_if_required(self) -> None:
        """uvicorn calls this when data arrives: the connection is busy, not idle."""
        self.idle_since = None

    def timeout_keep_alive_handler(self) -> None:
        self.timeout_keep_alive_task = None
        since = self.idle_since
        if since is None or self.transport.is_closing():
            return  # busy: the end of its response arms the timer again
        left = since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(
                left, self.timeout_keep_alive_handler
            )
        else:
            self.transport.close()

    def shutdown(self) -> None:
        """The server is stopping: a request this path is still reading (its body not all
        in yet) is answered, with ``connection: close``, as uvicorn does for its own cycle;
        an idle connection closes now."""
        if self.answer is not None:
            self.stopping = True
        else:
            super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
