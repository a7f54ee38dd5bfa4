"""Centrifugo client protocol v2, JSON flavour: the wire codec (sans-I/O).

A WebSocket text frame holds one or more JSON objects separated by ``\\n``. Commands carry an
``id`` and one method field (``connect``, ``subscribe``, ...); replies echo the ``id``; pushes
have none; ``{}`` is a ping (server to client) or a pong (client to server). Protobuf ``bytes``
fields (``data``, ``info``) carry raw embedded JSON, so publication bytes are spliced in with
:class:`orjson.Fragment`, never decoded. Empty fields are omitted.

The encoders here build each push once per publication for every Centrifugo subscriber on the
node: a push names the channel and the publication and nothing per subscriber. On a direct
transport (`tidings serve`) the push is built as a complete WebSocket frame, so it is not framed
again per subscriber either (:class:`CentrifugeFramed`). The encoders cache the last push they
built, so each hub has its own (:class:`CentrifugeEncoders`): none is shared across a process.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any

import orjson

from ..brokers.base import ClientInfo, JoinLeave, Publication
from ..errors import BAD_REQUEST, BadRequest, CloseReason, Disconnect, TidingsError
from ..frames import Frame, payload, text_frame
from .deflate import Compressor
from .depth import MAX_DEPTH, too_deep

PING = "{}"

try:
    #: the server version ``connect`` and ``refresh`` replies report
    VERSION = metadata.version("tidings")
except metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0"

#: every method a client may send, with the name of its reply field
METHODS = (
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "presence",
    "presence_stats",
    "history",
    "ping",
    "send",
    "rpc",
    "refresh",
    "sub_refresh",
)

#: largest command id: Centrifugo's protocol declares it uint32
MAX_ID = 2**32 - 1
#: largest offset or limit a client or API caller may give: 2**53 - 1, the largest integer
#: every JSON reader (JavaScript's Number.MAX_SAFE_INTEGER, Lua's doubles in Redis scripts)
#: holds exactly; stream offsets of a real channel stay far below it
MAX_INTEGER = 2**53 - 1

UNSUPPORTED_BINARY = CloseReason(3501, "bad request: binary frame on a JSON connection")


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded command: its id (0 for ``send``), method name and request object;
    ``error``: why it is refused without running (its reply is that error), if it is."""

    id: int
    method: str
    request: dict[str, Any]
    error: TidingsError | None = None


def decode(frame: Frame) -> list[Command | None]:
    """The commands in one frame, in order; None stands for a pong (``{}``).

    Anything that is not valid protocol closes the connection with 3501, as Centrifugo does:
    a binary frame, bad JSON, a non-object, no known method, or no id on a method that has a
    reply."""
    if isinstance(frame, bytes):
        raise UNSUPPORTED_BINARY()
    if too_deep(frame):
        raise Disconnect(3501, f"bad request: JSON nested more than {MAX_DEPTH} levels deep")
    out: list[Command | None] = []
    for line in frame.split("\n"):
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise Disconnect(3501, "bad request: invalid JSON") from None
        if not isinstance(obj, dict):
            raise Disconnect(3501, "bad request: a command must be a JSON object")
        if not obj:
            out.append(None)
            continue
        out.append(_command(obj))
    return out


def _command(obj: dict[str, Any]) -> Command:
    cid = obj.get("id", 0)
    if not isinstance(cid, int) or isinstance(cid, bool) or not 0 <= cid <= MAX_ID:
        raise BAD_REQUEST()
    for method in METHODS:
        request = obj.get(method)
        if request is not None:
            if not isinstance(request, dict):
                raise Disconnect(3501, f"bad request: {method} must be an object")
            if cid == 0 and method != "send":
                raise Disconnect(3501, "bad request: command id required")
            return Command(cid, method, request)
    raise Disconnect(3501, "bad request: unknown method")


# -- fields of a request -------------------------------------------------------------------------


def channel_name(request: dict[str, Any]) -> str:
    """The request's ``channel``; a missing or empty one closes the connection (3501)."""
    name = request.get("channel")
    if not isinstance(name, str) or not name:
        raise Disconnect(3501, "bad request: channel required")
    return name


