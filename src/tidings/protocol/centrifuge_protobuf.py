"""Centrifugo client protocol v2, protobuf flavour: the wire codec (sans-I/O).

Selected per connection when the client offers the ``centrifuge-protobuf`` WebSocket
subprotocol (centrifuge-js's protobuf build, centrifuge-python ``use_protobuf=True``,
centrifuge-swift, -java, -dart) or asks ``?format=protobuf``. A binary WebSocket message
holds one or more ``Command`` (client to server) or ``Reply`` (server to client) messages, each
prefixed by its length as a protobuf varint ("varint-delimited", as Centrifugo's
``protocol.NewProtobufCommandDecoder``/``ReplyEncoder`` frame them). An empty ``Command`` is a
pong, an empty ``Reply`` a ping.

The messages are those of centrifugal/protocol's ``definitions/client.proto``, committed beside
this module in ``proto/`` with the module protoc generated from it (``proto/generate.sh``
regenerates it). That module registers its types in a descriptor pool of its own, not the
process-wide default one, so it coexists with other copies of the same ``.proto`` (the
centrifuge-python SDK ships one) in one process.

The commands reach the same handlers as the JSON flavour: :func:`decode` turns each request
message into the dict the JSON flavour's decoder makes (fields left at their default are
absent, as they are from SDKs' JSON). Replies go the other way: a handler's result dict fills
the reply's result message field by field (:func:`fill`). Payloads (``data``, ``info``) are JSON
on every format, since one publication reaches JSON and protobuf subscribers alike: a protobuf
client's ``publish`` whose ``data`` is not JSON is refused (107) rather than break the JSON
subscribers' frames.

Pushes are encoded once per publication for every protobuf subscriber on the node, as the JSON
flavour's are (:class:`CentrifugeProtobuf`, made per hub by
:class:`~tidings.protocol.centrifuge.CentrifugeEncoders`).
"""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from ..brokers.base import ClientInfo, JoinLeave, Publication
from ..errors import BadRequest, CloseReason, Disconnect, TidingsError
from ..frames import Frame, WsFrame, binary_frame, payload
from .centrifuge import TEMPORARY, CentrifugeJson, Command
from .proto import client_pb2 as pb

#: the WebSocket subprotocol that selects this flavour
SUBPROTOCOL = "centrifuge-protobuf"

#: a ping: one empty Reply, length-prefixed (a varint 0)
PING = b"\x00"

UNSUPPORTED_TEXT = CloseReason(3501, "bad request: text frame on a protobuf connection")

#: the methods of a Command, in field order: the first one set is the command's method
_METHODS = tuple(
    f.name for f in pb.Command.DESCRIPTOR.fields if f.type == FieldDescriptor.TYPE_MESSAGE
)

#: methods whose ``data`` reaches an application handler (rpc, send): decoded from JSON for it
_DECODED_DATA = frozenset({"rpc", "send"})

_MAX_VARINT_BYTES = 10


# -- varint framing ------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def delimited(message: bytes) -> bytes:
    """One serialized message, prefixed by its length."""
    return varint(len(message)) + message


def split(data: bytes) -> list[bytes]:
    """The length-prefixed messages in ``data``, in order; a truncated or malformed prefix
    closes the connection (3501), as Centrifugo's decoder does."""
    out: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        n = shift = 0
        for _ in range(_MAX_VARINT_BYTES):
            if pos >= end:
                raise Disconnect(3501, "bad request: truncated length prefix")
            byte = data[pos]
            pos += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            raise Disconnect(3501, "bad request: malformed length prefix")
        if pos + n > end:
            raise Disconnect(3501, "bad request: truncated message")
        out.append(data[pos : pos + n])
        pos += n
    return out


# -- incoming ------------------------------------------------------------------------------------


