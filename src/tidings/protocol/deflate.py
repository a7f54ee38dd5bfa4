"""permessage-deflate (RFC 7692) for server-to-client frames built once per publication (sans-I/O).

tidings negotiates the extension with ``server_no_context_takeover`` (RFC 7692, section 7.1.1.1):
every message the server sends is compressed on its own, with no LZ77 window carried over from
the previous one. A compressed message then means the same thing on every connection that
negotiated the extension, so the fan-out compresses a publication ONCE and writes the same
compressed frame to every such subscriber, as it writes the same plain frame to the others.
(With context takeover, as uvicorn's own protocols negotiate it, every connection has its own
compressor and a publication is compressed once per subscriber.)

It also asks for ``client_no_context_takeover`` (section 7.1.1.2: a server may include it even
if the offer does not): a connection then keeps no inflate window between messages, so an idle
connection costs no zlib state. Incoming frames are inflated by ``websockets``' own
``PerMessageDeflate`` (``tidings serve``'s :mod:`tidings.serve.websocket`), which stops at the
connection's message size limit: a small frame that inflates past ``max_message_size`` closes
the connection 1009.

Messages shorter than ``compression_min_size`` bytes go uncompressed (RSV1 clear), which the
extension allows per message (section 6): deflate cannot shrink a short message by much and
the client's inflate would cost more than the bytes saved.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from ..frames import WsFrame, text_frame

if TYPE_CHECKING:
    from ..config import ChannelOptions, Settings

_TEXT_COMPRESSED = 0xC1  # FIN + RSV1 ("per-message compressed", RFC 7692 section 6) + text
_TAIL = b"\x00\x00\xff\xff"  # the empty stored block a flush ends with (section 7.2.1)


def offered(settings: Settings) -> bool:
    """Whether ``tidings serve`` accepts permessage-deflate at all: the global ``compression``
    setting is on, or some namespace (``[defaults]`` included) asks for ``compression = true``.
    Otherwise the extension is declined and clients send and receive plain frames."""
    if settings.compression:
        return True
    options = [settings.defaults, *settings.namespaces.values()]
    return any(o.compression for o in options)


def compressed(settings: Settings, options: ChannelOptions) -> bool:
    """Whether a channel's publications go compressed to clients that negotiated deflate: the
    namespace's ``compression`` if set, else the global ``compression`` setting."""
    if options.compression is None:
        return settings.compression
    return options.compression


class Compressor:
    """Compresses one message at a time, each on its own (no context takeover).

    One zlib stream is reused for every message: a full flush (``Z_FULL_FLUSH``) ends each
    message on a byte boundary *and* resets the LZ77 window, so the next message refers to
    nothing before it and a fresh inflater decodes it alone, which is what
    ``server_no_context_takeover`` promises. Reusing the stream saves zlib's allocation
    (~260 KiB with the default ``memLevel``, zlib's documented figure) per message; it is made
    on the first message. Not thread-safe: one per hub.

    ``level``: zlib's 1 (fastest) to 9 (smallest). ``min_size``: bytes; shorter payloads are
    framed uncompressed."""

    __slots__ = ("_zlib", "level", "min_size")

    def __init__(self, level: int = 1, min_size: int = 0) -> None:
        if not 1 <= level <= 9:
            raise ValueError("compression level must be between 1 and 9")
        self.level = level
        self.min_size = min_size
        # made on first use: a hub whose clients never negotiate deflate allocates nothing
        self._zlib: Any = None

    def compress(self, payload: bytes) -> bytes:
        """``payload`` as the compressed data of one message (RFC 7692 section 7.2.1: the
        DEFLATE blocks without the trailing ``00 00 ff ff`` the receiver appends again)."""
        z = self._zlib
        if z is None:
            z = self._zlib = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        data: bytes = z.compress(payload) + z.flush(zlib.Z_FULL_FLUSH)
        return data[:-4] if data.endswith(_TAIL) else data

    def text_frame(self, payload: bytes) -> WsFrame:
        """One complete text frame for ``payload`` (UTF-8): compressed (RSV1 set) if it is at
        least ``min_size`` bytes, else plain."""
        if len(payload) < self.min_size:
            return text_frame(payload)
        return compressed_frame(self.compress(payload))


def compressed_frame(data: bytes) -> WsFrame:
    """A text frame with RSV1 set around already compressed ``data`` (unmasked, final)."""
    n = len(data)
    if n < 126:
        header = bytes((_TEXT_COMPRESSED, n))
    elif n < 65536:
        header = bytes((_TEXT_COMPRESSED, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((_TEXT_COMPRESSED, 127)) + n.to_bytes(8, "big")
    return WsFrame(header + data)


def is_compressed(frame: bytes) -> bool:
    """Whether a frame built here has RSV1 set (its payload is compressed)."""
    return bool(frame[0] & 0x40)


__all__ = [
    "Compressor",
    "compressed",
    "compressed_frame",
    "is_compressed",
    "offered",
]