def non_negative(value: Any, name: str) -> int:
    """An optional integer field in 0..:data:`MAX_INTEGER` (missing: 0); BadRequest (107)
    otherwise."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INTEGER:
        raise BadRequest(f"{name} must be a non-negative integer, at most {MAX_INTEGER}")
    return value


def limit(value: Any, name: str = "limit") -> int | None:
    """An optional history limit, as Centrifugo reads it: missing or 0 for none (only the
    position), negative for all (None), else at most that many; an integer within
    ±:data:`MAX_INTEGER`, BadRequest (107) otherwise."""
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_INTEGER:
        raise BadRequest(f"{name} must be an integer from -{MAX_INTEGER} to {MAX_INTEGER}")
    return None if value < 0 else value


# -- outgoing ------------------------------------------------------------------------------------


def raw(data: bytes | None) -> orjson.Fragment | None:
    """Embed JSON bytes as they are."""
    return orjson.Fragment(data) if data else None


def compact(obj: dict[str, Any]) -> dict[str, Any]:
    """Drop empty fields, as the protocol's JSON form does."""
    return {k: v for k, v in obj.items() if v not in (None, "", 0, False, [], {})}


def client_info(info: ClientInfo) -> dict[str, Any]:
    return compact(
        {
            "user": info.user,
            "client": info.client,
            "conn_info": raw(info.conn_info),
            "chan_info": raw(info.chan_info),
        }
    )


def publication(pub: Publication) -> dict[str, Any]:
    out: dict[str, Any] = {"data": orjson.Fragment(pub.data)}
    if pub.offset:
        out["offset"] = pub.offset
    if pub.info is not None:
        out["info"] = client_info(pub.info)
    if pub.tags:
        out["tags"] = pub.tags
    return out


def dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def reply(cid: int, method: str, result: dict[str, Any]) -> str:
    return dumps({"id": cid, method: result})


#: errors a client should retry (SDKs resubscribe later instead of giving up), as in Centrifugo
TEMPORARY = frozenset({100, 111})


def error_reply(cid: int, exc: TidingsError) -> str:
    error: dict[str, Any] = exc.as_dict()
    if exc.code in TEMPORARY:
        error["temporary"] = True
    return dumps({"id": cid, "error": error})


def push_bytes(channel: str, kind: str, body: dict[str, Any]) -> bytes:
    """A push to the client as UTF-8 JSON: ``kind`` is pub, join, leave, subscribe, refresh..."""
    inner: dict[str, Any] = {"channel": channel} if channel else {}
    inner[kind] = body
    return orjson.dumps({"push": inner})


def push(channel: str, kind: str, body: dict[str, Any]) -> str:
    """A push to the client as text (the frames a connection queues itself)."""
    return push_bytes(channel, kind, body).decode()


def uni_push_bytes(channel: str, kind: str, body: dict[str, Any]) -> bytes:
    """A push as the unidirectional transports send it: the push object itself, without the
    ``{"push": ...}`` wrapper (Centrifugo's ``encodeReply`` on a unidirectional transport)."""
    inner: dict[str, Any] = {"channel": channel} if channel else {}
    inner[kind] = body
    return orjson.dumps(inner)


#: what every wrapped push starts with (:func:`push_bytes`)
_WRAPPED = '{"push":'


def unwrap(frame: str) -> str:
    """A wrapped push (:func:`push`) as a unidirectional transport sends it; anything else as
    it is."""
    return frame[len(_WRAPPED) : -1] if frame.startswith(_WRAPPED) else frame


class _LastPush:
    """The frame of the most recent publication, shared by the two encoders of one variant of
    one :class:`CentrifugeEncoders`; and (framed variant) the last batch packed with what it
    packed into. Mutable: never shared between hubs (they may run on different threads)."""

    __slots__ = ("batch", "frame", "packed", "pub")

    def __init__(self) -> None:
        self.pub: Publication | None = None
        self.frame: Frame = ""
        self.batch: list[Frame] = []
        self.packed: Frame = ""


