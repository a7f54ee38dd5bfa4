"""The Redis broker: ``redis://host:port/db?prefix=tidings`` (``rediss://`` for TLS).

Each publication is one Lua script (see :mod:`.redis_scripts`) that bumps the channel's offset,
keeps it in history and PUBLISHes it, so pub/sub order is offset order on every node. Each node
holds one pub/sub connection read by one task, which calls the event handler in order;
subscribe and unsubscribe return only after Redis confirmed them, so a publication made after
``subscribe()`` returns is delivered. A lost pub/sub connection is reopened with backoff and
every channel subscribed again (what was published meanwhile is lost to pub/sub, not to
history).

URL options (removed before the URL reaches redis-py, which reads its own, e.g.
``socket_timeout``): ``prefix`` namespaces every key and topic (default ``tidings``);
``subscribe_timeout`` is how long to wait for Redis to confirm a subscription (default 10 s);
``ping_interval`` is how often the pub/sub connection is pinged (default 10 s): three intervals
without a byte count as a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from . import redis_scripts as lua
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
from .redis_scripts import decode, decode_info, encode_info

log = logging.getLogger("tidings.brokers.redis")

RECONNECT_MIN = 0.05  # seconds before the first reconnection attempt, doubled up to:
RECONNECT_MAX = 5.0

_SUB, _UNSUB = b"subscribe", b"unsubscribe"
OPTIONS = ("prefix", "subscribe_timeout", "ping_interval")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """Our options out of the URL's query; the rest of the URL goes to redis-py."""
    parts = urlsplit(url)
    ours, theirs = {}, []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in OPTIONS:
            ours[key] = value
        else:
            theirs.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(theirs))), ours


def _seconds(options: dict[str, str], name: str, default: float) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"redis URL option {name}={raw!r}: expected a positive number of seconds")
    return value


P = ParamSpec("P")
R = TypeVar("R")


