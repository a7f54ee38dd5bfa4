"""The Kafka broker: ``kafka://host:port[,host:port...]?prefix=tidings&presence=redis://...``.

One topic per deployment holds everything: publications, join/leave events, history removals
and control messages. The channel is the record key, and this engine picks its partition
(CRC-32 of the channel modulo the topic's partitions; control messages go to partition 0), so a
channel's records stay in one partition, in order. Every node reads every partition of the topic
from its beginning (no consumer group: each node needs all of it) and keeps, per channel, what
the log says: the offset, the epoch and the publications its history options keep.

How offsets stay consistent without a coordinator: a channel's offset is the number of its
publications since its stream started, counted from the log. Every node reads the same records
in the same order and applies the same rules, so every node computes the same offset for the
same record. The rules, decided only from what is in the records (their timestamps and
headers, never a node's own clock), are:

- a stream starts at the first record of its channel, or at a record that comes more than the
  stream's ``meta_ttl`` after the previous activity (the stream was idle and is forgotten); its
  epoch is derived from that record (partition, Kafka offset, timestamp, record id), so two lives
  of a stream never share an epoch, not even after the log itself was lost and rebuilt;
- a publication adds 1 to the offset; a "touch" record (written by ``history()`` for a stream
  that does not exist yet, is expired, or will expire within half its ``meta_ttl``) starts or
  refreshes a stream without adding to it; a "remove history" record drops kept publications;
- each partition keeps at most ``max_streams // partitions`` streams (at least 1; setting
  ``history_max_streams``, which must be the same on every node; 0: no cap): a record that
  starts a stream of a channel the partition does not hold while it holds that many first
  forgets the partition's least recently active stream (activity: its last publication or
  touch record, in the partition's record order). A forgotten stream's next record starts a new
  life, exactly as after expiry (a new epoch derived from that record), so a client recovering
  from the old one is told ``recovered: false``. The rule is per partition because nodes read
  partitions concurrently (an order across partitions would differ between nodes), and it
  ignores subscribers, which differ between nodes: a subscribed channel can be forgotten too,
  and its next publication then reaches the hub with a new epoch, whose subscribers are told
  the stream was lost (Centrifugo's unsubscribe 2500, else close 3010). Each node counts the
  streams it forgot in :attr:`KafkaBroker.streams_evicted` (metric ``tidings_streams_evicted``);
  every node forgets the same ones. Expired streams stay counted until forgotten this way
  (the sweep only drops their publications): when a node's clock sweeps them does not change
  what the cap forgets.

``publish()`` writes the record (acks from every in-sync replica), then waits until this node's
reader applied it and answers the offset the rules gave it; reads (``history()``) first wait
until the reader caught up with the end of the log, so a node sees what any node published
before.

URL options (in the query string):

- ``prefix``: names the topic (default ``tidings``); deployments sharing a Kafka cluster use
  different prefixes. ``topic`` names the topic outright instead.
- ``partitions`` (default 1) and ``replication`` (default 1): used when this node creates the
  topic (created on start if missing, with ``retention.ms=-1``, see the limits below).
- ``timeout``: seconds a call may take before it fails with :class:`BrokerUnavailable`
  (default 5).
- ``fetch_wait``: seconds a fetch waits on the server for new records (default 0.05); it bounds
  the delivery latency on servers that do not answer a waiting fetch as soon as records arrive
  (Tansu).
- ``check_interval``: seconds between two checks that the server is reachable and still holds the
  log this node read (default 1).
- ``repair``: ``1`` lets a node delete and create again a topic with a partition that cannot be
  read (default 0: it logs what to do). See "Tansu" below.
- ``presence``: the URL of a second engine that keeps presence (``redis://...``, ``postgres://``
  ...). Its own ``prefix`` defaults to this one's. Without it presence calls fail with
  :class:`~tidings.errors.NotAvailable`, whose message says how to configure one: Kafka has no
  expiring keys, and a log is the wrong place for refreshes every few seconds per client.

Failure behaviour: while the server is unreachable, calls raise :class:`BrokerUnavailable`
within ``timeout`` and ``ping()`` (``/health``) fails; the reader resumes where it stopped when
the server is back (nothing is lost: the log kept it) and the hub is asked to resync. When the
log itself is lost (a server restarted without its data, the topic deleted or re-created with
other partitions) the node notices within ``check_interval`` (sooner when it publishes), logs
an error, forgets every stream and reads the new log from its beginning with new clients (the
old ones hold the lost topic's partitions, leaders and fetch positions): every stream gets a
new epoch, so subscribers are told they could not be recovered. Until the new log is read,
writes raise :class:`BrokerUnavailable` at once (rather than go to a topic being deleted or
created again); each step of that reset is bounded by ``timeout`` and tried again at the next
check. A publication confirmed in the moment between the loss and its discovery is counted in
the old epoch, then again in the new.

A client that stops working is replaced (the reader resumes where it stopped): aiokafka (0.14)
runs each consumer's fetches and each producer's sends in one background task, which an
unexpected error ends for good (under uvloop, a write to a connection the server just closed
raises RuntimeError, aio-libs/aiokafka#1038), leaving the client silently idle. The watcher
replaces the clients when such a task ended, when the reader does not read what the checker
can read, or when the producer got no record acknowledged twice in a row while the server
answers.

Tansu (0.6, memory storage), found by the tests: a restart loses every topic; its end offsets
can lag behind records it already serves (so the last record read, not the end offset, proves
the log is still the one read); a client asking
about a topic that does not exist makes Tansu create it with 4 partitions (nodes follow the
topic's partitions, whatever their number); and a record sent right after a restart by a client
that still believes in the old topic is acknowledged but can, depending on timing, never be
read, after which its partition takes no other record. A node notices such a partition (its end
stays ahead of where nothing can be read for ``max(timeout, 3 * check_interval)``, once more
with new clients); with ``repair=1`` it deletes the topic and creates it again (unless the
partition ends before that offset by then: another node was first), otherwise it logs an error
saying so.

Limits: every node replays the whole topic when it starts, and keeps in memory the history its
channels keep (bounded by their history size, and their count by ``max_streams``). Records
must not be deleted from the topic by retention while it is in use: a node started after a
deletion would count offsets from a different point than older nodes (a node that finds a
partition not starting at 0 logs an error). Adding partitions to the topic is a new log:
every stream starts a new epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, TopicAlreadyExistsError

from ..errors import LimitExceeded, NotAvailable
from ._aiokafka import fetching_ended, sending_ended
from .base import (
    DEFAULT_MAX_STREAMS,
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

log = logging.getLogger("tidings.brokers.kafka")


class _Once(logging.Filter):
    """Let each distinct aiokafka warning or error through once per ``every`` seconds.

    While a server is down aiokafka logs every reconnection attempt (about ten lines a second
    per client); this engine logs the outage itself, once."""

    def __init__(self, every: float = 30.0) -> None:
        super().__init__()
        self.every = every
        self._seen: dict[tuple[str, object], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        if now - self._seen.get(key, -math.inf) < self.every:
            return False
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = now
        return True


#: the aiokafka modules that log connection trouble (each logs under its module name, and a
#: filter applies only to the logger it is attached to)
_AIOKAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.admin.client",
    "aiokafka.cluster",
    "aiokafka.conn",
    "aiokafka.consumer.consumer",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
)
_ONCE = _Once()
for _name in _AIOKAFKA_LOGGERS:
    logging.getLogger(_name).addFilter(_ONCE)

OPTIONS: dict[str, OptionKind] = {
    "prefix": str,
    "topic": str,
    "partitions": int,
    "replication": int,
    "timeout": float,
    "fetch_wait": float,
    "check_interval": float,
    "repair": bool,
    "presence": str,
}

# record kinds (the "k" header)
_PUB, _JOIN, _LEAVE, _CONTROL, _TOUCH, _REMOVE = b"p", b"j", b"l", b"c", b"s", b"r"
#: seconds a stream is kept past its expiry before this node forgets it: room for producer
#: clocks that run behind, whose records may still continue the stream on other nodes
_FORGET_MARGIN = 60.0
_SWEEP_INTERVAL = 30.0
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

P = ParamSpec("P")
R = TypeVar("R")


def _reachable(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn aiokafka's failures (and a call outliving ``timeout``) into BrokerUnavailable."""

    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (KafkaError, OSError, TimeoutError) as exc:
            broker = args[0]
            assert isinstance(broker, KafkaBroker)
            raise BrokerUnavailable(broker.describe(exc)) from exc

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _epoch(partition: int, offset: int, timestamp: int, rid: bytes) -> str:
    """The epoch of a stream life that starts at this record: the same on every node."""
    seed = b"%d:%d:%d:" % (partition, offset, timestamp) + rid
    return hashlib.blake2b(seed, digest_size=4).hexdigest()


