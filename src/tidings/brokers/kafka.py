"""The Kafka broker: ``kafka://host:port[,host:port...]?prefix=tidings&presence=redis://...``.

One topic per deployment holds everything: publications, join/leave events, history removals
and control messages. The channel is the record key, so a channel's records stay in one
partition, in order. Every node reads every partition of the topic from its beginning (no
consumer group: each node needs all of it) and keeps, per channel, what the log says: the
offset, the epoch and the publications its history options keep.

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
  refreshes a stream without adding to it; a "remove history" record drops kept publications.

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
- ``presence``: the URL of a second engine that keeps presence (``redis://...``, ``postgres://``
  ...). Its own ``prefix`` defaults to this one's. Without it presence calls fail with
  :class:`~tidings.errors.NotAvailable`, whose message says how to configure one: Kafka has no
  expiring keys, and a log is the wrong place for refreshes every few seconds per client.

Failure behaviour: while the server is unreachable, calls raise :class:`BrokerUnavailable`
within ``timeout`` and ``ping()`` (``/health``) fails; the reader resumes where it stopped when
the server is back (nothing is lost: the log kept it) and the hub is asked to resync. When the
log itself is lost (a server restarted without its data, the topic deleted) the node notices
within ``check_interval`` (at once if it publishes meanwhile), logs an error, forgets every
stream and reads the new log from its beginning: every stream gets a new epoch, so subscribers
are told they could not be recovered.

Limits: every node replays the whole topic when it starts, and keeps in memory the history its
channels keep (bounded by their history size). Records must not be deleted from the topic by
retention while it is in use: a node started after a deletion would count offsets from a
different point than older nodes (a node that finds a partition not starting at 0 logs an
error). Partitions added to the topic after a node started are not read by that node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from ..errors import NotAvailable
from .base import (
    DEFAULT_META_TTL,
    Broker,
    BrokerUnavailable,
    ClientInfo,
    EventHandler,
    HistoryOptions,
    HistoryResult,
    JoinLeave,
    Publication,
    StreamPosition,
    new_epoch,
)
from .redis_scripts import decode_info, encode_info

log = logging.getLogger("tidings.brokers.kafka")

OPTIONS = (
    "prefix",
    "topic",
    "partitions",
    "replication",
    "timeout",
    "fetch_wait",
    "check_interval",
    "presence",
)

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


def _number(options: dict[str, str], name: str, default: float, *, integer: bool = False) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0 or (integer and value != int(value)):
        kind = "a positive whole number" if integer else "a positive number of seconds"
        raise ValueError(f"kafka URL option {name}={raw!r}: expected {kind}")
    return value


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
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown kafka URL option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}"
            )
        if not parts.netloc:
            raise ValueError(f"kafka URL {url!r} names no server (kafka://host:port)")
        self.bootstrap = [h.strip() for h in parts.netloc.split(",") if h.strip()]
        self.prefix = options.get("prefix") or "tidings"
        self.topic = options.get("topic") or self.prefix
        if not _TOPIC_NAME.match(self.topic):
            raise ValueError(
                f"kafka topic name {self.topic!r}: use 1-249 letters, digits, '.', '_' or '-'"
            )
        self.partitions = int(_number(options, "partitions", 1, integer=True))
        self.replication = int(_number(options, "replication", 1, integer=True))
        self.timeout = _number(options, "timeout", 5.0)
        self.fetch_wait = _number(options, "fetch_wait", 0.05)
        self.check_interval = _number(options, "check_interval", 1.0)
        self.presence_url = options.get("presence") or None
        self._presence: Broker | None = None
        if self.presence_url is not None:
            from . import create_broker

            self._presence = create_broker(_with_prefix(self.presence_url, self.prefix))
        self.node_id = (new_epoch() + new_epoch()).encode()
        self._seq = 0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._checker: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[int, int] = {}  # partition -> next Kafka offset to apply
        self._last: dict[int, tuple[int, int, bytes]] = {}  # partition -> (offset, ts, id)
        self._streams: dict[str, _Stream] = {}
        self._channels: set[str] = set()
        self._pending: dict[bytes, asyncio.Future[StreamPosition]] = {}
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
                await self._ensure_topic()
                self._producer = AIOKafkaProducer(**self._client_options(), acks="all", linger_ms=0)
                await self._producer.start()
                self._consumer = self._consumer_for()
                await self._consumer.start()
                self._checker = self._consumer_for()
                await self._checker.start()
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

    async def _ensure_topic(self) -> None:
        admin = AIOKafkaAdminClient(**self._client_options())
        await admin.start()
        try:
            if self.topic in await admin.list_topics():
                return
            topic = NewTopic(
                self.topic,
                self.partitions,
                self.replication,
                topic_configs={"retention.ms": "-1"},
            )
            with contextlib.suppress(TopicAlreadyExistsError):  # another node was first
                response = await admin.create_topics([topic])
                for name, code, *_ in response.topic_errors:
                    if code not in (0, TopicAlreadyExistsError.errno):
                        raise BrokerUnavailable(f"kafka: cannot create topic {name}: error {code}")
            log.info("created kafka topic %s (%d partitions)", self.topic, self.partitions)
        finally:
            await admin.close()

    async def _assign(self) -> None:
        """Read every partition of the topic from its beginning."""
        assert self._consumer is not None and self._checker is not None
        partitions: set[int] | None = None
        while not partitions:  # metadata for a topic just created can take a moment
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.topic)
            if not partitions:
                await asyncio.sleep(0.05)
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
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable("kafka: the broker was closed"))
        self._pending.clear()
        for client in (self._producer, self._consumer, self._checker):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._producer = self._consumer = self._checker = None
        if self._presence is not None:
            await self._presence.close()
        self._streams.clear()
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
        else:
            return
        if stream is None or at > stream.expires:
            stream = self._streams[channel] = _Stream(_epoch(partition, record.offset, ts, rid))
        stream.expires = max(stream.expires, at + meta_ttl)
        if kind == _TOUCH:
            self._resolve(rid, None)
            return
        stream.offset += 1
        meta = orjson.loads(headers["m"]) if "m" in headers else {}
        info = decode_info(meta["i"]) if "i" in meta else None
        tags = meta.get("g")
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

    def _resolve(self, rid: bytes, position: StreamPosition | None) -> None:
        waiter = self._pending.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(position or StreamPosition(0, ""))

    async def _caught_up(self, ends: dict[TopicPartition, int] | None) -> None:
        """Wait until the reader applied everything up to ``ends`` (None: the log's end now)."""
        assert self._consumer is not None
        if ends is None:
            ends = await self._consumer.end_offsets(self._tps)
        while any(self._positions.get(tp.partition, 0) < end for tp, end in ends.items()):
            if self._reader is None or self._reader.done():
                raise BrokerUnavailable("kafka: the reader stopped")
            await self._advanced.wait()

    # -- watching the server and the log -------------------------------------------------------

    async def _watch_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_now.wait(), self.check_interval)
            self._check_now.clear()
            try:
                async with asyncio.timeout(self.timeout):
                    lost = await self._verify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._outage is None:
                    log.error("kafka unreachable: %s", self.describe(exc))
                self._outage = self.describe(exc)
                continue
            if lost is not None:
                await self._reset(lost)
            elif self._outage is not None:
                log.warning("kafka reachable again; the reader resumes where it stopped")
                self._outage = None
                self.handler.on_resync()

    async def _verify(self) -> str | None:
        """Why the log this node read is gone (None: it is not): a partition now ends before
        what this node read, or the last record it read is no longer there."""
        assert self._consumer is not None and self._checker is not None
        ends = await self._consumer.end_offsets(self._tps)
        for tp in self._tps:
            if ends[tp] < self._positions.get(tp.partition, 0):
                return (
                    f"partition {tp.partition} now ends at offset {ends[tp]}, "
                    f"this node had read up to {self._positions[tp.partition]}"
                )
        for partition, (offset, ts, rid) in list(self._last.items()):
            tp = TopicPartition(self.topic, partition)
            self._checker.resume(tp)
            try:
                self._checker.seek(tp, offset)
                found = await self._checker.getmany(tp, timeout_ms=int(self.timeout * 1000))
            finally:
                self._checker.pause(tp)
            records = found.get(tp, [])
            if not records:
                continue  # no answer: inconclusive, checked again next time
            record = records[0]
            if record.offset != offset:
                if record.offset > offset and (await self._beginning(tp)) > offset:
                    continue  # deleted by retention, not lost
                return f"record {offset} of partition {partition} is gone"
            if record.timestamp != ts or dict(record.headers or ()).get("i", b"") != rid:
                return f"record {offset} of partition {partition} is not the one read before"
        return None

    async def _beginning(self, tp: TopicPartition) -> int:
        assert self._consumer is not None
        return int((await self._consumer.beginning_offsets([tp]))[tp])

    async def _reset(self, why: str) -> None:
        """The log is lost: forget every stream and read the new log from its beginning."""
        log.error(
            "the kafka log of topic %s was lost (%s): every stream starts again with a new epoch",
            self.topic,
            why,
        )
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._streams.clear()
        self._last.clear()
        self._positions.clear()
        try:
            await self._ensure_topic()
            await self._assign()
        finally:
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())
        self._outage = None
        self.handler.on_resync()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """Forget streams idle for longer than their ``meta_ttl`` (a later record would start
        them again anyway) and publications past their history ttl."""
        now = time.time()
        for name in [n for n, s in self._streams.items() if s.expires + _FORGET_MARGIN < now]:
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
        position it got, for a publication). Raises BrokerUnavailable after ``timeout``."""
        self._require_started()
        assert self._producer is not None
        if self._outage is not None:
            raise BrokerUnavailable(f"unreachable: {self._outage}")
        self._seq += 1
        rid = self.node_id + b":%d" % self._seq
        waiter: asyncio.Future[StreamPosition] | None = None
        if wait:
            waiter = self._pending[rid] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.timeout):
                sent = await self._producer.send_and_wait(
                    self.topic,
                    value,
                    key=key,
                    partition=partition,
                    headers=[("k", kind), ("i", rid), *(headers or ())],
                )
                if sent.offset < self._positions.get(sent.partition, 0):
                    self._check_now.set()  # a record went where this node read another: lost?
                return None if waiter is None else await waiter
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"kafka at {','.join(self.bootstrap)}: the record was not confirmed within "
                f"{self.timeout:g}s"
            ) from exc
        except (KafkaError, OSError) as exc:
            raise BrokerUnavailable(self.describe(exc)) from exc
        finally:
            self._pending.pop(rid, None)

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
        may still have been written: a publisher that retries can publish twice)."""
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
        async with asyncio.timeout(self.timeout):
            await self._caught_up(None)
        now = time.time()
        stream = self._streams.get(channel)
        if stream is None or stream.expires - now < meta_ttl / 2:
            await self._write(_TOUCH, channel.encode(), b"", [("h", b"%r" % meta_ttl)])
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