def _reachable(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn redis-py's connection failures into the engine-neutral BrokerUnavailable."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc

    return call


class RedisBroker(Broker):
    schemes = ("redis", "rediss")

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        super().__init__(url)
        redis_url, options = _split_options(url)
        self.prefix = options.get("prefix") or "tidings"
        self.subscribe_timeout = _seconds(options, "subscribe_timeout", 10.0)
        self.ping_interval = _seconds(options, "ping_interval", 10.0)
        self._pool: ConnectionPool = ConnectionPool.from_url(redis_url)
        self._redis = Redis(connection_pool=self._pool)
        self.pubsub_name = f"tidings-{self.prefix}-{new_epoch()}".replace(" ", "_")
        # RESP2: under RESP3 redis-py hands subscribe confirmations to a push handler, not us
        self._sub_pool: ConnectionPool = ConnectionPool.from_url(
            redis_url, protocol=2, client_name=self.pubsub_name
        )
        # idle is normal on pub/sub; _ping_forever keeps traffic so a read timeout means dead
        self._sub_pool.connection_kwargs["socket_timeout"] = None
        self._publish = self._redis.register_script(lua.PUBLISH)
        self._history = self._redis.register_script(lua.HISTORY)
        self._add_presence = self._redis.register_script(lua.ADD_PRESENCE)
        self._presence = self._redis.register_script(lua.PRESENCE)
        self._topic_prefix = f"{self.prefix}:ch:"
        self._control = f"{self.prefix}:control"
        self._wanted: set[str] = set()  # topics this node wants, resubscribed after reconnects
        self._waiters: dict[tuple[bytes, str], deque[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None  # None while (re)connecting
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, kind: str, channel: str) -> str:
        return f"{self.prefix}:{kind}:{channel}"

    def _topic(self, channel: str) -> str:
        return self._topic_prefix + channel

    # -- life ----------------------------------------------------------------------------------

    @_reachable
    async def start(self, handler: EventHandler) -> None:
        await super().start(handler)
        try:
            conn = await self._connect()
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(self._read_forever(conn))
            self._pinger = loop.create_task(self._ping_forever())
            await self._request(_SUB, self._control)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._reader, self._pinger):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("the broker was closed"))
        self._waiters.clear()
        self._wanted.clear()
        await self._redis.aclose()
        await self._pool.disconnect()
        await self._sub_pool.disconnect()

    @_reachable
    async def ping(self) -> None:
        await self._redis.ping()

    # -- the pub/sub connection ----------------------------------------------------------------

    async def _connect(self) -> AbstractConnection:
        """A new pub/sub connection subscribed to every wanted topic (confirmed by the reader)."""
        conn: AbstractConnection = self._sub_pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()  # type: ignore[no-untyped-call]
        topics: list[str] = []
        for topic in self._wanted:  # one SUBSCRIBE per waiter so each gets its confirmation
            topics += [topic] * max(1, len(self._waiters.get((_SUB, topic), ())))
        for (kind, topic), queue in list(self._waiters.items()):
            if kind == _UNSUB or topic not in self._wanted:  # a new connection has neither
                del self._waiters[kind, topic]
                for waiter in queue:
                    if not waiter.done():
                        waiter.set_result(None)
        self._conn = conn
        try:
            if topics:
                await conn.send_command("SUBSCRIBE", *topics)
        except BaseException:
            self._conn = None
            await conn.disconnect(nowait=True)
            raise
        return conn

    async def _read_forever(self, conn: AbstractConnection | None) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                if conn is None:
                    conn = await self._connect()
                    log.warning(
                        "redis pub/sub reconnected; resubscribing %d topics", len(self._wanted)
                    )
                    delay = RECONNECT_MIN
                while True:
                    self._dispatch(await conn.read_response(timeout=3 * self.ping_interval))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._conn = None
                if conn is not None:
                    log.warning("redis pub/sub connection lost: %s", exc)
                    await conn.disconnect(nowait=True)
                    conn = None
                else:
                    log.warning("redis pub/sub reconnection failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    async def _ping_forever(self) -> None:
        """Keep traffic on the pub/sub connection so the reader's timeout means a dead link."""
        while True:
            await asyncio.sleep(self.ping_interval)
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.send_command("PING")

    def _dispatch(self, reply: Any) -> None:
        kind, topic = reply[0], reply[1].decode()
        if kind == b"message":
            if topic == self._control:
                self._call(self.handler.on_control, reply[2])
            elif topic in self._wanted:
                self._deliver(topic[len(self._topic_prefix) :], reply[2])
        elif kind in (_SUB, _UNSUB):
            queue = self._waiters.get((kind, topic))
            if queue:
                waiter = queue.popleft()
                if not queue:
                    del self._waiters[kind, topic]
                if not waiter.done():
                    waiter.set_result(None)
            elif kind == _SUB and topic not in self._wanted and self._conn is not None:
                # confirmation of a subscribe given up on (timeout, cancel): undo it
                task = asyncio.get_running_loop().create_task(
                    self._conn.send_command("UNSUBSCRIBE", topic)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _deliver(self, channel: str, message: bytes) -> None:
        try:
            event = decode(channel, message)
        except Exception:  # whatever arrives, the reader must go on
            log.warning("ignoring a malformed message on channel %r", channel)
            return
        if isinstance(event, Publication):
            self._call(self.handler.on_publication, event)
        else:
            self._call(self.handler.on_join_leave, event)

    @staticmethod
    def _call(method: Any, arg: object) -> None:
        try:
            method(arg)
        except Exception:
            log.exception("event handler failed")

    async def _request(self, kind: bytes, topic: str) -> None:
        """(Un)subscribe ``topic`` and wait until Redis confirms it (or a reconnection does)."""
        if self._reader is None or self._closed:
            raise RuntimeError("the Redis broker is not started")
        if kind == _SUB:
            self._wanted.add(topic)
        else:
            self._wanted.discard(topic)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((kind, topic), deque()).append(waiter)
        try:
            if self._conn is not None:
                with contextlib.suppress(Exception):  # the reader reconnects and resends
                    await self._conn.send_command(kind.decode().upper(), topic)
            await asyncio.wait_for(waiter, self.subscribe_timeout)
        except BaseException as exc:
            queue = self._waiters.get((kind, topic))
            if queue is not None and waiter in queue:
                queue.remove(waiter)
            if kind == _UNSUB:
                return  # not wanted any more, so nothing is delivered either way
            if not self._waiters.get((kind, topic)):
                self._wanted.discard(topic)
            if isinstance(exc, TimeoutError):
                raise BrokerUnavailable(
                    f"redis did not confirm SUBSCRIBE {topic} within {self.subscribe_timeout}s"
                ) from None
            raise

    async def subscribe(self, channel: str) -> None:
        await self._request(_SUB, self._topic(channel))

    async def unsubscribe(self, channel: str) -> None:
        await self._request(_UNSUB, self._topic(channel))

    # -- publishing ----------------------------------------------------------------------------

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
        meta: dict[str, Any] = {"t": time.time()}
        if info is not None:
            meta["i"] = encode_info(info)
        if tags:
            meta["g"] = tags
        keys = [self._key("meta", channel), self._key("hist", channel)]
        args: list[EncodableT] = [
            new_epoch(),
            _ms(history.meta_ttl),
            self._topic(channel),
            orjson.dumps(meta) + b"\n" + data,
            history.size,
            _ms(history.ttl) if history.ttl > 0 else 0,
        ]
        offset, epoch = await self._publish(keys, args)
        return StreamPosition(int(offset), epoch.decode())

    @_reachable
    async def publish_join_leave(self, event: JoinLeave) -> None:
        kind = b"J\n" if event.join else b"L\n"
        await self._redis.publish(
            self._topic(event.channel), kind + orjson.dumps(encode_info(event.info))
        )

    @_reachable
    async def publish_control(self, data: bytes) -> None:
        await self._redis.publish(self._control, data)

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
        keys = [self._key("meta", channel), self._key("hist", channel)]
        args: list[EncodableT] = [
            new_epoch(),
            _ms(meta_ttl),
            -1 if since is None else since.offset,
            -1 if limit is None or limit < 0 else limit,
            int(reverse),
        ]
        offset, epoch, messages = await self._history(keys, args)
        pubs = [decode(channel, m) for m in messages]
        return HistoryResult(
            [p for p in pubs if isinstance(p, Publication)],
            StreamPosition(int(offset), epoch.decode()),
        )

    @_reachable
    async def remove_history(self, channel: str) -> None:
        await self._redis.delete(self._key("hist", channel))

    # -- presence ------------------------------------------------------------------------------

    @_reachable
    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        keys = [self._key("pres", channel), self._key("presz", channel)]
        await self._add_presence(keys, [info.client, orjson.dumps(encode_info(info)), _ms(ttl)])

    @_reachable
    async def remove_presence(self, channel: str, client: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self._key("pres", channel), client)
            pipe.zrem(self._key("presz", channel), client)
            await pipe.execute()

    @_reachable
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = [self._key("pres", channel), self._key("presz", channel)]
        flat = await self._presence(keys, [])
        return {
            flat[i].decode(): decode_info(orjson.loads(flat[i + 1])) for i in range(0, len(flat), 2)
        }