#: a kept publication: (expires, offset, data, time, info, tags); expires is a wall-clock time
_Kept = tuple[float, int, bytes, float, ClientInfo | None, dict[str, str] | None]


@dataclass(slots=True)
class _Stream:
    epoch: str
    offset: int = 0
    #: wall-clock time (from record timestamps) after which the stream is forgotten
    expires: float = 0.0
    items: deque[_Kept] = field(default_factory=deque)


@dataclass(slots=True)
class _Ignore:
    """The event handler of the presence engine: its events are not ours."""

    def on_publication(self, publication: Publication) -> None:
        return None

    def on_join_leave(self, event: JoinLeave) -> None:
        return None

    def on_control(self, data: bytes) -> None:
        return None

    def on_resync(self) -> None:
        return None


class KafkaBroker(Broker):
    """Kafka (or a Kafka-compatible server such as Tansu) as the broker; see the
    module documentation for the URL options, how offsets are counted and what fails how.

    Raises ValueError for a malformed URL option; every call raises :class:`BrokerUnavailable`
    when the server cannot be reached within ``timeout`` seconds."""

    schemes = ("kafka",)

    def __init__(self, url: str = "kafka://127.0.0.1:9092") -> None:
        super().__init__(url)
        server, options = url_options(url, "kafka", OPTIONS)
        parts = urlsplit(server)
        if not parts.netloc:
            raise ValueError(f"kafka URL {url!r} names no server (kafka://host:port)")
        self.bootstrap = [h.strip() for h in parts.netloc.split(",") if h.strip()]
        self.prefix = options.get("prefix", "") or "tidings"
        self.topic = options.get("topic", "") or self.prefix
        if not _TOPIC_NAME.match(self.topic):
            raise ValueError(
                f"kafka topic name {self.topic!r}: use 1-249 letters, digits, '.', '_' or '-'"
            )
        self.partitions = options.get("partitions", 1)
        self.replication = options.get("replication", 1)
        self.timeout = options.get("timeout", 5.0)
        self.fetch_wait = options.get("fetch_wait", 0.05)
        self.check_interval = options.get("check_interval", 1.0)
        self.repair = options.get("repair", False)
        self.presence_url = options.get("presence", "") or None
        self._presence: Broker | None = None
        if self.presence_url is not None:
            from . import create_broker

            self._presence = create_broker(_with_prefix(self.presence_url, self.prefix))
        self.node_id = (new_epoch() + new_epoch()).encode()
        self._seq = 0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._checker: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[int, int] = {}  # partition -> next Kafka offset to apply
        self._last: dict[int, tuple[int, int, bytes]] = {}  # partition -> (offset, ts, id)
        self._streams: dict[str, _Stream] = {}
        #: partition -> its streams' channels, least recently active first (the cap's order)
        self._activity: dict[int, OrderedDict[str, None]] = {}
        #: streams kept at most over the topic's partitions, split evenly (module docstring);
        #: 0: no cap. The same on every node, set before ``start()``.
        self.max_streams = DEFAULT_MAX_STREAMS
        #: streams this node forgot to stay under ``max_streams`` (each restarts with a new
        #: epoch); every node forgets the same ones
        self.streams_evicted = 0
        self._channels: set[str] = set()
        self._pending: dict[bytes, asyncio.Future[StreamPosition]] = {}
        self._touching: dict[str, asyncio.Future[StreamPosition | None]] = {}
        self._lost: str | None = None  # why the log is lost, until a reset succeeded
        #: (partition, position) where nothing can be read: the topic must be deleted and
        #: created again (see _stuck_partition and _reset)
        self._broken: tuple[int, int] | None = None
        self._stuck: dict[int, tuple[int, float]] = {}  # partition -> (position, since)
        #: (partition, position) found unreadable once: asked again with new clients
        self._doubted: set[tuple[int, int]] = set()
        self._stale: str | None = None  # why the clients must be replaced (see _renew)
        self._unsent = 0  # records in a row the producer did not get acknowledged in time
        self._retiring: set[asyncio.Task[None]] = set()  # replaced clients being stopped
        self._advanced = asyncio.Event()
        self._check_now = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outage: str | None = None
        self._started = False
        self._closed = False

    def describe(self, exc: BaseException) -> str:
        """A one-line account of a failure talking to the server."""
        if isinstance(exc, TimeoutError) and not str(exc):
            return f"kafka at {','.join(self.bootstrap)}: no answer within {self.timeout:g}s"
        return f"kafka at {','.join(self.bootstrap)}: {exc!r}"

    # -- life ----------------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        return {
            "bootstrap_servers": self.bootstrap,
            "request_timeout_ms": int(self.timeout * 1000),
            "retry_backoff_ms": 50,
        }

    def _consumer_for(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            **self._client_options(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=max(1, int(self.fetch_wait * 1000)),
        )

    async def start(self, handler: EventHandler) -> None:
        """Connect, create the topic if missing and read the log up to its end; raises
        :class:`BrokerUnavailable` if that does not succeed within ``timeout`` seconds (the
        replay of a long log is not limited)."""
        await super().start(handler)
        if self._closed:
            raise BrokerUnavailable("kafka: the broker was closed")
        try:
            async with asyncio.timeout(self.timeout):
                self._admin = AIOKafkaAdminClient(**self._client_options())
                await self._admin.start()
                await self._ensure_topic()
                await self._open_clients()
                await self._assign()
            if self._presence is not None:
                await self._presence.start(_Ignore())
            else:
                log.warning(
                    "kafka broker without a presence engine: presence calls will fail; "
                    "add ?presence=redis://... to the broker URL to keep presence"
                )
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_forever())
            self._started = True
            await self._caught_up(None)
            self._tasks = [
                loop.create_task(self._watch_forever()),
                loop.create_task(self._sweep_forever()),
            ]
        except BaseException as exc:
            await self.close()
            if isinstance(exc, KafkaError | OSError | TimeoutError):
                raise BrokerUnavailable(f"cannot start: {self.describe(exc)}") from exc
            raise

    async def _open_clients(self) -> None:
        """Start a new producer, reader and checker, retiring the ones before (if any).

        After the log was lost the old clients describe a topic that is gone: their metadata
        (partitions, leaders), the reader's fetch positions and the batches the producer still
        retries all belong to it, so they are replaced rather than trusted to notice. Until the
        new ones have started there are none (calls raise BrokerUnavailable). Raises KafkaError
        or OSError if the server cannot be reached (the caller bounds it)."""
        for old in (self._producer, self._consumer, self._checker):
            if old is not None:
                self._retire(old)
        self._producer = self._consumer = self._checker = None
        producer = AIOKafkaProducer(**self._client_options(), acks="all", linger_ms=0)
        consumer, checker = self._consumer_for(), self._consumer_for()
        started: list[AIOKafkaProducer | AIOKafkaConsumer] = []
        try:
            for client in (producer, consumer, checker):
                await client.start()
                started.append(client)
        except BaseException:
            for client in started:
                self._retire(client)
            raise
        self._producer, self._consumer, self._checker = producer, consumer, checker

    def _retire(self, client: AIOKafkaProducer | AIOKafkaConsumer) -> None:
        """Stop a client in the background, given ``timeout`` seconds: a producer's stop waits
        for the batches it still holds, which may be for a topic that is gone."""

        async def stop() -> None:
            try:
                async with asyncio.timeout(self.timeout):
                    await client.stop()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                log.debug("stopping a replaced kafka client: %r", exc)

        task = asyncio.get_running_loop().create_task(stop())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _ensure_topic(self) -> None:
        assert self._admin is not None
        if await self._layout() is not None:
            return
        topic = NewTopic(
            self.topic, self.partitions, self.replication, topic_configs={"retention.ms": "-1"}
        )
        with contextlib.suppress(TopicAlreadyExistsError):  # another node was first
            response = await self._admin.create_topics([topic])
            for name, code, *_ in response.topic_errors:
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise BrokerUnavailable(f"kafka: cannot create topic {name}: error {code}")
                if code == 0:
                    log.info("created kafka topic %s (%d partitions)", name, self.partitions)

    async def _layout(self) -> set[int] | None:
        """The topic's partitions now (None: no such topic). Asks about every topic, not this
        one by name: a server that creates topics on demand (Tansu) would create it."""
        assert self._admin is not None
        for topic in await self._admin.describe_topics():
            if topic["topic"] == self.topic and topic["error_code"] == 0:
                return {p["partition"] for p in topic["partitions"]} or None
        return None

    async def _delete_topic(self) -> None:
        assert self._admin is not None
        await self._admin.delete_topics([self.topic])

    async def _assign(self) -> None:
        """Read every partition of the topic from its beginning."""
        assert self._consumer is not None and self._checker is not None
        partitions = await self._layout()
        while not partitions:  # a topic just created can take a moment to show
            await asyncio.sleep(0.05)
            partitions = await self._layout()
        await self._consumer.topics()  # the consumers' own metadata, for the fetches
        self._tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self._consumer.assign(self._tps)
        self._checker.assign(self._tps)
        self._checker.pause(*self._tps)  # it fetches only when checking
        beginnings = await self._consumer.beginning_offsets(self._tps)
        for tp in self._tps:
            start = beginnings[tp]
            if start > 0:
                log.error(
                    "kafka topic %s partition %d starts at offset %d, not 0: records were "
                    "deleted, so this node may count channel offsets differently from nodes "
                    "started earlier (keep retention off for this topic)",
                    self.topic,
                    tp.partition,
                    start,
                )
            self._consumer.seek(tp, start)
            self._positions[tp.partition] = start

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._started = False
        tasks = [*self._tasks, *([self._reader] if self._reader else [])]
        self._tasks, self._reader = [], None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._retiring:  # replaced clients: each stop is bounded by timeout
            await asyncio.wait(list(self._retiring))
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable("kafka: the broker was closed"))
        self._pending.clear()
        for client in (self._producer, self._consumer, self._checker):
            if client is not None:
                try:
                    await client.stop()
                except asyncio.CancelledError:
                    # aiokafka's consumer re-raises the cancellation of its own fetch task
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise
                except Exception as exc:
                    log.debug("stopping a kafka client: %r", exc)
        self._producer = self._consumer = self._checker = None
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
            self._admin = None
        if self._presence is not None:
            await self._presence.close()
        self._streams.clear()
        self._activity.clear()
        self._channels.clear()

    async def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` unless the server answers within ``timeout``
        seconds (and the presence engine, if any, answers too)."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._consumer is None or not self._started:
                    await self._probe()
                elif self._outage is not None:
                    raise BrokerUnavailable(f"unreachable: {self._outage}")
                else:
                    await self._consumer.end_offsets(self._tps)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerUnavailable(self.describe(exc)) from exc
        if self._presence is not None:
            await self._presence.ping()

    async def _probe(self) -> None:
        admin = AIOKafkaAdminClient(**self._client_options())
        try:
            await admin.start()
            await admin.list_topics()
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    def _require_started(self) -> None:
        if not self._started:
            raise BrokerUnavailable("kafka: the broker is not started (or was closed)")

    # -- the reader ----------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while True:
            try:
                batches = await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aiokafka retries connections itself; keep reading
                log.warning("kafka fetch failed: %r", exc)
                await asyncio.sleep(0.1)
                continue
            for tp, records in batches.items():
                for record in records:
                    if record.offset < self._positions.get(tp.partition, 0):
                        continue  # already applied (a seek can refetch)
                    try:
                        self._apply(tp.partition, record)
                    except Exception:  # whatever is in the log, the reader must go on
                        log.exception("ignoring a malformed kafka record at %d", record.offset)
                    self._positions[tp.partition] = record.offset + 1
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()

    def _apply(self, partition: int, record: Any) -> None:
        headers = dict(record.headers or ())
        kind = headers.get("k", b"")
        rid = headers.get("i", b"")
        ts: int = record.timestamp
        self._last[partition] = (record.offset, ts, rid)
        if kind == _CONTROL:
            self.handler.on_control(record.value or b"")
            return
        channel = (record.key or b"").decode()
        at = ts / 1000
        if kind in (_JOIN, _LEAVE):
            if channel in self._channels:
                who = decode_info(orjson.loads(record.value))
                self.handler.on_join_leave(JoinLeave(channel, who, kind == _JOIN))
            return
        if kind in (_PUB, _TOUCH, _REMOVE) and partition != self._partition_of(record.key or b""):
            # written by a node that counted partitions differently: every node skips it, so
            # no stream is counted from two partitions (its writer times out, never succeeds)
            log.warning("ignoring a record of channel %r in partition %d", channel, partition)
            return
        stream = self._streams.get(channel)
        if kind == _REMOVE:
            if stream is not None:
                stream.items.clear()
            self._resolve(rid, None)
            return
        if kind == _TOUCH:
            meta_ttl = float(headers["h"])
        elif kind == _PUB:
            size_raw, ttl_raw, meta_raw = headers["h"].split(b" ")
            size, ttl, meta_ttl = int(size_raw), float(ttl_raw), float(meta_raw)
            # parsed before anything changes: a malformed record changes nothing
            meta = orjson.loads(headers["m"]) if "m" in headers else {}
            info = decode_info(meta["i"]) if "i" in meta else None
            tags = meta.get("g")
        else:
            return
        if self.max_streams:  # no cap: nothing to order (the sweep forgets expired streams)
            recent = self._activity.setdefault(partition, OrderedDict())
            if channel in recent:
                recent.move_to_end(channel)
            else:
                self._make_room(recent)
                recent[channel] = None
        if stream is None or at > stream.expires:
            stream = self._streams[channel] = _Stream(_epoch(partition, record.offset, ts, rid))
        stream.expires = max(stream.expires, at + meta_ttl)
        if kind == _TOUCH:
            self._resolve(rid, None)
            return
        stream.offset += 1
        data: bytes = record.value or b""
        if size > 0:
            items = stream.items
            items.append((at + ttl if ttl > 0 else math.inf, stream.offset, data, at, info, tags))
            while len(items) > size:
                items.popleft()
        position = StreamPosition(stream.offset, stream.epoch)
        self._resolve(rid, position)
        if channel in self._channels:
            self.handler.on_publication(
                Publication(channel, data, stream.offset, stream.epoch, info, tags, at)
            )

    def _make_room(self, recent: OrderedDict[str, None]) -> None:
        """Before a partition holds one more stream: forget its least recently active one if
        it holds its share of ``max_streams`` already (decided from the log alone, see the
        module docstring)."""
        cap = max(1, self.max_streams // max(1, len(self._tps)))
        while len(recent) >= cap:
            name, _ = recent.popitem(last=False)
            self._streams.pop(name, None)
            self.streams_evicted += 1

    def _resolve(self, rid: bytes, position: StreamPosition | None) -> None:
        waiter = self._pending.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(position or StreamPosition(0, ""))

    async def _caught_up(self, ends: dict[TopicPartition, int] | None) -> None:
        """Wait until the reader applied everything up to ``ends`` (None: the log's end now).

        Raises TimeoutError when the reader makes no progress for ``timeout`` seconds (a long
        replay that keeps moving is waited for)."""
        consumer = self._consumer
        if consumer is None or self._lost is not None:
            raise BrokerUnavailable(
                f"kafka: the log was lost ({self._lost}); not reading it yet"
                if self._lost
                else "kafka: the reader stopped"
            )
        if ends is None:
            async with asyncio.timeout(self.timeout):
                ends = await consumer.end_offsets(self._tps)
        loop = asyncio.get_running_loop()
        progress, since = -1, loop.time()
        while True:
            behind = [
                (tp.partition, end)
                for tp, end in ends.items()
                if self._positions.get(tp.partition, 0) < end
            ]
            if not behind:
                return
            if self._reader is None or self._reader.done():
                raise BrokerUnavailable(
                    f"kafka: the log was lost ({self._lost}); not reading it yet"
                    if self._lost
                    else "kafka: the reader stopped"
                )
            done = sum(self._positions.get(p, 0) for p, _ in behind)
            if done != progress:
                progress, since = done, loop.time()
            left = since + self.timeout - loop.time()
            if left <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), left)

    # -- watching the server and the log -------------------------------------------------------

    async def _watch_forever(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = 0.0  # when the clients were last replaced during this outage
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.check_interval)
            self._check_now.clear()
            try:
                if self._lost is None:
                    stale = self._stale or self._stopped_working()
                    if stale is not None:
                        log.warning("kafka clients replaced: %s", stale)
                        await self._renew()
                    self._lost = await self._verify()
                if self._lost is not None:
                    await self._reset(self._lost)
                    self._lost = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._outage is None:
                    log.error("kafka unreachable: %s", self.describe(exc))
                    renewed = loop.time()
                self._outage = self.describe(exc)
                if self._lost is None and loop.time() - renewed > 3 * self.timeout:
                    # an outage this long may be the clients' own state (metadata of a topic
                    # that changed under them): new ones, resuming where the reader stopped
                    renewed = loop.time()
                    with contextlib.suppress(Exception):
                        await self._renew()
                continue
            if self._outage is not None:
                log.warning("kafka reachable again; the reader resumes where it stopped")
                self._outage = None
                self._resync()

    def _stopped_working(self) -> str | None:
        """Whether a client's background task ended for good.

        aiokafka (0.14) fetches in one background task per consumer and sends in one per
        producer. An unexpected error there ends the task: under uvloop, a RuntimeError writing
        to a connection the server just closed (aio-libs/aiokafka#1038), seen here when Tansu
        restarts. From then on a consumer's ``getmany`` returns nothing and a producer's records
        are never sent, without an error, forever (aio-libs/aiokafka#983 is the same symptom)."""
        if self._consumer is None or self._reader is None or self._reader.done():
            return "the reader is not running"  # a replacement that failed midway
        for name, client in (("reader", self._consumer), ("checker", self._checker)):
            if fetching_ended(client):
                return f"the {name}'s client stopped fetching"
        if sending_ended(self._producer):
            return "the producer stopped sending"
        return None

    async def _renew(self) -> None:
        """Replace the clients and read on from where the reader stopped (the log is not
        known to be lost). Raises TimeoutError, KafkaError or OSError after ``timeout``."""
        self._stale = None
        self._unsent = 0
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        async with asyncio.timeout(self.timeout):
            await self._open_clients()
            assert self._consumer is not None and self._checker is not None
            self._consumer.assign(self._tps)
            self._checker.assign(self._tps)
            self._checker.pause(*self._tps)
            for tp in self._tps:
                self._consumer.seek(tp, self._positions.get(tp.partition, 0))
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    def _resync(self) -> None:
        try:
            self.handler.on_resync()
        except Exception:  # the handler's failure must not stop the watcher
            log.exception("resync after a kafka outage failed")

    async def _verify(self) -> str | None:
        """Why the log this node read is gone (None: it is not): a partition now ends before
        what this node read, or the last record it read is no longer there, or a partition
        holds records nobody can read (then ``self._broken`` is set: see :meth:`_reset`).

        Raises TimeoutError (or KafkaError, OSError) when the server does not answer the topic's
        layout and end offsets within ``timeout`` seconds: an outage. Records that do not come
        within the time left for reading them are inconclusive, not an outage."""
        assert self._consumer is not None
        async with asyncio.timeout(self.timeout):
            layout = await self._layout()
            known = {tp.partition for tp in self._tps}
            if layout is None:
                return f"topic {self.topic} is gone"
            if layout != known:
                return f"topic {self.topic} now has {len(layout)} partitions, not {len(known)}"
            # what was read before asking: the answer describes the log at some moment after
            # this, while the reader may read on (past the answer) before it arrives
            read = dict(self._positions)
            ends = await self._consumer.end_offsets(self._tps)
        # each read waits at most half the timeout (see _read_one)
        try:
            async with asyncio.timeout(self.timeout * (1 + len(self._tps))):
                return await self._check_records(read, ends)
        except TimeoutError:
            return None

    async def _check_records(
        self, read: dict[int, int], ends: dict[TopicPartition, int]
    ) -> str | None:
        """The record checks of :meth:`_verify`, given what the reader had read and the ends."""
        # A partition that ends before what this node read was probably lost; but Tansu's end
        # offsets lag behind what it already serves under load, so the last record read decides.
        short = {tp.partition: ends[tp] for tp in self._tps if ends[tp] < read.get(tp.partition, 0)}
        for partition, end in short.items():
            if partition not in self._last:
                return f"partition {partition} now ends at offset {end}, before {read[partition]}"
        for partition, (offset, ts, rid) in list(self._last.items()):
            tp = TopicPartition(self.topic, partition)
            record = await self._read_one(tp, offset)
            if record is None:
                if partition in short:
                    return (
                        f"partition {partition} now ends at offset {short[partition]}, "
                        f"this node had read up to {read[partition]}"
                    )
                continue  # no answer: inconclusive, checked again next time
            if record.offset != offset:
                if record.offset > offset and (await self._beginning(tp)) > offset:
                    continue  # deleted by retention, not lost
                return f"record {offset} of partition {partition} is gone"
            if record.timestamp != ts or dict(record.headers or ()).get("i", b"") != rid:
                return f"record {offset} of partition {partition} is not the one read before"
        return await self._stuck_partition(ends)

    async def _stuck_partition(self, ends: dict[TopicPartition, int]) -> str | None:
        """A partition whose end offset stays ahead of a position where nothing can be read.

        Tansu (0.6, memory storage) does this: a record produced, right after a restart, by a
        client that still believes in the topic is acknowledged and counted, but can never be
        read, and the partition refuses every later record. Only a new topic helps."""
        now = asyncio.get_running_loop().time()
        patience = max(self.timeout, 3 * self.check_interval)
        for tp in self._tps:
            position = self._positions.get(tp.partition, 0)
            if position >= ends[tp]:
                self._stuck.pop(tp.partition, None)
                continue
            seen, since = self._stuck.setdefault(tp.partition, (position, now))
            if seen != position:
                self._stuck[tp.partition] = (position, now)
                continue
            if now - since < patience:
                continue
            if await self._read_one(tp, position) is not None:
                # readable, yet the reader did not read it all this time: its client is stuck
                self._stale = (
                    f"the reader did not read partition {tp.partition} from offset {position} "
                    f"for {patience:g}s, and it can be read"
                )
                self._stuck[tp.partition] = (position, now)
                continue
            if (tp.partition, position) not in self._doubted:
                # a second opinion from new clients before anything is deleted: the checker's
                # own client may be the one that cannot read
                self._doubted.add((tp.partition, position))
                self._stale = f"nothing could be read from partition {tp.partition}"
                self._stuck[tp.partition] = (position, now)
                continue
            why = (
                f"partition {tp.partition} ends at offset {ends[tp]} but nothing can be read "
                f"from offset {position} on"
            )
            if self.repair:
                self._broken = (tp.partition, position)
                return why
            if self._stuck.get(tp.partition) == (position, since):
                log.error(
                    "kafka topic %s: %s; delete the topic (every node starts its streams "
                    "again) or set repair=1 in the broker URL to let tidings do it",
                    self.topic,
                    why,
                )
                self._stuck[tp.partition] = (position, math.inf)  # said once
        return None

    async def _still_stuck(self, partition: int, position: int) -> bool:
        """Whether ``partition`` still ends after ``position`` with nothing readable there.

        The end is asked again after the read: another node may have deleted the topic and
        created it again while this one waited for a record (its new partition ends at 0),
        and deleting that new topic would only start every stream once more."""
        assert self._consumer is not None
        if partition not in (await self._layout() or ()):
            return False
        tp = TopicPartition(self.topic, partition)
        if (await self._consumer.end_offsets([tp]))[tp] <= position:
            return False
        if await self._read_one(tp, position) is not None:
            return False
        return bool((await self._consumer.end_offsets([tp]))[tp] > position)

    async def _read_one(self, tp: TopicPartition, offset: int) -> Any:
        """The first record at or after ``offset`` (None if none came in half the timeout)."""
        assert self._checker is not None
        if tp not in self._checker.assignment():  # a new checker, not assigned yet
            self._checker.assign([*self._checker.assignment(), tp])
            self._checker.pause(*self._checker.assignment())
        self._checker.resume(tp)
        try:
            self._checker.seek(tp, offset)
            # half the call's timeout: no answer is inconclusive, not an outage
            found = await self._checker.getmany(tp, timeout_ms=int(self.timeout * 500))
        finally:
            self._checker.pause(tp)
        records = found.get(tp, [])
        return records[0] if records else None

    async def _beginning(self, tp: TopicPartition) -> int:
        assert self._consumer is not None
        return int((await self._consumer.beginning_offsets([tp]))[tp])

    async def _reset(self, why: str) -> None:
        """The log is lost: forget every stream, delete the topic if it cannot be read (with
        ``repair``), and read the new log from its beginning with new clients.

        Every step that talks to the server is bounded by ``timeout`` seconds; a step that fails
        raises (TimeoutError, KafkaError, OSError) and the watcher calls this again at its next
        check, while writes keep failing fast with BrokerUnavailable (``self._lost`` is set)."""
        if self._reader is not None:
            log.error(
                "the kafka log of topic %s was lost (%s): every stream starts again with a "
                "new epoch",
                self.topic,
                why,
            )
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
            self._streams.clear()
            self._activity.clear()
            self._last.clear()
            self._positions.clear()
            self._stuck.clear()
            self._doubted.clear()
        # new clients first: the old ones may still hold the old topic's partitions and leaders
        async with asyncio.timeout(self.timeout):
            await self._open_clients()
        if self._broken is not None:
            partition, position = self._broken
            self._broken = None
            # every node sees it at about the same time: one deletes, the others find the
            # new topic fine when they look again (see _still_stuck)
            await asyncio.sleep(random.uniform(0, self.check_interval))
            # three calls and a read of half the timeout (see _still_stuck)
            async with asyncio.timeout(2 * self.timeout):
                if await self._still_stuck(partition, position):
                    log.error(
                        "deleting kafka topic %s to create it again: it cannot be read",
                        self.topic,
                    )
                    await self._delete_topic()
        async with asyncio.timeout(self.timeout):
            await self._ensure_topic()
            await self._assign()
        self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        self._outage = None
        self._resync()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Forget streams idle for longer than their ``meta_ttl`` (a later record would start
        them again anyway) and publications past their history ttl.

        Under a cap (``max_streams``) an expired stream keeps its place (offset and epoch, no
        publications) until the cap forgets it: what the cap forgets must follow from the log,
        not from when this node's clock swept."""
        now = time.time()
        for name in [n for n, s in self._streams.items() if s.expires + _FORGET_MARGIN < now]:
            if self.max_streams:
                self._streams[name].items.clear()
            else:
                del self._streams[name]
        for stream in self._streams.values():
            items = stream.items
            while items and items[0][0] <= now:
                items.popleft()

    # -- writing -------------------------------------------------------------------------------

    async def _write(
        self,
        kind: bytes,
        key: bytes,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
        *,
        wait: bool = True,
        partition: int | None = None,
    ) -> StreamPosition | None:
        """Append one record; with ``wait``, return once this node's reader applied it (the
        position it got, for a publication). Raises BrokerUnavailable after ``timeout`` seconds,
        or at once while the server is unreachable or the node reads a new log after a loss."""
        self._require_started()
        if self._outage is not None:
            raise BrokerUnavailable(f"unreachable: {self._outage}")
        producer = self._producer
        if self._lost is not None or producer is None or self._reader is None:
            # not into a topic that is being deleted or created again: Tansu (0.6) acknowledges
            # a record sent to a deleted topic, and what the topic created again then holds
            # depends on timing (see the module docstring)
            raise BrokerUnavailable(
                f"kafka: the log was lost ({self._lost}); reading the new one"
                if self._lost is not None
                else "kafka: this node is replacing its clients"
            )
        if partition is None:
            partition = self._partition_of(key)
        self._seq += 1
        rid = self.node_id + b":%d" % self._seq
        waiter: asyncio.Future[StreamPosition] | None = None
        if wait:
            waiter = self._pending[rid] = asyncio.get_running_loop().create_future()
        sent = None
        try:
            async with asyncio.timeout(self.timeout):
                sent = await producer.send_and_wait(
                    self.topic,
                    value,
                    key=key,
                    partition=partition,
                    headers=[("k", kind), ("i", rid), *(headers or ())],
                )
                self._unsent = 0
                if (
                    waiter is not None
                    and not waiter.done()
                    and sent.offset < self._positions.get(sent.partition, 0)
                ):
                    self._check_now.set()  # read past where it went, without it: lost log?
                return None if waiter is None else await waiter
        except AssertionError as exc:  # aiokafka: a partition its metadata does not know (yet)
            producer.client.force_metadata_update()
            raise BrokerUnavailable(
                f"kafka topic {self.topic}: partition {partition} is not known yet"
            ) from exc
        except MessageSizeTooLargeError as exc:
            raise LimitExceeded(
                f"a record of {len(value)} bytes is larger than the kafka broker takes "
                "(1 MiB unless max.message.bytes says otherwise)"
            ) from exc
        except TimeoutError as exc:
            if sent is not None:  # acknowledged, never read back: is the log still there?
                self._check_now.set()
            else:
                self._unsent += 1
                if self._unsent >= 2:  # the watcher replaces it if the server answers it
                    self._stale = (
                        f"the producer had {self._unsent} records in a row not acknowledged "
                        f"within {self.timeout:g}s"
                    )
            raise BrokerUnavailable(
                f"kafka at {','.join(self.bootstrap)}: the record was not confirmed within "
                f"{self.timeout:g}s"
            ) from exc
        except (KafkaError, OSError) as exc:
            raise BrokerUnavailable(self.describe(exc)) from exc
        finally:
            self._pending.pop(rid, None)

    def _partition_of(self, key: bytes) -> int:
        """The partition of a channel: chosen here rather than by the client library's
        partitioner, which goes by the producer's own (possibly stale) partition count."""
        return int(self._tps[zlib.crc32(key) % len(self._tps)].partition)

    async def publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        """Append a publication; returns its position once this node read it back from the log.

        Raises :class:`BrokerUnavailable` if it is not confirmed within ``timeout`` seconds (it
        may still have been written: a publisher that retries can publish twice), and at once
        while the server is unreachable or the node reads a new log after a loss."""
        headers = [("h", b"%d %r %r" % (history.size, history.ttl, history.meta_ttl))]
        meta: dict[str, Any] = {}
        if info is not None:
            meta["i"] = encode_info(info)
        if tags:
            meta["g"] = tags
        if meta:
            headers.append(("m", orjson.dumps(meta)))
        position = await self._write(_PUB, channel.encode(), data, headers)
        assert position is not None
        return position

    async def publish_join_leave(self, event: JoinLeave) -> None:
        kind = _JOIN if event.join else _LEAVE
        value = orjson.dumps(encode_info(event.info))
        await self._write(kind, event.channel.encode(), value, wait=False)

    async def publish_control(self, data: bytes) -> None:
        # one partition, so control messages keep their order
        await self._write(_CONTROL, b"", data, wait=False, partition=self._tps[0].partition)

    # -- pub/sub -------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Deliver ``channel``'s records from now on: the reader reads every channel anyway,
        so whatever is published after this returns is delivered."""
        self._require_started()
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    # -- streams -------------------------------------------------------------------------------

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
        """See :meth:`Broker.history`. Reads what every node published before the call (it
        waits until this node read the log to its end); writes a touch record when the stream
        does not exist, is expired or is past half its ``meta_ttl``."""
        self._require_started()
        await self._caught_up(None)
        now = time.time()
        stream = self._streams.get(channel)
        if stream is None or stream.expires - now < meta_ttl / 2:
            await self._touch(channel, meta_ttl)
            stream = self._streams[channel]
        position = StreamPosition(stream.offset, stream.epoch)
        if limit == 0:
            return HistoryResult([], position)
        after = since.offset if since is not None else 0
        epoch = stream.epoch
        pubs = [
            Publication(channel, data, offset, epoch, info, tags, at)
            for expires, offset, data, at, info, tags in stream.items
            if offset > after and expires > now
        ]
        if reverse:
            pubs.reverse()
        if limit is not None and limit > 0:
            pubs = pubs[:limit]
        return HistoryResult(pubs, position)

    async def _touch(self, channel: str, meta_ttl: float) -> None:
        """Start or refresh ``channel``'s stream; concurrent callers share one record."""
        touching = self._touching.get(channel)
        if touching is None:
            touching = asyncio.ensure_future(
                self._write(_TOUCH, channel.encode(), b"", [("h", b"%r" % meta_ttl)])
            )
            self._touching[channel] = touching
            touching.add_done_callback(lambda _: self._touching.pop(channel, None))
        await asyncio.shield(touching)

    async def remove_history(self, channel: str) -> None:
        await self._write(_REMOVE, channel.encode(), b"")

    # -- presence (a second engine) ------------------------------------------------------------

    def _presence_engine(self) -> Broker:
        if self._presence is None:
            raise NotAvailable(
                "presence needs a second engine with the kafka broker: "
                "add ?presence=redis://host:6379/0 (or postgres://...) to the broker URL"
            )
        return self._presence

    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        await self._presence_engine().add_presence(channel, info, ttl)

    async def remove_presence(self, channel: str, client: str) -> None:
        await self._presence_engine().remove_presence(channel, client)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return await self._presence_engine().presence(channel)


def _with_prefix(url: str, prefix: str) -> str:
    """``url`` with ``prefix=`` set unless it names its own."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "prefix" for k, _ in query):
        return url
    return urlunsplit(parts._replace(query=urlencode([*query, ("prefix", prefix)])))


__all__ = ["KafkaBroker"]