class CentrifugeJson:
    """The hub's :class:`~tidings.hub.Encoder` and the session's wire format, for transports
    that take text (ASGI): pushes are ``str``.

    Made in pairs by :class:`CentrifugeEncoders`, one pair per variant and hub: one pushes
    join/leave events, one does not, so the hub's grouping by encoder decides per subscription
    who gets them. Both share the last encoded publication, so each publication is still
    encoded once per node and variant."""

    __slots__ = ("_last", "_pair", "with_join_leave")

    #: the client answers pings (``{}``) with pongs; unidirectional clients cannot
    expects_pong = True

    def __init__(self, with_join_leave: bool, last: _LastPush) -> None:
        self.with_join_leave = with_join_leave
        self._last = last
        self._pair: tuple[CentrifugeJson, CentrifugeJson] = (self, self)

    @classmethod
    def pair(cls) -> CentrifugeJson:
        """A new pair sharing one cache: the encoder without join/leave (its sibling with them
        is ``.encoder(True)``)."""
        last = _LastPush()
        plain, with_join_leave = cls(False, last), cls(True, last)
        plain._pair = with_join_leave._pair = (plain, with_join_leave)
        return plain

    def encoder(self, join_leave: bool, compress: bool = False) -> CentrifugeJson:
        """The encoder of this pair for a subscription with or without join/leave pushes.
        ``compress``: the channel's namespace wants compression (only a format whose
        connection negotiated permessage-deflate has a compressing encoder to give)."""
        return self._pair[join_leave]

    def _frame(self, data: bytes) -> Frame:
        """A push as this variant queues it (text here)."""
        return data.decode()

    def _push(self, channel: str, kind: str, body: dict[str, Any]) -> bytes:
        """A push's bytes as this variant sends it (wrapped in ``{"push": ...}`` here)."""
        return push_bytes(channel, kind, body)

    def push(self, pub: Publication) -> Frame:
        last = self._last
        if last.pub is not pub:
            last.frame = self._frame(self._push(pub.channel, "pub", publication(pub)))
            last.pub = pub
        return last.frame

    def join_leave(self, event: JoinLeave) -> Frame | None:
        if not self.with_join_leave:
            return None
        kind = "join" if event.join else "leave"
        return self._frame(self._push(event.channel, kind, {"info": client_info(event.info)}))

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Every queued reply and push in one WebSocket frame, newline-separated."""
        if len(frames) == 1:
            return frames
        return ["\n".join(f if isinstance(f, str) else f.decode() for f in frames)]

    def ping(self) -> Frame | None:
        return PING

    # -- the codec a connection runs its commands through (the protobuf flavour overrides it)

    #: whether this is the protobuf flavour (binary messages)
    protobuf = False

    def decode(self, frame: Frame) -> list[Command | None]:
        """The commands of one incoming message (see :func:`decode`)."""
        return decode(frame)

    def reply(self, cid: int, method: str, result: dict[str, Any]) -> Frame:
        """A command's reply (see :func:`reply`)."""
        return reply(cid, method, result)

    def error_reply(self, cid: int, exc: TidingsError) -> Frame:
        """A command's error reply (see :func:`error_reply`)."""
        return error_reply(cid, exc)

    def push_frame(self, channel: str, kind: str, body: dict[str, Any]) -> Frame:
        """A push other than a publication's (subscribe, unsubscribe, refresh, ...)."""
        return push(channel, kind, body)


