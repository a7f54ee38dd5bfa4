"""The control plane: typed messages every node receives through the broker, and their codec.

Server-side operations on users' connections (the server API's ``subscribe``, ``unsubscribe``,
``refresh`` and ``disconnect``, as in Centrifugo) must reach the node each connection is on, so
they travel as control messages (:meth:`~tidings.brokers.base.Broker.publish_control`) that every
node receives. This module is the only place their bytes are built and read: senders (the hub's
``subscribe_user`` & co.) build one of the dataclasses below and :func:`encode` it; the hub
:func:`decode`\\s what the broker delivers once, drops what is not a valid message, and hands the
typed message to each receiver (the Centrifugo and raw endpoints).

The wire format is a JSON object with ``op`` first, then ``user`` and ``client`` (``""``: every
connection of the user), then the fields of the op, as the README documents::

    {"op": "subscribe", "user": "u", "client": "", "channel": "news"}
    {"op": "unsubscribe", "user": "u", "client": "c1", "channel": "news"}
    {"op": "refresh", "user": "u", "client": "", "expire_at": 1700000000, "expired": false}
    {"op": "disconnect", "user": "u", "client": "", "code": 3503, "reason": "force disconnect"}

Commands a client of an emulated transport posts to another node's session travel to that node
(:class:`Emulation`)::

    {"op": "emulation", "node": "a1b2c3", "session": "5f0c...", "data": "{\"id\":2,...}"}

One message is about a node, not a user: every node announces its figures every
``node_info_interval`` seconds, so the server API's ``info`` can answer for every node (as
Centrifugo's node info messages do)::

    {"op": "node", "uid": "a1b2c3", "name": "host_a1b2c3", "version": "0.1.0", "num_clients": 3,
     "num_users": 2, "num_channels": 1, "num_subs": 3, "uptime": 12,
     "metrics": {"tidings_publications": 7.0, ...}}

Decoding is lenient where the documented form is: ``client`` may be missing or null, and so may
the optional fields (their defaults apply); keys it does not know are ignored, so a node can read
what a newer node adds. Anything else raises :class:`ControlError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import orjson

__all__ = [
    "ControlError",
    "ControlMessage",
    "DisconnectUser",
    "Emulation",
    "Message",
    "NodeInfo",
    "RefreshUser",
    "SubscribeUser",
    "UnknownOp",
    "UnsubscribeUser",
    "decode",
    "encode",
]

#: close codes a WebSocket endpoint may not send (RFC 6455 section 7.4.1)
_RESERVED_CODES = frozenset({1004, 1005, 1006, 1015})
#: a close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 section 5.5)
MAX_REASON = 123


class ControlError(ValueError):
    """Bytes that are not a valid control message (malformed JSON, a missing or mistyped field)."""


class UnknownOp(ControlError):
    """A control message whose ``op`` this node does not know (e.g. from a newer node)."""

    def __init__(self, op: str) -> None:
        super().__init__(f"unknown control op {op!r}")
        self.op = op


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ControlError(f"{name} must be a string")
    return value


def _whole(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"{name} must be an integer")
    return value


def _common(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields every message has, from a decoded object, as constructor arguments."""
    return {"user": obj.get("user"), "client": obj.get("client") or ""}


@dataclass(frozen=True, slots=True, kw_only=True)
class _Message:
    """Fields every control message has: whose connections it is about."""

    op: ClassVar[str]

    #: the user whose connections the message is about (``""`` matches no connection)
    user: str
    #: only this connection id (``""``: every connection of ``user``)
    client: str = ""

    def __post_init__(self) -> None:
        _text(self.user, "user")
        _text(self.client, "client")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        """The message in a decoded JSON object (its ``op`` already matched)."""
        return cls(**_common(obj))


