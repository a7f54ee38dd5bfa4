"""One test per private part of uvicorn, websockets and asyncio that tidings relies on.

Listed in ``tidings.serve._internals`` (uvicorn, websockets) and ``tidings.eager`` (asyncio).
If a release changes one of them, the test naming it fails here, before anything subtler
fails elsewhere; pyproject.toml pins uvicorn and websockets to the releases these pass on.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import zlib
from typing import Any

import pytest
import uvicorn
from uvicorn.server import Server, ServerState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from tidings import eager
from tidings.serve import _internals
from tidings.serve.http import FastHttp
from tidings.serve.websocket import FastWebSocket

HANDSHAKE = (
    b"GET /ws/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(opcode: Opcode, data: bytes, mask: bool = True) -> bytes:
    return Frame(opcode, data).serialize(mask=mask, extensions=[])


def opened(max_size: int | None = 2**20) -> ServerProtocol:
    """A server connection past its handshake, on the frame parser (as FastWebSocket has)."""
    conn = ServerProtocol(max_size=max_size)
    conn.receive_data(HANDSHAKE)
    [request] = conn.events_received()
    assert isinstance(request, Request)
    conn.send_response(conn.accept(request))
    assert b"".join(conn.data_to_send()).startswith(b"HTTP/1.1 101")
    _internals.frames_only(conn)
    return conn


# -- websockets --------------------------------------------------------------------------------


def test_frames_only_parses_frames_and_keeps_nothing_of_the_request() -> None:
    conn = opened()
    frame_locals = conn.parser.gi_frame.f_locals  # type: ignore[attr-defined]
    assert not any(isinstance(v, Request) for v in frame_locals.values())
    conn.receive_data(client_frame(Opcode.TEXT, b"hello"))
    [event] = conn.events_received()
    assert isinstance(event, Frame) and event.opcode is Opcode.TEXT and event.data == b"hello"
    assert not _internals.parser_failed(conn)


def test_limit_incoming_changes_the_limit_after_the_handshake() -> None:
    conn = opened(max_size=2**20)
    _internals.limit_incoming(conn, 5)
    conn.receive_data(client_frame(Opcode.TEXT, b"0123456789"))
    conn.events_received()
    assert _internals.parser_failed(conn)
    assert conn.close_sent is not None and conn.close_sent.code == 1009
    assert b"".join(conn.data_to_send()).startswith(b"\x88")  # the close frame


def test_deflate_negotiated_reads_the_agreed_extension_and_inflates_up_to_the_limit() -> None:
    from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

    def handshake(offer: bytes, factory: ServerPerMessageDeflateFactory) -> ServerProtocol:
        conn = ServerProtocol(max_size=2**20, extensions=[factory])
        conn.receive_data(HANDSHAKE[:-2] + b"Sec-WebSocket-Extensions: " + offer + b"\r\n\r\n")
        [request] = conn.events_received()
        assert isinstance(request, Request)
        conn.send_response(conn.accept(request))
        conn.data_to_send()
        _internals.frames_only(conn)
        return conn

    alone = ServerPerMessageDeflateFactory(
        server_no_context_takeover=True, client_no_context_takeover=True
    )
    conn = handshake(b"permessage-deflate; client_max_window_bits", alone)
    assert _internals.deflate_negotiated(conn)
    # the frame parser inflates with the agreed extension, within the limit set afterwards
    _internals.limit_incoming(conn, 1000)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = z.compress(b"a" * 5000) + z.flush(zlib.Z_SYNC_FLUSH)
    body = bomb[:-4]
    assert len(body) < 126
    conn.receive_data(bytes((0xC1, 0x80 | len(body))) + b"\0\0\0\0" + body)  # RSV1, zero mask
    conn.events_received()
    assert conn.close_sent is not None and conn.close_sent.code == 1009
    # context takeover on the server side: frames built once for all would be wrong there
    assert not _internals.deflate_negotiated(
        handshake(b"permessage-deflate", ServerPerMessageDeflateFactory())
    )
    assert not _internals.deflate_negotiated(opened())  # nothing offered


def test_parser_failed_on_a_protocol_error() -> None:
    conn = opened()
    conn.receive_data(client_frame(Opcode.TEXT, b"x", mask=False))  # clients must mask
    conn.events_received()
    assert _internals.parser_failed(conn)
    assert conn.close_sent is not None and conn.close_sent.code == 1002


def test_close_rcvd_and_the_close_reply() -> None:
    conn = opened()
    conn.receive_data(client_frame(Opcode.CLOSE, b"\x03\xe8bye"))
    conn.events_received()
    assert conn.close_rcvd is not None and conn.close_rcvd.code == 1000
    assert conn.close_sent is not None  # websockets queued the reply itself
    assert b"".join(conn.data_to_send()).startswith(b"\x88")
    assert not _internals.parser_failed(conn)


def test_fail_queues_a_close_frame_with_the_code() -> None:
    conn = opened()
    conn.fail(1011, "keepalive ping timeout")
    assert conn.close_sent is not None and conn.close_sent.code == 1011
    assert b"".join(conn.data_to_send()).startswith(b"\x88")


# -- uvicorn -----------------------------------------------------------------------------------


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


def loaded_config(**options: Any) -> uvicorn.Config:
    config = uvicorn.Config(app=_app, interface="asgi3", **options)
    config.load()
    return config


def test_config_and_server_state_have_the_fields_the_protocols_read() -> None:
    config = loaded_config(ws=FastWebSocket)
    assert [f for f in _internals.CONFIG_FIELDS if not hasattr(config, f)] == []
    assert config.ws_protocol_class is FastWebSocket  # ws= takes a class as it is
    state = ServerState()
    assert [f for f in _internals.SERVER_STATE_FIELDS if not hasattr(state, f)] == []


async def test_the_http_protocol_has_every_part_fast_http_uses() -> None:
    protocol = FastHttp(loaded_config(), ServerState(), {})
    assert [p for p in _internals.HTTP_PARTS if not hasattr(protocol, p)] == []
    _internals._fits.clear()
    assert _internals.uvicorn_fits(protocol)
    assert _internals.STATUS_LINE[200].startswith(b"HTTP/1.1 200 OK")


async def test_a_request_sets_the_per_request_parts() -> None:
    class Sock(asyncio.Transport):
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("127.0.0.1", 1) if name in ("peername", "sockname") else default

        def write(self, data: Any) -> None:
            return None

        def close(self) -> None:
            return None

        def is_closing(self) -> bool:
            return False

    protocol = _internals.HttpToolsProtocol(loaded_config(), ServerState(), {})
    protocol.connection_made(Sock())
    protocol.data_received(b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert [p for p in _internals.HTTP_REQUEST_PARTS if not hasattr(protocol, p)] == []
    assert protocol.url == b"/x?y=1"
    assert (b"host", b"a") in protocol.headers
    for task in list(protocol.tasks):
        task.cancel()


def test_uvicorn_builds_the_ws_protocol_with_keywords_and_shuts_connections_down() -> None:
    """On an upgrade the HTTP protocol builds ``ws_protocol_class(config=, server_state=,
    app_state=)``; on exit the server calls ``shutdown()`` on each of its connections."""
    upgrade = inspect.getsource(_internals.HttpToolsProtocol.handle_websocket_upgrade)
    assert "config=self.config" in upgrade and "server_state=self.server_state" in upgrade
    assert "app_state=self.app_state" in upgrade
    parameters = inspect.signature(FastWebSocket).parameters
    assert {"config", "server_state", "app_state"} <= set(parameters)
    assert "connection.shutdown()" in inspect.getsource(Server.shutdown)


# -- asyncio (tidings.eager, used by the ASGI writer) ------------------------------------------


async def test_step_as_runs_a_step_in_another_tasks_name() -> None:
    seen: list[asyncio.Task[Any] | None] = []
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="outer")

    async def step() -> None:
        seen.append(asyncio.current_task())
        assert var.get() == "inner"
        await asyncio.sleep(0)

    gate = asyncio.Event()
    writer = asyncio.get_running_loop().create_task(gate.wait())
    context = contextvars.copy_context()
    context.run(var.set, "inner")
    result: list[Any] = []
    # from a loop callback (no task running), as the Flusher calls it
    asyncio.get_running_loop().call_soon(
        lambda: result.append(eager.step_as(writer, context, step))
    )
    await asyncio.sleep(0.01)
    [stepped] = result
    assert stepped is not None
    coro, _step, error = stepped
    assert seen == [writer] and error is None and coro is not None  # suspended in sleep(0)
    coro.close()
    assert asyncio.current_task() is not writer
    # inside a running task: asyncio refuses to enter another, step_as says so
    assert eager.step_as(writer, context, step) is None
    gate.set()
    await writer


@pytest.mark.parametrize("private", ["_enter_task", "_leave_task"])
def test_asyncio_still_has_the_task_privates(private: str) -> None:
    assert eager.EAGER
    assert callable(getattr(asyncio.tasks, private))