class CentrifugeFramed(CentrifugeJson):
    """The variant for direct transports (the fast path of `tidings serve`): a push is a
    complete WebSocket frame (:class:`~tidings.frames.WsFrame`), built once per
    publication and written as it is to every subscriber, not framed again per subscriber.
    Replies and the other frames a connection queues stay ``str``."""

    __slots__ = ()

    def _frame(self, data: bytes) -> Frame:
        return text_frame(data)

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Several queued frames become one text frame, their payloads newline-separated:
        the bytes the text variant's joined message makes once framed.

        Every subscriber of a channel that got the same publications in one loop iteration
        queued the same frames: the batch equal to the last one (the same objects, so the
        comparison is one pointer test per frame) gets the frame packed for it, not a new one.
        ``bytes`` here are frames built by this variant (``str`` and pre-built frames are all
        a connection queues), so equal batches always pack alike."""
        if len(frames) == 1:
            return frames
        last = self._last
        if frames != last.batch:
            parts = [f.encode() if isinstance(f, str) else payload(f) for f in frames]
            last.packed = text_frame(b"\n".join(parts))
            last.batch = frames.copy()  # the session reuses its list
        return [last.packed]


class _Unidirectional:
    """What the unidirectional variants change (mixed in before a :class:`CentrifugeJson`):
    pushes go out bare, as Centrifugo's ``uni_*`` transports send them, and pings expect no
    pong (the client has no way to send one)."""

    __slots__ = ()

    expects_pong = False

    def _push(self, channel: str, kind: str, body: dict[str, Any]) -> bytes:
        return uni_push_bytes(channel, kind, body)

    def pack(self, frames: list[Frame]) -> list[Frame]:
        # the few pushes a connection queues itself (server-side subscribe/unsubscribe) are
        # built wrapped; publications, the bulk, were built bare once by the encoder
        bare = [unwrap(f) if isinstance(f, str) else f for f in frames]
        return super().pack(bare)  # type: ignore[misc,no-any-return]


class CentrifugeUni(_Unidirectional, CentrifugeJson):
    """The unidirectional variant for transports that take text (ASGI, HTTP streaming)."""

    __slots__ = ()


class CentrifugeUniFramed(_Unidirectional, CentrifugeFramed):
    """The unidirectional variant for direct transports (``uni_websocket`` under
    `tidings serve`): bare pushes built once as complete WebSocket frames."""

    __slots__ = ()


class CentrifugeDeflate(CentrifugeFramed):
    """The framed variant for connections that negotiated permessage-deflate: a push of at
    least ``compression_min_size`` bytes is ONE compressed frame per publication, written
    as it is to every such subscriber (:mod:`.deflate`: no context takeover, so the same
    compressed bytes are valid on every connection).

    As a session's wire format it also gives out the plain framed encoders, for channels
    whose namespace is not compressed (:meth:`encoder`), and it compresses the session's own
    large replies (history, presence), which are its alone anyway (:meth:`pack`)."""

    __slots__ = ("_compressor", "_plain")

    def __init__(
        self,
        with_join_leave: bool,
        last: _LastPush,
        compressor: Compressor | None = None,
        plain: CentrifugeJson | None = None,
    ) -> None:
        super().__init__(with_join_leave, last)
        self._compressor = compressor or Compressor()
        self._plain: CentrifugeJson = plain or self

    @classmethod
    def made(cls, compressor: Compressor, plain: CentrifugeJson) -> CentrifugeDeflate:
        """A new pair sharing ``compressor`` (one per hub), beside the ``plain`` framed pair."""
        last = _LastPush()
        without, with_join_leave = (
            cls(False, last, compressor, plain),
            cls(True, last, compressor, plain),
        )
        without._pair = with_join_leave._pair = (without, with_join_leave)
        return without

    def encoder(self, join_leave: bool, compress: bool = False) -> CentrifugeJson:
        if compress:
            return self._pair[join_leave]
        return self._plain.encoder(join_leave)

    def _frame(self, data: bytes) -> Frame:
        return self._compressor.text_frame(data)

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """The queued frames as they are, in one write: a compressed frame cannot be joined
        with others without inflating it again. Replies (``str``) of at least
        ``compression_min_size`` bytes are compressed here, once each."""
        compressor = self._compressor
        minimum = compressor.min_size
        out: list[Frame] = []
        for f in frames:
            if type(f) is str and len(f) >= minimum:
                out.append(compressor.text_frame(f.encode()))
            else:
                out.append(f)
        return out


class CentrifugeEncoders:
    """The Centrifugo encoders (and session wire formats) of one hub, per flavour (JSON,
    protobuf): a pair for ASGI transports and a framed pair for direct ones.

    Each pair caches the last publication it encoded and the last batch it packed, so one is
    made per hub (the Centrifugo endpoint of a :class:`~tidings.app.Tidings` makes it), never
    per process: two hubs in one process, on one thread or several, share no encoder state."""

    __slots__ = (
        "deflate",
        "framed",
        "protobuf",
        "protobuf_framed",
        "text",
        "uni_framed",
        "uni_text",
    )

    def __init__(self, level: int = 1, min_size: int = 0) -> None:
        from .centrifuge_protobuf import CentrifugeProtobuf, CentrifugeProtobufFramed

        #: for transports that take text (ASGI): pushes are ``str``
        self.text: CentrifugeJson = CentrifugeJson.pair()
        #: for direct transports (`tidings serve`): pushes are complete WebSocket frames
        self.framed: CentrifugeJson = CentrifugeFramed.pair()
        #: the unidirectional transports' bare pushes, as text and as frames
        self.uni_text: CentrifugeJson = CentrifugeUni.pair()
        self.uni_framed: CentrifugeJson = CentrifugeUniFramed.pair()
        #: the protobuf flavour over ASGI: pushes are ``bytes`` (binary messages)
        self.protobuf: CentrifugeJson = CentrifugeProtobuf.pair()
        #: the protobuf flavour on direct transports: pushes are complete binary frames
        self.protobuf_framed: CentrifugeJson = CentrifugeProtobufFramed.pair()
        #: for direct transports that negotiated permessage-deflate: pushes are frames,
        #: compressed once per publication (``level``: zlib's 1-9; ``min_size``: bytes,
        #: shorter pushes and replies go uncompressed)
        self.deflate: CentrifugeJson = CentrifugeDeflate.made(
            Compressor(level, min_size), self.framed
        )

    def wire_format(
        self, framed: bool, uni: bool = False, protobuf: bool = False, deflate: bool = False
    ) -> CentrifugeJson:
        """The session's format (and encoder without join/leave) for a transport that does or
        does not write pre-built frames; ``uni``: for a unidirectional transport (JSON only);
        ``protobuf``: the protobuf flavour; ``deflate``: the transport negotiated
        permessage-deflate (JSON on direct transports only: protobuf frames go uncompressed)."""
        if uni:
            return self.uni_framed if framed else self.uni_text
        if protobuf:
            return self.protobuf_framed if framed else self.protobuf
        if not framed:
            return self.text
        return self.deflate if deflate else self.framed
