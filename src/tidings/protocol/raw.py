"""The seed-style protocol: one publication per WebSocket text frame, nothing else.

A publication whose data is a JSON string arrives as that string's value, as-is; any other JSON
value arrives serialized. Text a client sends is published to its channel as a JSON string,
when the channel allows client publishing. Heartbeats are the transport's WebSocket pings.
"""

from __future__ import annotations

import orjson

from ..brokers.base import JoinLeave, Publication
from ..errors import SERVICE_RESTART
from ..frames import Frame, text_frame
from .deflate import Compressor


def text_of(data: bytes) -> str:
    """The text a raw subscriber sees for JSON ``data``."""
    if data[:1] == b'"':
        value = orjson.loads(data)
        if isinstance(value, str):
            return value
    return data.decode()


class RawText:
    """Raw format for transports that take text (ASGI): frames are ``str``."""

    __slots__ = ()

    #: how a stopping node closes a raw client: 1012, as stock uvicorn does, so a raw client
    #: sees one code whichever server runs tidings (Centrifugo clients get 3001 shutdown)
    going_away = SERVICE_RESTART

    def push(self, publication: Publication) -> Frame:
        return text_of(publication.data)

    def join_leave(self, event: JoinLeave) -> Frame | None:
        return None

    def pack(self, frames: list[Frame]) -> list[Frame]:
        return frames

    def ping(self) -> Frame | None:
        return None


class RawFramed(RawText):
    """Raw format for the fast transport: each push is a complete WebSocket text frame, built
    once per publication and shared by every subscriber; a batch leaves in one write."""

    __slots__ = ()

    def push(self, publication: Publication) -> Frame:
        return text_frame(text_bytes(publication.data))


class RawDeflate(RawFramed):
    """The fast transport's raw format for a connection that negotiated permessage-deflate, in
    a channel whose namespace compresses: a push of at least ``compression_min_size`` bytes is
    one compressed frame per publication, shared by every such subscriber (:mod:`.deflate`).
    One per hub (its compressor is not shared across hubs or threads)."""

    __slots__ = ("_compressor",)

    def __init__(self, compressor: Compressor) -> None:
        self._compressor = compressor

    def push(self, publication: Publication) -> Frame:
        return self._compressor.text_frame(text_bytes(publication.data))


def text_bytes(data: bytes) -> bytes:
    """The UTF-8 text a raw subscriber sees for JSON ``data``."""
    if data[:1] == b'"' and data[-1:] == b'"' and b"\\" not in data:
        # a JSON string without escapes: its UTF-8 text is what lies between the quotes
        return data[1:-1]
    return text_of(data).encode()


RAW_TEXT = RawText()
RAW_FRAMED = RawFramed()


def raw_format(framed: bool) -> RawText:
    """The raw wire format for a transport that does (fast) or does not (ASGI) take frames."""
    return RAW_FRAMED if framed else RAW_TEXT
