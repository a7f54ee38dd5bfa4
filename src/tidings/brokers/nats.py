"""The NATS broker: ``nats://[user:password@]host:4222?prefix=tidings`` (nats-py, JetStream on).

What lives where, for a deployment named by ``prefix`` (default ``tidings``):

* JetStream stream ``<prefix>-channels`` (subjects ``<prefix>.s.>``): every channel's records,
  one subject per channel, ``<prefix>.s.<token>`` (:func:`channel_token`). A record is a
  publication (headers ``Tidings-Offset``, ``Tidings-Epoch``, ``Tidings-Expires``, ...; body
  ``<meta json>\\n<data>``) or a meta record (the stream's offset and epoch, written when a stream
  starts and to keep an idle one alive). The channel's last record is its position.
* The stream republishes each stored record (JetStream ``RePublish``, nats-server 2.9+) on core
  NATS subject ``<prefix>.ch.<token>``, where nodes subscribe: delivery order is the order
  JetStream stored the records in, i.e. offset order, on every node. Join/leave events go to the
  same subject (plain core messages); control messages to ``<prefix>.control``.
* JetStream key/value bucket ``<prefix>-presence`` (stream ``KV_<prefix>-presence``), keys
  ``<token>.<client token>``: presence entries, each carrying its own expiry time (per-key TTL
  needs nats-server 2.11), the bucket's ttl (``presence_max_age``) removing forgotten ones.

**Offsets.** A publication is stored with ``Nats-Expected-Last-Subject-Sequence`` set to the
stream sequence of the channel's last record, and its offset is that record's offset + 1: if
another node stored a record first, JetStream refuses (error 10071), and the node reads the new
last record and tries again. So offsets grow by exactly 1 per channel publication however many
nodes publish, and no two publications get one offset. A node remembers the last record of the
channels it published to, so a lone publisher needs one round trip per publication.

**History limits.** Before nats-server 2.11 JetStream has no per-message TTL, and a stream's
``max_msgs_per_subject``/``max_age`` are the same for every channel while ``history_size`` and
``history_ttl`` are per namespace, so the engine trims itself: each publication records its
expiry time and the ``history_size`` it was published with, reads return only the newest
``history_size`` publications that have not expired (a contiguous run: the first expired or
missing one ends it), and every few publications a channel is purged down to its last
``history_size`` + 4 records. The stream's ``max_age`` (URL option ``max_age``, default 7 days,
the default ``history_meta_ttl``) bounds how long an idle channel's records stay at all. A
read of up to 8 publications follows each record's link to the one before (a direct get each);
a longer one reads the channel's records through a short-lived consumer (JetStream has no
batched get before 2.11).

**Epochs.** A stream's epoch is random and changes only when its position is lost: no record
left for the channel (never used, dropped by ``max_age``, or the JetStream storage itself lost,
e.g. a server restarted without its store directory) or its last record older than
``meta_ttl``. Reads keep an idle stream alive by writing a meta record once its last record is
older than half of ``meta_ttl``. Times are the writing node's clock.

**Failures.** nats-py reconnects forever with exponential backoff (50 ms doubling to 5 s, with
+-25% jitter) and subscribes every subject again; once it is back the handler's ``on_resync``
makes the hub fill in what was missed from history. Calls made while the connection is down
raise :class:`BrokerUnavailable` at once, calls that get no answer within ``timeout`` raise it
then. After a reconnection the streams are checked before anything else uses the link, and
a stream found missing (the server lost its storage) is created again.

URL options: ``prefix`` (letters, digits, ``_``, ``-``; default ``tidings``), ``timeout``
(seconds to wait for any answer from the server, default 5), ``ping_interval`` (seconds between
pings; a link silent for three is replaced, default 10), ``max_age`` (seconds an idle
channel's records are kept at most, default 604800), ``presence_max_age`` (seconds a presence
entry is kept at most when it is never removed, default 3600; entries still expire at their
own ``ttl``), ``replicas`` (JetStream replicas of both streams, default 1), ``storage``
(``file`` or ``memory``, default ``file``). User, password and token are taken from the URL
as nats-py does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DiscardPolicy, RePublish, StorageType, StreamConfig

from .base import (
    DEFAULT_META_TTL,
    Broker,
    BrokerUnavailable,
    ClientInfo,
    EventHandler,
    HistoryOptions,
    HistoryResult,
    JoinLeave,
    OptionKind,
    Publication,
    StreamPosition,
    new_epoch,
    url_options,
)
from .redis_scripts import decode_info, encode_info

log = logging.getLogger("tidings.brokers.nats")

OPTIONS: dict[str, OptionKind] = {
    "prefix": str,
    "timeout": float,
    "ping_interval": float,
    "max_age": float,
    "presence_max_age": float,
    "replicas": int,
    "storage": ("file", "memory"),
}
RECONNECT_MIN = 0.05  # seconds before the first reconnection attempt, doubled up to:
RECONNECT_MAX = 5.0
#: records kept per channel beyond its history_size (meta records among the publications)
PURGE_SLACK = 4
#: a node remembers the last record of this many channels it published to
HEADS_CACHED = 10_000
WRONG_LAST_SEQUENCE = 10071
#: history reads of at most this many publications use direct gets, longer ones a consumer
DIRECT_READS = 8
#: seconds an abandoned history consumer lives on the server
SCAN_IDLE = 30.0

# headers of a stored record
KIND, OFFSET, EPOCH, PREV, WHEN = (
    "Tidings-Kind",
    "Tidings-Offset",
    "Tidings-Epoch",
    "Tidings-Prev",
    "Tidings-Time",
)
EXPIRES, SIZE = "Tidings-Expires", "Tidings-Size"
EXPECT = "Nats-Expected-Last-Subject-Sequence"

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPE = re.compile(r"=([0-9A-F]{2})")


def channel_token(name: str) -> str:
    """``name`` as one NATS subject token (and JetStream key): ASCII letters, digits, ``_`` and
    ``-`` stay, every other UTF-8 byte becomes ``=XX`` (upper-case hex), so ``.``, ``*``, ``>``,
    spaces and ``$`` cannot change a subject's meaning; the empty name is ``=``. Reversed by
    :func:`token_channel`."""
    if not name:
        return "="
    return "".join(chr(b) if _SAFE.fullmatch(bytes((b,))) else f"={b:02X}" for b in name.encode())


def token_channel(token: str) -> str:
    """The channel name :func:`channel_token` made ``token`` from; ValueError if it did not."""
    if token == "=":
        return ""
    raw = bytearray()
    i = 0
    while i < len(token):
        char = token[i]
        if char == "=":
            match = _ESCAPE.match(token, i)
            if match is None:
                raise ValueError(f"not a channel token: {token!r}")
            raw.append(int(match.group(1), 16))
            i += 3
        elif _SAFE.fullmatch(char.encode()):
            raw += char.encode()
            i += 1
        else:
            raise ValueError(f"not a channel token: {token!r}")
    return raw.decode()


P = ParamSpec("P")
R = TypeVar("R")

_FAILURES = (nats.errors.Error, OSError, TimeoutError)


def _reachable(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn nats-py's failures into the engine-neutral BrokerUnavailable."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except BrokerUnavailable:
            raise
        except _FAILURES as exc:
            raise BrokerUnavailable(f"nats: {exc or type(exc).__name__}") from exc

    return call


def _backoff(servers: list[Any], info: dict[str, Any]) -> tuple[None, float]:
    """nats-py's reconnect hook: the first server, after an exponential, jittered delay."""
    attempts = min((getattr(s, "reconnects", 0) for s in servers), default=0)
    delay = min(RECONNECT_MAX, RECONNECT_MIN * 2 ** min(attempts, 16))
    return None, delay * random.uniform(0.75, 1.25)