@dataclass(frozen=True, slots=True, kw_only=True)
class _ChannelMessage(_Message):
    #: the resolved channel name (non-empty)
    channel: str

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        if not _text(self.channel, "channel"):
            raise ControlError("channel must not be empty")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        channel: Any = obj.get("channel")  # checked by the constructor
        return cls(**_common(obj), channel=channel)


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscribeUser(_ChannelMessage):
    """Subscribe the user's connections to ``channel`` (Centrifugo-protocol connections get a
    subscribe push; raw ``/ws/{channel}`` connections have one channel for life and ignore it)."""

    op: ClassVar[str] = "subscribe"


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsubscribeUser(_ChannelMessage):
    """Unsubscribe the user's connections from ``channel`` (Centrifugo: an unsubscribe push,
    code 2000; raw: the connection closes with 1008, it has no other channel)."""

    op: ClassVar[str] = "unsubscribe"


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshUser(_Message):
    """Extend the user's connections to ``expire_at`` (Unix time, seconds; None: never expire),
    or end them at once (``expired``: closed with 3005). Centrifugo-protocol connections only."""

    op: ClassVar[str] = "refresh"
    expire_at: int | float | None = None
    expired: bool = False

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        at = self.expire_at
        if at is not None and (not isinstance(at, int | float) or isinstance(at, bool)):
            raise ControlError("expire_at must be a number of seconds or null")
        if not isinstance(self.expired, bool):
            raise ControlError("expired must be true or false")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        return cls(
            **_common(obj), expire_at=obj.get("expire_at"), expired=obj.get("expired", False)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DisconnectUser(_Message):
    """Close the user's connections (every protocol) with WebSocket close ``code``/``reason``.

    ``code``: 1000-4999 except the codes RFC 6455 section 7.4.1 reserves (1004-1006, 1015);
    3503 (the default) tells Centrifugo SDKs not to reconnect. ``reason``: at most 123 bytes of
    UTF-8 (RFC 6455 section 5.5). Invalid values raise :class:`ControlError`."""

    op: ClassVar[str] = "disconnect"
    code: int = 3503
    reason: str = "force disconnect"

    def __post_init__(self) -> None:
        _Message.__post_init__(self)
        code = _whole(self.code, "code")
        if not 1000 <= code <= 4999 or code in _RESERVED_CODES:
            raise ControlError(f"code {code} is not a close code a server may send")
        if len(_text(self.reason, "reason").encode()) > MAX_REASON:
            raise ControlError(f"reason is longer than {MAX_REASON} bytes")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        # without them: 3503 and no reason, as nodes have always read such a message
        return cls(**_common(obj), code=obj.get("code", 3503), reason=obj.get("reason", ""))


ControlMessage = SubscribeUser | UnsubscribeUser | RefreshUser | DisconnectUser


def _count(value: Any, name: str) -> int:
    if _whole(value, name) < 0:
        raise ControlError(f"{name} must not be negative")
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """A node's figures, announced to every node (the server API's ``info`` lists them).

    The fields are those of a node in Centrifugo's ``info`` result (counts are whole numbers
    >= 0, ``uptime`` in seconds); ``metrics`` maps counter names (those of ``/metrics``, e.g.
    ``tidings_deliveries``) to their totals on that node since it started. Invalid values raise
    :class:`ControlError`."""

    op: ClassVar[str] = "node"
    uid: str
    name: str = ""
    version: str = ""
    num_clients: int = 0
    num_users: int = 0
    num_channels: int = 0
    num_subs: int = 0
    uptime: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _text(self.uid, "uid"):
            raise ControlError("uid must not be empty")
        _text(self.name, "name")
        _text(self.version, "version")
        for name in ("num_clients", "num_users", "num_channels", "num_subs", "uptime"):
            _count(getattr(self, name), name)
        if not isinstance(self.metrics, dict):
            raise ControlError("metrics must be an object")
        for key, value in self.metrics.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ControlError(f"metrics.{key} must be a number")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}
        given = {k: v for k, v in obj.items() if k in known}
        return cls(**{**given, "uid": obj.get("uid")})  # a missing uid: checked, ControlError

    def as_result(self) -> dict[str, Any]:
        """The node as Centrifugo's ``info`` result shows one (``metrics`` as
        ``{"interval", "items"}``; tidings' counters are totals, so ``interval`` is 0)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["metrics"] = {"interval": 0.0, "items": dict(self.metrics)}
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Emulation:
    """Commands a client of an emulated transport (``http_stream``, ``sse``) posted to
    ``/emulation`` on one node, for the node that holds its session (as Centrifugo's
    emulation survey carries them). ``node``: that node's id; ``session``: the session id its
    connect reply gave; ``data``: the commands, as the connection's frame (newline-separated
    JSON). Every node receives it; only ``node`` acts on it."""

    op: ClassVar[str] = "emulation"
    node: str
    session: str
    data: str

    def __post_init__(self) -> None:
        if not _text(self.node, "node"):
            raise ControlError("node must not be empty")
        if not _text(self.session, "session"):
            raise ControlError("session must not be empty")
        _text(self.data, "data")

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> Any:
        given: dict[str, Any] = {k: obj.get(k) for k in ("node", "session", "data")}
        return cls(**given)  # checked by the constructor


#: whatever travels on the control plane
Message = ControlMessage | NodeInfo | Emulation

#: every message type by its ``op``
OPS: dict[str, type[Message]] = {
    cls.op: cls
    for cls in (SubscribeUser, UnsubscribeUser, RefreshUser, DisconnectUser, NodeInfo, Emulation)
}


def encode(message: Message) -> bytes:
    """The JSON bytes of ``message``: ``op``, then its fields in declaration order."""
    body: dict[str, Any] = {"op": message.op}
    for f in fields(message):
        body[f.name] = getattr(message, f.name)
    return orjson.dumps(body)


def decode(data: bytes) -> Message:
    """The message in ``data``; :class:`UnknownOp` for an op this node does not know,
    :class:`ControlError` for anything else that is not a valid message."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ControlError("not JSON") from None
    if not isinstance(obj, dict):
        raise ControlError("not a JSON object")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ControlError("op must be a string")
    cls = OPS.get(op)
    if cls is None:
        raise UnknownOp(op)
    message: Message = cls.from_object(obj)
    return message
