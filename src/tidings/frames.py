"""Server-to-client WebSocket frames, built by hand for the hot path (RFC 6455, section 5.2).

A frame a server sends is trivial: FIN + opcode, the payload length in 7, 7+16 or 7+64 bits, no
mask, the payload. Building it here costs one small ``bytes`` concatenation; going through a
library's frame object costs more than the rest of a delivery (profiles in bench/RESULTS.md).
Everything else (handshake, parsing masked client frames, control frames, close) is left to
``websockets``' sans-I/O protocol. The bytes are identical to what ``websockets`` serializes
for an unmasked, uncompressed frame.
"""

from __future__ import annotations

#: what a session queues and a transport writes: a text (``str``) or binary (``bytes``) message,
#: or a complete frame (:class:`WsFrame`) for a transport that takes frames
Frame = str | bytes

_TEXT = 0x81  # FIN + text
_BINARY = 0x82  # FIN + binary


class WsFrame(bytes):
    """A complete WebSocket frame, header included: a transport writes it as it is. Plain
    ``str``/``bytes`` frames are payloads (text/binary messages) that the transport frames."""

    __slots__ = ()


#: below this size a frame is copied into a plain ``bytes`` to be written (see :func:`wire`)
COPY_BELOW = 4096


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def text_bytes(payload: bytes) -> bytes:
    """A text frame as plain bytes, to write now (no :class:`WsFrame` mark)."""
    return _frame(_TEXT, payload)


def binary_bytes(payload: bytes) -> bytes:
    """A binary frame as plain bytes, to write now."""
    return _frame(_BINARY, payload)


def text_frame(payload: bytes) -> WsFrame:
    """One complete text frame holding ``payload`` (UTF-8 text, not checked)."""
    return WsFrame(_frame(_TEXT, payload))


def binary_frame(payload: bytes) -> WsFrame:
    """One complete binary frame holding ``payload``."""
    return WsFrame(_frame(_BINARY, payload))


def wire(frame: WsFrame) -> bytes:
    """``frame`` as a plain ``bytes`` to write, when that is cheaper: uvloop's ``write`` takes
    a ``bytes`` subclass through a memoryview (two objects made and freed per write), a copy
    of a small frame costs less (bench/RESULTS.md). A large one is written as it is."""
    return bytes(frame) if len(frame) < COPY_BELOW else frame


def payload(frame: bytes) -> bytes:
    """The payload of a frame built here (a :class:`WsFrame`): the frame minus its 2, 4 or
    10-byte header."""
    n = frame[1]
    return frame[2 if n < 126 else 4 if n == 126 else 10 :]


def framed(frame: str | bytes) -> bytes:
    """``frame`` as bytes to write: a :class:`WsFrame` as it is (see :func:`wire`), ``str``
    as a text frame, other ``bytes`` as a binary frame (the meanings ASGI gives them)."""
    kind = type(frame)
    if kind is WsFrame:
        return wire(frame)  # type: ignore[arg-type]
    if kind is str:
        return _frame(_TEXT, frame.encode())  # type: ignore[union-attr]
    return _frame(_BINARY, frame)  # type: ignore[arg-type]