@dataclass(frozen=True, slots=True)
class _Head:
    """A channel's last record: where its stream is."""

    seq: int  # JetStream stream sequence of the record
    offset: int
    epoch: str
    written: float  # unix time the record was stored (the writer's clock)


@dataclass(frozen=True, slots=True)
class _Record:
    seq: int
    prev: int  # stream sequence of the channel's record before this one (0: none)
    kind: str
    offset: int
    epoch: str
    written: float
    expires: float  # publication: unix time it leaves history, 0 never, -1 not kept
    size: int
    body: bytes


class _Window:
    """Picks what history returns from a channel's records, fed newest first along their
    links: publications of the head's epoch after ``after``, not expired, within the newest
    publication's ``history_size``, at most ``limit``; the first record that fails ends it."""

    def __init__(self, head: _Head, after: int, limit: int | None) -> None:
        self.epoch = head.epoch
        self.floor = after
        self.limit = limit if limit is not None and limit > 0 else None
        self.now = time.time()
        self.found: list[_Record] = []
        self.wanted = head.seq  # the next record to take (0: none)

    def take(self, record: _Record) -> bool:
        """Whether older records may still be wanted (``wanted`` says which)."""
        if record.seq != self.wanted or record.epoch != self.epoch:
            return False
        if record.offset <= self.floor:
            return False
        if record.kind == "P":
            if record.expires < 0 or 0 < record.expires <= self.now:
                return False
            if not self.found:  # the newest publication's history_size bounds the window
                self.floor = max(self.floor, record.offset - record.size)
                if record.offset <= self.floor:
                    return False
            self.found.append(record)
            if self.limit is not None and len(self.found) >= self.limit:
                return False
        self.wanted = record.prev
        return bool(self.wanted)


