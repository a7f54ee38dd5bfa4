"""The broker interface: the only road between tidings nodes.

A broker does three jobs. It carries publications to every node that subscribed the channel
(pub/sub), it keeps each channel's stream (offset, epoch, recent history) so clients can
recover what they missed, and it keeps presence. Every engine implements this one small class
and passes the same contract tests; the hub never knows which engine it talks to.

Payloads are bytes holding JSON: the hub encodes once and brokers move bytes untouched.
"""

from __future__ import annotations

import abc
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import Unavailable

#: How long an idle stream keeps its offset and epoch unless told otherwise (Settings has the
#: configured value, ``history_meta_ttl``; the hub passes it on every call).
DEFAULT_META_TTL = 7 * 86400.0


def compact(data: bytes) -> bytes:
    """An exact-size copy of ``data``, for what is kept a long time. orjson's output holds on to
    its whole working buffer, many times a small document's size, so history entries or
    connection info kept as orjson returned them would each cost that buffer (figures in
    bench/RESULTS.md, "Figures behind the code")."""
    return memoryview(data).tobytes()


def new_epoch() -> str:
    """A fresh epoch: random, so a stream that is lost and restarted never reuses one."""
    return secrets.token_hex(4)


class BrokerUnavailable(Unavailable):
    """The engine cannot be reached right now (down, refused, timed out); worth retrying.

    Every networked engine raises this, whatever its client library raises, so callers can
    answer "try again later" without knowing the engine."""


@dataclass(frozen=True, slots=True)
class StreamPosition:
    """Where a channel's stream is: ``offset`` grows by exactly 1 per publication; ``epoch``
    names one life of the stream and changes only when the stream is lost (expired, reset)."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Who is behind a connection, as presence and join/leave report it."""

    client: str
    user: str = ""
    conn_info: bytes | None = None
    chan_info: bytes | None = None


@dataclass(slots=True)
class Publication:
    """One message in a channel. ``data`` is JSON bytes, never re-encoded by a broker.

    Read-only by convention, not ``frozen``: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, several times the cost of a plain one, and one is made for
    every publication (bench/RESULTS.md, "Figures behind the code")."""

    channel: str
    data: bytes
    offset: int = 0
    epoch: str = ""
    info: ClientInfo | None = None
    tags: dict[str, str] | None = None
    time: float = 0.0


#: Default cap on the streams an engine keeps (the setting ``history_max_streams``).
DEFAULT_MAX_STREAMS = 100_000


@dataclass(frozen=True, slots=True)
class HistoryOptions:
    """How a publication is kept: ``size`` items for ``ttl`` seconds (0 size: not kept);
    ``meta_ttl`` is how long an idle stream keeps its offset and epoch.

    ``stream``: False when the channel keeps no history at all (its namespace's
    ``history_size`` is 0), not just this publication (``skip_history``). An engine whose
    :attr:`Broker.streams_without_history` is False then keeps nothing for the channel and
    publishes with offset 0 and no epoch, as Centrifugo publishes without history
    (centrifuge ``broker_redis.go``: a plain PUBLISH when ``HistorySize`` or ``HistoryTTL`` is
    0); the others advance the offset anyway."""

    size: int = 0
    ttl: float = 0.0
    meta_ttl: float = DEFAULT_META_TTL
    stream: bool = True


@dataclass(frozen=True, slots=True)
class HistoryResult:
    publications: list[Publication]
    position: StreamPosition


@dataclass(frozen=True, slots=True)
class PresenceStats:
    num_clients: int
    num_users: int


@dataclass(frozen=True, slots=True)
class JoinLeave:
    """A presence change pushed to subscribers of ``channel``."""

    channel: str
    info: ClientInfo
    join: bool = True


class EventHandler(Protocol):
    """What a broker calls when something arrives for this node. The hub implements it.

    These are plain functions: a broker calls them from its receiving task, in order, and they
    never block (the hub only queues bytes)."""

    def on_publication(self, publication: Publication) -> None: ...

    def on_join_leave(self, event: JoinLeave) -> None: ...

    def on_control(self, data: bytes) -> None: ...

    def on_resync(self) -> None:
        """Deliveries may have been lost (a reconnection): check every channel's position."""


@dataclass(slots=True)
class _NullHandler:
    seen: list[object] = field(default_factory=list)

    def on_publication(self, publication: Publication) -> None:
        self.seen.append(publication)

    def on_join_leave(self, event: JoinLeave) -> None:
        self.seen.append(event)

    def on_control(self, data: bytes) -> None:
        self.seen.append(data)

    def on_resync(self) -> None:
        self.seen.append("resync")