def decode(frame: Frame) -> list[Command | None]:
    """The commands in one binary message, in order; None stands for a pong (an empty
    Command). A text frame, bytes that are not a Command, a command with no method or (but
    for ``send``) no id closes the connection with 3501."""
    if isinstance(frame, str):
        raise UNSUPPORTED_TEXT()
    out: list[Command | None] = []
    for part in split(frame):
        try:
            command = pb.Command.FromString(part)
        except DecodeError:
            raise Disconnect(3501, "bad request: invalid protobuf") from None
        method = next((m for m in _METHODS if command.HasField(m)), None)
        if method is None:
            if command.id:
                raise Disconnect(3501, "bad request: unknown method")
            out.append(None)
            continue
        if not command.id and method != "send":
            raise Disconnect(3501, "bad request: command id required")
        request = as_dict(getattr(command, method))
        data = request.get("data")
        error: TidingsError | None = None
        if data is not None:
            try:
                request["data"] = _data(method, data)
            except BadRequest as exc:  # answered as this command's error reply (107)
                error = exc
        out.append(Command(command.id, method, request, error))
    return out


def _data(method: str, data: bytes) -> Any:
    """A command's ``data`` as its handler takes it: parsed JSON for an application handler
    (rpc, send; raw bytes when not JSON), checked JSON spliced as it is otherwise."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        if method in _DECODED_DATA:
            return data
        raise BadRequest("data must be JSON") from None
    return value if method in _DECODED_DATA else orjson.Fragment(data)


def as_dict(message: Message) -> dict[str, Any]:
    """A request message as the JSON flavour's decoder gives it: set fields only, nested
    messages and maps as dicts, ``bytes`` as they are."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                out[field.name] = {k: as_dict(v) for k, v in value.items()}
            else:
                out[field.name] = dict(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if _repeated(field):
                out[field.name] = [as_dict(v) for v in value]
            else:
                out[field.name] = as_dict(value)
        elif _repeated(field):
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


def _repeated(field: Any) -> bool:
    """Whether a field (a FieldDescriptor, from the pure-Python or the upb runtime) repeats."""
    return bool(field.is_repeated)


# -- outgoing ------------------------------------------------------------------------------------


def _bytes(value: Any) -> bytes:
    """A JSON-flavour field value as the protobuf ``bytes`` it stands for: ``bytes`` as they
    are; an :class:`orjson.Fragment` (embedded JSON) or any JSON value serialized."""
    if isinstance(value, bytes):
        return value
    return orjson.dumps(value)


def fill(message: Message, values: dict[str, Any]) -> None:
    """Set ``message``'s fields from a JSON-flavour result dict (the handlers' results): nested
    dicts fill nested messages (present even when empty), lists repeated fields, dicts of
    dicts map fields; keys the message does not have are skipped."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        target = getattr(message, key)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if entry.message_type is not None:
                    fill(target[k], v)
                else:
                    target[k] = v
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if _repeated(field):
                for item in value:
                    fill(target.add(), item)
            else:
                target.SetInParent()
                fill(target, value)
        elif field.type == FieldDescriptor.TYPE_BYTES:
            setattr(message, key, _bytes(value))
        elif _repeated(field):
            target.extend(value)
        else:
            setattr(message, key, value)


def reply(cid: int, method: str, result: dict[str, Any]) -> bytes:
    """A command's reply, length-prefixed."""
    out = pb.Reply(id=cid)
    field = getattr(out, method)
    field.SetInParent()
    fill(field, result)
    return delimited(out.SerializeToString())


def error_reply(cid: int, exc: TidingsError) -> bytes:
    """A command's error reply, length-prefixed (``temporary`` as the JSON flavour sets it)."""
    error = pb.Error(code=exc.code, message=exc.message, temporary=exc.code in TEMPORARY)
    return delimited(pb.Reply(id=cid, error=error).SerializeToString())


def push(channel: str, kind: str, body: dict[str, Any]) -> bytes:
    """A push, length-prefixed (``kind``: pub, join, leave, subscribe, unsubscribe, refresh)."""
    out = pb.Reply()
    message = out.push
    if channel:
        message.channel = channel
    field = getattr(message, kind)
    field.SetInParent()
    fill(field, body)
    return delimited(out.SerializeToString())


def client_info(info: ClientInfo) -> Any:
    """``info`` as a ClientInfo message."""
    out = pb.ClientInfo(user=info.user, client=info.client)
    if info.conn_info:
        out.conn_info = info.conn_info
    if info.chan_info:
        out.chan_info = info.chan_info
    return out


def publication_push(pub: Publication) -> bytes:
    """The ``pub`` push of one publication, length-prefixed: built straight into messages (the
    fan-out's hot path), not through a dict."""
    out = pb.Reply()
    message = out.push
    message.channel = pub.channel
    body = message.pub
    body.data = pub.data
    if pub.offset:
        body.offset = pub.offset
    info = pub.info
    if info is not None:  # set in place: a message made and copied costs more
        target = body.info
        target.user = info.user
        target.client = info.client
        if info.conn_info:
            target.conn_info = info.conn_info
        if info.chan_info:
            target.chan_info = info.chan_info
    if pub.tags:
        body.tags.update(pub.tags)
    return delimited(out.SerializeToString())


# -- encoders ------------------------------------------------------------------------------------


class CentrifugeProtobuf(CentrifugeJson):
    """The protobuf flavour's encoder (one of a pair, with or without join/leave pushes) and
    session wire format for transports that take messages (ASGI): pushes are ``bytes``
    (length-prefixed Replies), sent as binary WebSocket messages.

    Shares the JSON flavour's pairing and last-publication cache (see
    :class:`~tidings.protocol.centrifuge.CentrifugeJson`): one publication is encoded once per
    node for every protobuf subscriber."""

    __slots__ = ()

    protobuf = True

    def _frame(self, data: bytes) -> Frame:
        return data

    def push(self, pub: Publication) -> Frame:
        last = self._last
        if last.pub is not pub:
            last.frame = self._frame(publication_push(pub))
            last.pub = pub
        return last.frame

    def join_leave(self, event: JoinLeave) -> Frame | None:
        if not self.with_join_leave:
            return None
        kind = "join" if event.join else "leave"
        out = pb.Reply()
        message = out.push
        message.channel = event.channel
        getattr(message, kind).info.CopyFrom(client_info(event.info))
        return self._frame(delimited(out.SerializeToString()))

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Every queued reply and push in one binary message: length-prefixed messages
        simply follow each other."""
        if len(frames) == 1:
            return frames
        return [b"".join(f if isinstance(f, bytes) else f.encode() for f in frames)]

    def ping(self) -> Frame | None:
        return PING

    # the codec the connection runs its commands through (see CentrifugeJson)

    def decode(self, frame: Frame) -> list[Command | None]:
        return decode(frame)

    def reply(self, cid: int, method: str, result: dict[str, Any]) -> Frame:
        return reply(cid, method, result)

    def error_reply(self, cid: int, exc: TidingsError) -> Frame:
        return error_reply(cid, exc)

    def push_frame(self, channel: str, kind: str, body: dict[str, Any]) -> Frame:
        return push(channel, kind, body)


class CentrifugeProtobufFramed(CentrifugeProtobuf):
    """The variant for direct transports (`tidings serve`): a publication's push is a complete
    binary WebSocket frame built once and written as it is to every protobuf subscriber.
    Replies and other queued messages stay plain ``bytes`` (framed by the transport)."""

    __slots__ = ()

    def _frame(self, data: bytes) -> Frame:
        return binary_frame(data)

    def pack(self, frames: list[Frame]) -> list[Frame]:
        """Several queued messages become one binary frame; the batch equal to the last one
        packed (every subscriber of a channel that got the same publications) reuses it."""
        if len(frames) == 1:
            return frames
        last = self._last
        if frames != last.batch:
            parts = [
                payload(f) if type(f) is WsFrame else f.encode() if isinstance(f, str) else f
                for f in frames
            ]
            last.packed = binary_frame(b"".join(parts))
            last.batch = frames.copy()
        return [last.packed]