def _record(h: dict[str, str], data: bytes, seq: int) -> _Record:
    """A stored record from its headers; KeyError/ValueError if it is not one of ours."""
    return _Record(
        seq,
        int(h.get(PREV, "0")),
        h.get(KIND, ""),
        int(h[OFFSET]),
        h[EPOCH],
        float(h[WHEN]),
        float(h.get(EXPIRES, "-1")),
        int(h.get(SIZE, "0")),
        data,
    )


def _publication(channel: str, offset: int, epoch: str, body: bytes) -> Publication:
    meta_raw, _, data = body.partition(b"\n")
    meta = orjson.loads(meta_raw)
    if not isinstance(meta, dict):
        raise ValueError("publication meta is not an object")
    info = decode_info(meta["i"]) if "i" in meta else None
    return Publication(channel, data, offset, epoch, info, meta.get("g"), meta["t"])


class NatsBroker(Broker):
    """The ``nats://`` engine; see the module documentation for what it stores and how it
    behaves. Constructing it raises ValueError for a bad URL option; every call that needs the
    server raises :class:`BrokerUnavailable` when it cannot be reached or does not answer
    within ``timeout`` seconds."""

    schemes = ("nats",)

    def __init__(self, url: str = "nats://127.0.0.1:4222") -> None:
        super().__init__(url)
        self.server, options = url_options(url, "nats", OPTIONS)
        self.prefix = options.get("prefix", "") or "tidings"
        if not _PREFIX.fullmatch(self.prefix):
            raise ValueError(
                f"nats URL option prefix={self.prefix!r}: use letters, digits, '_' and '-'"
            )
        self.timeout = options.get("timeout", 5.0)
        self.ping_interval = options.get("ping_interval", 10.0)
        self.max_age = options.get("max_age", DEFAULT_META_TTL)
        self.presence_max_age = options.get("presence_max_age", 3600.0)
        self.replicas = options.get("replicas", 1)
        storage = options.get("storage", "file")
        self.storage = StorageType.FILE if storage == "file" else StorageType.MEMORY
        self.stream = f"{self.prefix}-channels"
        #: a JetStream key/value bucket (``nats kv ls <bucket>`` lists it)
        self.presence_bucket = f"{self.prefix}-presence"
        self.presence_stream = f"KV_{self.presence_bucket}"
        self._nc: Client | None = None
        self._connecting: asyncio.Lock | None = None
        self._checking: asyncio.Task[None] | None = None  # streams checked after reconnecting
        self._closed = False
        self._started = False
        self._subs: dict[str, Subscription] = {}
        self._wanted: set[str] = set()  # channels subscribed (or being subscribed) here
        self._subscribing: dict[str, asyncio.Task[None]] = {}
        self._control_sub: Subscription | None = None
        self._heads: OrderedDict[str, _Head] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._purging: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    # -- subjects ------------------------------------------------------------------------------

    def _stored(self, channel: str) -> str:
        return f"{self.prefix}.s.{channel_token(channel)}"

    def _live(self, channel: str) -> str:
        return f"{self.prefix}.ch.{channel_token(channel)}"

    def _present(self, channel: str, client: str = "") -> str:
        base = f"$KV.{self.presence_bucket}.{channel_token(channel)}"
        return f"{base}.{channel_token(client)}" if client else base

    @property
    def _control(self) -> str:
        return f"{self.prefix}.control"

    # -- life ----------------------------------------------------------------------------------

    async def _connection(self) -> Client:
        """The connection, made (and the streams provisioned) on first use."""
        if self._closed:
            raise BrokerUnavailable("nats: the broker is closed")
        nc = self._nc
        if nc is not None:
            if not nc.is_connected:
                raise BrokerUnavailable(f"nats: not connected to {self._where()} (reconnecting)")
            checking = self._checking
            if checking is not None and not checking.done():
                # just reconnected: the streams may be gone (storage lost) until checked
                await asyncio.shield(checking)
            return nc
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._nc is None:
                self._nc = await self._connect()
            return self._nc

    def _where(self) -> str:
        parts = urlsplit(self.server)
        return f"{parts.hostname}:{parts.port or 4222}"

    async def _connect(self) -> Client:
        try:
            nc = await nats.connect(
                self.server,
                name=f"tidings-{self.prefix}-{new_epoch()}",
                # the first connection must fail fast (an unreachable URL is an error to
                # report: two attempts, no wait); reconnecting forever is switched on below
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=max(1, round(self.timeout)),
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                reconnect_to_server_handler=_backoff,
                # a link that died without a FIN or RST (no reply to two pings) is replaced
                ping_interval=self.ping_interval,  # float seconds work (asyncio.sleep)
                max_outstanding_pings=2,
            )
        except _FAILURES as exc:
            raise BrokerUnavailable(f"nats: cannot connect to {self._where()}: {exc!r}") from exc
        # nats-py reads these options on every reconnection: from now on, never give up
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        try:
            await self._provision(nc)
        except BaseException:
            await nc.close()
            raise
        return nc

    async def _provision(self, nc: Client) -> None:
        """Create both streams unless they exist (idempotent; run again if storage was lost)."""
        js = nc.jetstream(timeout=self.timeout)
        configs = (
            StreamConfig(
                name=self.stream,
                subjects=[f"{self.prefix}.s.>"],
                storage=self.storage,
                num_replicas=self.replicas,
                max_age=self.max_age,
                allow_direct=True,
                republish=RePublish(src=f"{self.prefix}.s.>", dest=f"{self.prefix}.ch.>"),
            ),
            StreamConfig(
                # a key/value bucket as nats.go makes one (history 1, ttl), keys
                # <channel token>.<client token>; entries also carry their own expiry
                name=self.presence_stream,
                subjects=[f"$KV.{self.presence_bucket}.>"],
                storage=self.storage,
                num_replicas=self.replicas,
                max_age=self.presence_max_age,
                max_msgs_per_subject=1,
                discard=DiscardPolicy.NEW,
                allow_rollup_hdrs=True,
                deny_delete=True,
                allow_direct=True,
            ),
        )
        for config in configs:
            try:
                await js.stream_info(config.name or "")
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(config)
                except nats.js.errors.BadRequestError as exc:
                    if exc.err_code != 10058:  # another node created it meanwhile
                        raise
        self._heads.clear()

    async def start(self, handler: EventHandler) -> None:
        await super().start(handler)
        nc = await self._connection()
        try:
            self._control_sub = await nc.subscribe(self._control, cb=self._on_control)
            await self._flush(nc)
        except _FAILURES as exc:
            await self.close()
            raise BrokerUnavailable(f"nats: {exc!r}") from exc
        self._started = True

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in [*self._subscribing.values(), *self._background]:
            task.cancel()
        if self._checking is not None:
            self._checking.cancel()
        self._subs.clear()
        self._wanted.clear()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    @_reachable
    async def ping(self) -> None:
        await self._flush(await self._connection())

    async def _flush(self, nc: Client) -> None:
        """Wait until the server has processed everything sent so far (a PING/PONG)."""
        await nc.flush(timeout=self.timeout)  # type: ignore[arg-type]  # seconds, float works

    # -- connection events ---------------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        log.warning("nats (%s): %s", self._where(), exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("nats connection to %s lost; reconnecting", self._where())

    async def _on_reconnected(self) -> None:
        # nats-py sent every SUB again and flushed before calling this: from here nothing is
        # missed, so this is when the hub catches up on what was published meanwhile
        log.warning(
            "nats reconnected to %s; resubscribed %d channels", self._where(), len(self._subs)
        )
        self._heads.clear()
        nc = self._nc
        if nc is not None:
            # before anything else uses the link: the server may be back without its store
            self._checking = asyncio.get_running_loop().create_task(self._check_streams(nc))
            self._spawn(self._resync(self._checking))

    async def _check_streams(self, nc: Client) -> None:
        try:
            await self._provision(nc)
        except Exception as exc:  # a call that finds a stream missing creates it again
            log.warning("nats: checking streams after reconnecting failed: %s", exc)

    async def _resync(self, checking: asyncio.Task[None]) -> None:
        await checking
        try:
            self.handler.on_resync()
        except Exception:
            log.exception("resync after reconnection failed")

    # -- receiving -----------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        self.handler.on_control(msg.data)

    def _receiver(self, channel: str) -> Callable[[Msg], Awaitable[None]]:
        async def receive(msg: Msg) -> None:
            if channel not in self._wanted:
                return  # unsubscribed meanwhile
            try:
                headers = msg.headers
                if headers is not None and "Nats-Stream" in headers:  # a stored record
                    if headers.get(KIND) != "P":
                        return  # a meta record: nothing for subscribers
                    event: Publication | JoinLeave = _publication(
                        channel, int(headers[OFFSET]), headers[EPOCH], msg.data
                    )
                else:
                    kind = msg.data[:2]
                    if kind not in (b"J\n", b"L\n"):
                        raise ValueError(f"unknown message kind {kind!r}")
                    event = JoinLeave(
                        channel, decode_info(orjson.loads(msg.data[2:])), kind == b"J\n"
                    )
            except Exception:  # whatever arrives, the reader must go on
                log.warning("ignoring a malformed message on channel %r", channel)
                return
            if isinstance(event, Publication):
                self.handler.on_publication(event)
            else:
                self.handler.on_join_leave(event)

        return receive

    async def subscribe(self, channel: str) -> None:
        if not self._started:
            raise RuntimeError("the NATS broker is not started")
        task = self._subscribing.get(channel)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._subscribe(channel))
            self._subscribing[channel] = task
            task.add_done_callback(lambda _: self._subscribing.pop(channel, None))
        await asyncio.shield(task)

    @_reachable
    async def _subscribe(self, channel: str) -> None:
        nc = await self._connection()
        if channel not in self._subs:
            self._wanted.add(channel)
            self._subs[channel] = await nc.subscribe(
                self._live(channel), cb=self._receiver(channel)
            )
        try:
            await self._flush(nc)
        except BaseException:
            self._wanted.discard(channel)
            sub = self._subs.pop(channel, None)
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            raise

    async def unsubscribe(self, channel: str) -> None:
        task = self._subscribing.get(channel)
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        self._wanted.discard(channel)
        sub = self._subs.pop(channel, None)
        if sub is not None:
            # removed locally at once: nothing more is handed over for it, connected or not
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # -- publishing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serialised(self, channel: str) -> Any:
        """One store at a time per channel on this node: they would only conflict."""
        lock, users = self._locks.get(channel) or (asyncio.Lock(), 0)
        self._locks[channel] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[channel]
            if users == 1:
                del self._locks[channel]
            else:
                self._locks[channel] = (lock, users - 1)

    def _remember(self, channel: str, head: _Head | None) -> None:
        if head is None:
            self._heads.pop(channel, None)
            return
        self._heads[channel] = head
        self._heads.move_to_end(channel)
        if len(self._heads) > HEADS_CACHED:
            self._heads.popitem(last=False)

    async def _head(self, nc: Client, channel: str) -> _Head | None:
        """The channel's last record, from the server (None: it has none)."""
        record = await self._get(nc, f"{self.stream}.{self._stored(channel)}", b"")
        if record is None:
            return None
        return _Head(record.seq, record.offset, record.epoch, record.written)

    async def _get(self, nc: Client, suffix: str, request: bytes) -> _Record | None:
        """A JetStream direct get on ``$JS.API.DIRECT.GET.<suffix>``; None when not found."""
        try:
            msg = await nc.request(f"$JS.API.DIRECT.GET.{suffix}", request, timeout=self.timeout)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            # With JetStream on, a direct get for a stream that does not exist goes unanswered
            # (no 503 either): check the stream, and start over if it is gone (storage lost)
            if not nc.is_connected:
                raise
            if not await self._stream_exists(nc):
                await self._provision(nc)
                return None
            # it exists: created meanwhile (by another node), or the server was slow
            msg = await nc.request(f"$JS.API.DIRECT.GET.{suffix}", request, timeout=self.timeout)
        status = (msg.headers or {}).get("Status")
        if status == "404":
            return None
        if status is not None:
            raise BrokerUnavailable(f"nats: direct get answered {status}: {msg.headers}")
        try:
            headers = msg.headers or {}
            return _record(headers, msg.data, int(headers["Nats-Sequence"]))
        except (KeyError, ValueError):
            log.warning("ignoring a foreign record %r in stream %s", msg.headers, self.stream)
            return None

    async def _stream_exists(self, nc: Client) -> bool:
        try:
            await nc.jetstream(timeout=self.timeout).stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def _store(
        self, nc: Client, channel: str, head: _Head | None, headers: dict[str, str], body: bytes
    ) -> int | None:
        """Store a record after ``head``; its stream sequence, or None if another came first."""
        headers[EXPECT] = headers[PREV] = str(head.seq if head else 0)
        js = nc.jetstream(timeout=self.timeout)
        try:
            ack = await js.publish(self._stored(channel), body, headers=headers)
        except nats.js.errors.NoStreamResponseError:
            await self._provision(nc)  # storage was lost: the stream starts over
            return None
        except nats.js.errors.APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise
        return int(ack.seq)

    def _alive(self, head: _Head | None, now: float, meta_ttl: float) -> bool:
        return head is not None and head.written + meta_ttl > now

    @_reachable
    async def publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        nc = await self._connection()
        meta: dict[str, Any] = {"t": time.time()}
        if info is not None:
            meta["i"] = encode_info(info)
        if tags:
            meta["g"] = tags
        body = orjson.dumps(meta) + b"\n" + data
        async with self._serialised(channel):
            head = self._heads.get(channel)
            async for _ in self._attempts(channel):
                if head is None:
                    head = await self._head(nc, channel)
                now = time.time()
                if head is not None and self._alive(head, now, history.meta_ttl):
                    offset, epoch = head.offset + 1, head.epoch
                else:
                    offset, epoch = 1, new_epoch()
                kept = history.size > 0
                headers = {
                    KIND: "P",
                    OFFSET: str(offset),
                    EPOCH: epoch,
                    WHEN: repr(now),
                    EXPIRES: repr(now + history.ttl if history.ttl > 0 else 0.0) if kept else "-1",
                    SIZE: str(history.size),
                }
                seq = await self._store(nc, channel, head, headers, body)
                if seq is not None:
                    self._remember(channel, _Head(seq, offset, epoch, now))
                    self._maybe_purge(nc, channel, offset, history.size)
                    return StreamPosition(offset, epoch)
                head = None  # another node stored first: read where the stream is now
        raise AssertionError("unreachable: _attempts ends by raising")

    async def _attempts(self, channel: str) -> AsyncIterator[int]:
        """Tries at storing a record while other nodes keep storing first: each conflict means
        another node made progress, so keep going, for ``timeout`` seconds at most (then
        BrokerUnavailable); after a few conflicts in a row, wait a jittered moment so racing
        nodes spread out."""
        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            yield attempt
            attempt += 1
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"nats: channel {channel!r}: {attempt} conflicting writes in a row"
                )
            if attempt >= 3:
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))

    def _maybe_purge(self, nc: Client, channel: str, offset: int, size: int) -> None:
        """Every few publications, drop a channel's records beyond what history may return."""
        step = max(8, size // 2)
        if offset % step or channel in self._purging:
            return
        self._purging.add(channel)

        async def purge() -> None:
            try:
                js = nc.jetstream(timeout=self.timeout)
                await js.purge_stream(
                    self.stream, subject=self._stored(channel), keep=max(1, size) + PURGE_SLACK
                )
            except Exception as exc:  # history reads filter anyway; the next purge retries
                log.debug("purging channel %r failed: %s", channel, exc)
            finally:
                self._purging.discard(channel)

        self._spawn(purge())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @_reachable
    async def publish_join_leave(self, event: JoinLeave) -> None:
        nc = await self._connection()
        kind = b"J\n" if event.join else b"L\n"
        await nc.publish(self._live(event.channel), kind + orjson.dumps(encode_info(event.info)))

    @_reachable
    async def publish_control(self, data: bytes) -> None:
        nc = await self._connection()
        await nc.publish(self._control, data)

    # -- streams -------------------------------------------------------------------------------

    async def _position(self, nc: Client, channel: str, meta_ttl: float) -> _Head:
        """The stream's current head, starting a new life for a lost one and keeping an idle
        one alive (a meta record once the last record is older than half of ``meta_ttl``)."""
        head = await self._head(nc, channel)
        if head is not None and head.written + meta_ttl / 2 > time.time():
            return head  # the usual case: no write, so no need to wait for this node's others
        async with self._serialised(channel):
            async for _ in self._attempts(channel):
                head = await self._head(nc, channel)
                now = time.time()
                if head is not None and head.written + meta_ttl / 2 > now:
                    return head
                if self._alive(head, now, meta_ttl):
                    assert head is not None
                    offset, epoch = head.offset, head.epoch
                else:
                    offset, epoch = 0, new_epoch()
                headers = {KIND: "M", OFFSET: str(offset), EPOCH: epoch, WHEN: repr(now)}
                seq = await self._store(nc, channel, head, headers, b"")
                if seq is not None:
                    head = _Head(seq, offset, epoch, now)
                    self._remember(channel, head)
                    return head
        raise AssertionError("unreachable: _attempts ends by raising")

    @_reachable
    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
        meta_ttl: float = DEFAULT_META_TTL,
    ) -> HistoryResult:
        nc = await self._connection()
        head = await self._position(nc, channel, meta_ttl)
        position = StreamPosition(head.offset, head.epoch)
        after = since.offset if since is not None else 0
        if limit == 0 or head.offset <= after:
            return HistoryResult([], position)
        newest_first = await self._walk(nc, channel, head, after, limit if reverse else None)
        pubs = [_publication(channel, r.offset, r.epoch, r.body) for r in newest_first]
        if not reverse:
            pubs.reverse()
            if limit is not None and limit > 0:
                pubs = pubs[:limit]
        return HistoryResult(pubs, position)

    async def _walk(
        self, nc: Client, channel: str, head: _Head, after: int, limit: int | None
    ) -> list[_Record]:
        """Kept publications of ``head``'s epoch after offset ``after``, newest first, at most
        ``limit`` (None or negative: no limit). A short read follows each record's link to the
        one before, one direct get each; a longer one reads all the channel's records at once
        through a short-lived consumer (JetStream before 2.11 has no batched get)."""
        window = _Window(head, after, limit)
        wanted = head.offset - after
        if limit is not None and limit > 0:
            wanted = min(wanted, limit)
        if wanted <= DIRECT_READS:
            while (seq := window.wanted) and (
                record := await self._get(nc, self.stream, orjson.dumps({"seq": seq}))
            ):
                if not window.take(record):
                    break
            return window.found
        records = await self._scan(nc, channel, head)
        while (seq := window.wanted) and (record := records.get(seq)):
            if not window.take(record):
                break
        return window.found

    async def _scan(self, nc: Client, channel: str, head: _Head) -> dict[int, _Record]:
        """Every record of ``channel`` up to ``head``, by stream sequence, through an ephemeral
        push consumer filtered on the channel's subject (deleted afterwards)."""
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        name = ""
        try:
            config = {
                "deliver_subject": inbox,
                "filter_subject": self._stored(channel),
                "deliver_policy": "all",
                "ack_policy": "none",
                "replay_policy": "instant",
                "mem_storage": True,
                "inactive_threshold": int(SCAN_IDLE * 1e9),
            }
            reply = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{self.stream}",
                orjson.dumps({"stream_name": self.stream, "config": config}),
                timeout=self.timeout,
            )
            info = orjson.loads(reply.data)
            if "error" in info:
                raise BrokerUnavailable(f"nats: reading history failed: {info['error']}")
            name = info["name"]
            records: dict[int, _Record] = {}
            pending = int(info.get("num_pending", 0))
            while pending > 0:
                msg = await sub.next_msg(timeout=self.timeout)
                meta = msg.metadata
                pending = meta.num_pending
                seq = meta.sequence.stream
                with contextlib.suppress(KeyError, ValueError):
                    records[seq] = _record(msg.headers or {}, msg.data, seq)
                if seq >= head.seq:
                    break
            return records
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name:
                self._spawn(self._delete_consumer(nc, name))

    async def _delete_consumer(self, nc: Client, name: str) -> None:
        with contextlib.suppress(Exception):
            await nc.request(
                f"$JS.API.CONSUMER.DELETE.{self.stream}.{name}", b"", timeout=self.timeout
            )

    @_reachable
    async def remove_history(self, channel: str) -> None:
        nc = await self._connection()
        async with self._serialised(channel):
            head = await self._head(nc, channel)
            if head is None:
                return
            # a meta record keeps offset and epoch; everything before it goes
            headers = {
                KIND: "M",
                OFFSET: str(head.offset),
                EPOCH: head.epoch,
                WHEN: repr(head.written),
            }
            seq = await self._store(nc, channel, head, headers, b"")
            self._remember(channel, None)
            if seq is not None:
                js = nc.jetstream(timeout=self.timeout)
                await js.purge_stream(self.stream, subject=self._stored(channel), keep=1)

    # -- presence ------------------------------------------------------------------------------

    @_reachable
    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        nc = await self._connection()
        entry = orjson.dumps({"x": time.time() + ttl, "i": encode_info(info)})
        js = nc.jetstream(timeout=self.timeout)
        try:
            await js.publish(self._present(channel, info.client), entry)
        except nats.js.errors.NoStreamResponseError:
            await self._provision(nc)
            await js.publish(self._present(channel, info.client), entry)

    @_reachable
    async def remove_presence(self, channel: str, client: str) -> None:
        nc = await self._connection()
        js = nc.jetstream(timeout=self.timeout)
        await js.purge_stream(self.presence_stream, subject=self._present(channel, client))

    @_reachable
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        nc = await self._connection()
        subjects = await self._presence_subjects(nc, channel)
        replies = await asyncio.gather(
            *(
                nc.request(
                    f"$JS.API.DIRECT.GET.{self.presence_stream}.{s}", b"", timeout=self.timeout
                )
                for s in subjects
            )
        )
        now = time.time()
        present: dict[str, ClientInfo] = {}
        for subject, msg in zip(subjects, replies, strict=True):
            if (msg.headers or {}).get("Status"):
                continue  # removed meanwhile
            try:
                entry = orjson.loads(msg.data)
                expires, info = float(entry["x"]), decode_info(entry["i"])
            except (KeyError, TypeError, ValueError):
                continue
            if expires > now:
                present[info.client] = info
            else:  # its node stopped refreshing it (e.g. it was killed): drop it for good
                self._spawn(self._purge_presence(nc, subject))
        return present

    async def _presence_subjects(self, nc: Client, channel: str) -> list[str]:
        request = orjson.dumps({"subjects_filter": f"{self._present(channel)}.>"})
        try:
            msg = await nc.request(
                f"$JS.API.STREAM.INFO.{self.presence_stream}", request, timeout=self.timeout
            )
        except nats.errors.NoRespondersError:
            await self._provision(nc)
            return []
        reply = orjson.loads(msg.data)
        if "error" in reply:
            if reply["error"].get("err_code") == 10059:  # stream not found
                await self._provision(nc)
                return []
            raise BrokerUnavailable(f"nats: stream info failed: {reply['error']}")
        subjects = reply.get("state", {}).get("subjects") or {}
        return sorted(subjects)

    async def _purge_presence(self, nc: Client, subject: str) -> None:
        with contextlib.suppress(Exception):
            js = nc.jetstream(timeout=self.timeout)
            await js.purge_stream(self.presence_stream, subject=subject)