class Broker(abc.ABC):
    """One engine. Create it from a URL with :func:`tidings.brokers.create_broker`."""

    #: URL schemes this engine answers to.
    schemes: tuple[str, ...] = ()
    #: True when no method ever suspends (memory): callers may run them without a task
    #: (tidings.eager); a networked engine awaits I/O and leaves it False.
    synchronous: bool = False
    #: False when channels that keep no history (``HistoryOptions.stream`` False) get no
    #: stream at all (Redis): their publications carry offset 0, so the hub reads no stream
    #: position for them and cannot check their deliveries for gaps.
    streams_without_history: bool = True

    def __init__(self, url: str) -> None:
        self.url = url
        self.handler: EventHandler = _NullHandler()

    # -- life ----------------------------------------------------------------------------------

    async def start(self, handler: EventHandler) -> None:
        """Connect; from now on deliver events for subscribed channels to ``handler``."""
        self.handler = handler

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect and release everything; idempotent."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` if the engine cannot be reached (used by /health)."""

    # -- pub/sub -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Start receiving ``channel`` on this node. Returns once delivery is guaranteed."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel`` on this node."""

    @abc.abstractmethod
    async def publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        """Append to the channel's stream (kept per ``history``) and fan out to every node."""

    @abc.abstractmethod
    async def publish_join_leave(self, event: JoinLeave) -> None:
        """Send a join/leave event to every node subscribed to its channel."""

    @abc.abstractmethod
    async def publish_control(self, data: bytes) -> None:
        """Send a control message to every node (disconnect a user, etc.)."""

    # -- streams -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
        meta_ttl: float = DEFAULT_META_TTL,
    ) -> HistoryResult:
        """Publications after ``since.offset`` (all kept ones without ``since``), at most
        ``limit`` (None: no limit, 0: none, only the position), oldest first unless ``reverse``.

        The position is always the stream's current one (a stream that did not exist starts
        now, with a new epoch), so a caller compares epochs to tell whether ``since`` is still
        valid."""

    @abc.abstractmethod
    async def remove_history(self, channel: str) -> None:
        """Drop kept publications; offset and epoch stay."""

    # -- presence ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        """Record (or refresh) ``info.client`` as present in ``channel`` for ``ttl`` seconds."""

    @abc.abstractmethod
    async def remove_presence(self, channel: str, client: str) -> None: ...

    @abc.abstractmethod
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Present clients by client id."""

    async def presence_stats(self, channel: str) -> PresenceStats:
        clients = await self.presence(channel)
        return PresenceStats(len(clients), len({c.user for c in clients.values()}))


# -- URL options -------------------------------------------------------------------------------

#: How an engine declares one of its URL options (:func:`url_options`): ``str`` (any non-empty
#: text), ``float`` (a positive, finite number of seconds), ``int`` (a positive whole number),
#: ``bool`` (a flag) or a tuple of the words it may be.
OptionKind = type[str] | type[float] | type[int] | type[bool] | tuple[str, ...]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_T = TypeVar("_T", str, float, int, bool)


class UrlOptions:
    """The options an engine read from its URL, converted (made by :func:`url_options`)."""

    __slots__ = ("_values",)

    def __init__(self, values: dict[str, str | float | int | bool]) -> None:
        self._values = values

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: _T) -> _T:
        """The option's value, or ``default`` when the URL does not give it; ``default`` has
        the type the option was declared with (a tuple of words: ``str``)."""
        value = self._values.get(name, default)
        assert type(value) is type(default), f"URL option {name} is not a {type(default)}"
        return value


def _convert(engine: str, name: str, raw: str, kind: OptionKind) -> str | float | int | bool:
    """``raw`` as ``kind``; ValueError (naming the option and what it expects) if it is not."""
    if isinstance(kind, tuple):
        if raw in kind:
            return raw
        expected = " or ".join(kind)
    elif kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        expected = "true or false (or 1/0, yes/no, on/off)"
    elif kind is int or kind is float:
        try:
            number = float(raw)  # "3", "3.0" and "1e2" alike
        except ValueError:
            number = math.nan
        if number > 0 and math.isfinite(number):  # inf is no number of seconds
            if kind is float:
                return number
            if number == int(number):
                return int(number)
        expected = "a positive number of seconds" if kind is float else "a positive whole number"
    elif raw:
        return raw
    else:
        # an empty value (a failed ${VAR} substitution) must not quietly mean the default: an
        # empty prefix= would share the default deployment's keys
        expected = "a value (it is empty)"
    raise ValueError(f"{engine} URL option {name}={raw!r}: expected {expected}")


def url_options(
    url: str, engine: str, known: Mapping[str, OptionKind], *, passthrough: bool = False
) -> tuple[str, UrlOptions]:
    """Split an engine's own options out of ``url``'s query string.

    Args:
        url: the broker URL; its query is decoded as ``application/x-www-form-urlencoded``
            (``%XX`` escapes and ``+`` for a space, as :func:`urllib.parse.parse_qsl` does).
        engine: the engine's name in error messages (``"redis"``, ``"postgresql"`` ...).
        known: each option's name and :data:`OptionKind`.
        passthrough: True: any other query parameter stays in the URL returned (for a client
            library that reads its own, e.g. redis-py's ``socket_timeout``); False: one is an
            error.

    Returns:
        ``url`` without the engine's options (the rest of the query re-encoded by
        :func:`urllib.parse.urlencode`, no ``?`` when nothing is left), and the options given,
        converted.

    Raises:
        ValueError: an unknown option (unless ``passthrough``), an option given twice, or a
            value that is not of the option's kind; the message names the option.
    """
    parts = urlsplit(url)
    ours: dict[str, str | float | int | bool] = {}
    theirs: list[tuple[str, str]] = []
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        kind = known.get(key)
        if kind is None:
            theirs.append((key, raw))
        elif key in ours:
            # ambiguous: which one the user meant is not ours to guess
            raise ValueError(f"{engine} URL option {key} is given more than once")
        else:
            ours[key] = _convert(engine, key, raw, kind)
    if theirs and not passthrough:
        unknown = ", ".join(sorted({k for k, _ in theirs}))
        raise ValueError(f"unknown {engine} URL option(s): {unknown}; known: {', '.join(known)}")
    return urlunsplit(parts._replace(query=urlencode(theirs))), UrlOptions(ours)
