"""The Redis broker: ``redis://host:port/db?prefix=tidings`` (``rediss://`` for TLS).

Each publication is one Lua script (see :mod:`.redis_scripts`) that bumps the channel's offset,
keeps it in history and PUBLISHes it, so pub/sub order is offset order on every node. Each node
holds one pub/sub connection (see :mod:`.redis_pubsub`) read by one task, which calls the event
handler in order;
subscribe and unsubscribe return only after Redis confirmed them, so a publication made after
``subscribe()`` returns is delivered. A lost pub/sub connection is reopened with backoff and
every channel subscribed again (what was published meanwhile is lost to pub/sub, not to
history).

URL options (removed before the URL reaches redis-py, which reads its own, e.g.
``socket_timeout``): ``prefix`` namespaces every key and topic (default ``tidings``);
``subscribe_timeout`` is how long to wait for Redis to confirm a subscription (default 10 s);
``ping_interval`` is how often the pub/sub connection is pinged (default 10 s): three intervals
without a byte count as a lost connection.

Three deployments, by URL scheme:

* ``redis://[[user]:password@]host:6379/0`` (``rediss://`` for TLS): one Redis, or the primary
  of a replicated one;
* ``redis+cluster://[[user]:password@]host1:7000,host2:7001/`` (``rediss+cluster://``): a Redis
  Cluster, found from any of the listed nodes. A channel's keys carry one hash tag
  (``prefix:meta:{CH}``, ``prefix:hist:{CH}``, ...), so they share a slot and each Lua script
  touches one shard. Delivery uses classic pub/sub, which a cluster broadcasts to every node:
  the node's pub/sub connection goes to any cluster node (the next listed one when it drops).
  Sharded pub/sub (``SSUBSCRIBE``) would keep each message within its shard but needs one
  connection per shard that follows slot migrations; not used;
* ``redis+sentinel://[[user]:password@]sentinel1:26379,sentinel2:26379/SERVICE[/DB]``: the
  primary that Redis Sentinel names for ``SERVICE``, asked again after every lost connection,
  so a failover costs a reconnection (and the gap is healed from history as after any
  reconnection; publications the old primary accepted but did not replicate are lost with it:
  Redis replication is asynchronous). ``sentinel_password`` (URL option) authenticates to the
  sentinels themselves.

Commands share a pool of :data:`POOL_SIZE` connections (per cluster node); past that a command
waits for a free one, up to :data:`POOL_TIMEOUT` seconds, then fails with
:class:`~.base.BrokerUnavailable` ("no free connection"). redis-py's own waiting pool does
this for one Redis and (a waiting Sentinel pool) for Sentinel; its cluster client refuses at
once instead ("Too many connections"), so in a cluster the engine admits at most
:data:`POOL_SIZE` commands at a time itself.

What a channel costs in Redis is bounded (keys in :mod:`.redis_scripts`):

* a channel that keeps no history (``HistoryOptions.stream`` False: ``history_size`` 0) has no
  keys at all, as in Centrifugo: its publications are a plain PUBLISH with offset 0 and no
  epoch. Having no offsets, their deliveries cannot be checked for gaps, so after a lost
  pub/sub connection the hub tells their subscribers they may have missed some (see
  :meth:`tidings.hub.Hub.on_resync`);
* the others are at most :attr:`RedisBroker.max_streams` (setting ``history_max_streams``; 0:
  no cap) streams besides the ones with subscribers: each publication, and a read that
  creates a stream (a position has to exist for a client to recover from it, as in
  Centrifugo), indexes the channel in ``prefix:streams`` (a sorted set by last publication);
  past the cap the least recently published are popped from it, and each that no node
  subscribes to (``PUBSUB NUMSUB``, asked of every node in a cluster) is deleted, stream and
  meta: its next publication starts a new epoch, so a client recovering from the old one is
  told ``recovered: false``, never handed a splice. Each deletion is counted in
  :attr:`RedisBroker.streams_evicted` (metric ``tidings_streams_evicted``, per node). Popped
  channels with subscribers are indexed again as just used. Outside a cluster the index is
  updated by the publish script itself; in a cluster it has its own slot, so it is a second
  call after the publication: a publication whose second call fails (the index's node is
  down) leaves its stream unindexed until its next publication, bounded by
  ``history_meta_ttl`` only. The cap counts streams, not bytes: a stream's size is bounded by
  ``history_size``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ClusterDownError, ReadOnlyError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from . import redis_scripts as lua
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
from .redis_pubsub import PubSub
from .redis_scripts import decode, decode_info, encode_info

log = logging.getLogger("tidings.brokers.redis")

OPTIONS: dict[str, OptionKind] = {
    "prefix": str,
    "subscribe_timeout": float,
    "ping_interval": float,
    "sentinel_password": str,
}
#: what redis-py raises when the deployment cannot serve right now (down, failing over, a
#: cluster slot without a primary, a demoted primary): all BrokerUnavailable
UNAVAILABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    TryAgainError,
    RedisClusterException,
    ReadOnlyError,
    OSError,
)


#: connections a node opens for commands (per cluster node), and seconds a command waits for
#: one when all are in use
POOL_SIZE = 100
POOL_TIMEOUT = 10.0
#: streams popped from the index (and evicted) at most per call: a cap lowered far below the
#: streams kept is reached over the next publications, not in one long script
EVICT_BATCH = 100


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


P = ParamSpec("P")
R = TypeVar("R")


class _Gate:
    """At most ``size`` commands at a time; one more waits up to ``timeout`` seconds, then
    BrokerUnavailable. For the cluster client, whose per-node pools refuse at once."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size, self.timeout = size, timeout
        self._free = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.timeout):
                await self._free.acquire()
        except TimeoutError:
            raise BrokerUnavailable(
                f"redis: no free connection within {self.timeout:g} s ({self.size} in use)"
            ) from None
        try:
            yield
        finally:
            self._free.release()


def _reachable(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn redis-py's connection failures into the engine-neutral BrokerUnavailable; in a
    cluster, wait for the engine's :class:`_Gate` first. A decorated method must not call
    another (it would hold two of the gate's places)."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        gate: _Gate | None = getattr(args[0], "_gate", None)
        try:
            if gate is None:
                return await method(*args, **kwargs)
            async with gate.slot():
                return await method(*args, **kwargs)
        except UNAVAILABLE as exc:
            raise BrokerUnavailable(f"redis: {exc}") from exc

    return call


class _WaitingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool that waits for a free connection (its BlockingConnectionPool)
    instead of refusing past ``max_connections``."""


def _hosts(netloc: str, default_port: int) -> tuple[str, list[tuple[str, int]]]:
    """``user:pass@h1:p1,h2`` -> (``user:pass@``, [(h1, p1), (h2, default_port)])."""
    credentials, _, hosts = netloc.rpartition("@")
    found = []
    for item in hosts.split(","):
        host, port = item, default_port
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else default_port
        elif item.count(":") == 1:
            host, _, raw = item.partition(":")
            port = int(raw)
        if host:
            found.append((host, port))
    if not found:
        raise ValueError(f"no host in redis URL netloc {netloc!r}")
    return (credentials + "@" if credentials else ""), found


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RedisBroker(Broker):
    schemes = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel")
    streams_without_history = False

    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        super().__init__(url)
        # the rest of the query goes to redis-py (socket_timeout, password ...)
        redis_url, options = url_options(url, "redis", OPTIONS, passthrough=True)
        self.prefix = options.get("prefix", "") or "tidings"
        if "{" in self.prefix or "}" in self.prefix:
            # a brace would move the hash tag that keeps a channel's keys in one cluster slot
            raise ValueError(f"redis URL option prefix={self.prefix!r}: no braces allowed")
        parts = urlsplit(redis_url)
        scheme = parts.scheme.lower()
        name = f"tidings-{self.prefix}-{new_epoch()}".replace(" ", "_")
        #: "single", "cluster" or "sentinel"
        self.mode = scheme.partition("+")[2] or "single"
        self._sentinel: Sentinel | None = None
        self._redis: Redis | RedisCluster
        self._gate: _Gate | None = None
        #: streams kept at most besides subscribed ones (module docstring); 0: no cap
        self.max_streams = DEFAULT_MAX_STREAMS
        #: streams this node deleted to stay under ``max_streams`` (each restarts with a new
        #: epoch)
        self.streams_evicted = 0
        pubsub_pools: list[ConnectionPool]
        if self.mode == "cluster":
            base = scheme.partition("+")[0]
            credentials, hosts = _hosts(parts.netloc, 6379)
            urls = [
                urlunsplit((base, credentials + _netloc(h, p), "", parts.query, ""))
                for h, p in hosts
            ]
            # The gate admits POOL_SIZE commands; a few more connections per node leave room
            # for redis-py's own (topology reads) beside them.
            self._redis = RedisCluster.from_url(
                urls[0],
                startup_nodes=[ClusterNode(h, p) for h, p in hosts[1:]],
                max_connections=POOL_SIZE + 10,
            )
            self._gate = _Gate(POOL_SIZE, POOL_TIMEOUT)
            pubsub_pools = [ConnectionPool.from_url(u, protocol=2, client_name=name) for u in urls]
        elif self.mode == "sentinel":
            credentials, hosts = _hosts(parts.netloc, 26379)
            service, _, db = parts.path.strip("/").partition("/")
            if not service:
                raise ValueError("a redis+sentinel:// URL needs the service: .../SERVICE[/DB]")
            # redis-py's own options (password, db, socket_timeout, ...) from a stand-in URL
            stand_in = ("redis", credentials + "x", "/" + (db or "0"), parts.query, "")
            kwargs: dict[str, Any] = dict(parse_url(urlunsplit(stand_in)))
            for key in ("host", "port", "connection_class"):
                kwargs.pop(key, None)
            # redis-py retries each connection 10 times (about 3 s) by default, the one to a
            # sentinel inside the one to the primary: seconds before a caller hears of an
            # outage. A few quick tries answer promptly; the hub's reconnection loop and the
            # clients retry anyway.
            kwargs["retry"] = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), 2)
            sentinel_kwargs: dict[str, Any] = {
                "retry": Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.05), 1)
            }
            if sentinel_password := options.get("sentinel_password", ""):
                sentinel_kwargs["password"] = sentinel_password
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                hosts, sentinel_kwargs=sentinel_kwargs, **kwargs
            )
            self._redis = self._sentinel.master_for(
                service,
                redis_class=Redis,
                connection_pool_class=_WaitingSentinelPool,
                max_connections=POOL_SIZE,
                timeout=POOL_TIMEOUT,
            )
            pubsub_pools = [
                SentinelConnectionPool(  # type: ignore[no-untyped-call]
                    service, self._sentinel, protocol=2, client_name=name, **kwargs
                )
            ]
        elif self.mode == "single":
            # redis-py's plain pool fails a command at once ("Too many connections") past 100
            # in use: a burst (many publishers, or every channel healed after a pub/sub drop)
            # made publishes and recoveries fail. This one waits for a free connection instead.
            self._redis = Redis.from_pool(
                BlockingConnectionPool.from_url(
                    redis_url, max_connections=POOL_SIZE, timeout=POOL_TIMEOUT
                )
            )
            pubsub_pools = [ConnectionPool.from_url(redis_url, protocol=2, client_name=name)]
        else:
            raise ValueError(f"unknown redis URL scheme {scheme!r}")
        self._publish = self._redis.register_script(lua.PUBLISH)
        self._history = self._redis.register_script(lua.HISTORY)
        self._add_presence = self._redis.register_script(lua.ADD_PRESENCE)
        self._remove_presence = self._redis.register_script(lua.REMOVE_PRESENCE)
        self._presence = self._redis.register_script(lua.PRESENCE)
        self._index_script = self._redis.register_script(lua.INDEX)
        self._evict = self._redis.register_script(lua.EVICT)
        self._index = f"{self.prefix}:streams"
        self._topic_prefix = f"{self.prefix}:ch:"
        self._control = f"{self.prefix}:control"
        self._closed = False
        self._pubsub = PubSub(
            pubsub_pools,
            name,
            self._on_message,
            subscribe_timeout=options.get("subscribe_timeout", 10.0),
            ping_interval=options.get("ping_interval", 10.0),
            on_resync=lambda: self.handler.on_resync(),
        )

    @property
    def pubsub_name(self) -> str:
        """The CLIENT SETNAME of this node's pub/sub connection (find it in CLIENT LIST)."""
        return self._pubsub.name

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, kind: str, channel: str) -> str:
        # {channel} is the hash tag: a channel's keys share one cluster slot (see the docstring)
        return f"{self.prefix}:{kind}:{{{channel}}}"

    def _topic(self, channel: str) -> str:
        return self._topic_prefix + channel

    # -- life ----------------------------------------------------------------------------------

    @_reachable
    async def start(self, handler: EventHandler) -> None:
        await super().start(handler)
        try:
            if isinstance(self._redis, RedisCluster):
                # learn the slots now: the client does on its first command, but a burst of
                # first commands each starts it anew and one resets the connections the
                # others are using ("unable to perform operation on <TCPTransport closed>")
                await self._redis.initialize()
            await self._pubsub.start()
            await self._pubsub.subscribe(self._control)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pubsub.close()
        await self._redis.aclose()
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                await client.aclose()

    @_reachable
    async def ping(self) -> None:
        await self._redis.ping()

    # -- the pub/sub connection ----------------------------------------------------------------

    def _on_message(self, topic: str, message: bytes) -> None:
        if topic == self._control:
            self.handler.on_control(message)
        else:
            self._deliver(topic[len(self._topic_prefix) :], message)

    def _deliver(self, channel: str, message: bytes) -> None:
        try:
            event = decode(channel, message)
        except Exception:  # whatever arrives, the reader must go on
            log.warning("ignoring a malformed message on channel %r", channel)
            return
        if isinstance(event, Publication):
            self.handler.on_publication(event)
        else:
            self.handler.on_join_leave(event)

    async def subscribe(self, channel: str) -> None:
        await self._pubsub.subscribe(self._topic(channel))

    async def unsubscribe(self, channel: str) -> None:
        await self._pubsub.unsubscribe(self._topic(channel))

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
        body = orjson.dumps(meta) + b"\n" + data
        if not history.stream:
            # no stream, no keys (Centrifugo's publish without history); at most once, so no
            # retry on a stale connection either
            await self._redis.publish(self._topic(channel), b"P0 \n" + body)
            return StreamPosition(0, "")
        keys = self._stream_keys(channel)
        args: list[EncodableT] = [
            new_epoch(),
            _ms(history.meta_ttl),
            self._topic(channel),
            body,
            history.size,
            _ms(history.ttl) if history.ttl > 0 else 0,
            secrets.token_bytes(8),  # the publish id: a retry publishes at most once
            *self._index_args(channel),
        ]
        try:
            offset, epoch, now, popped = await self._publish(keys, args)
        except RedisConnectionError:
            # A pooled connection that went stale (Redis restarted) fails the first command
            # sent on it; whether that try ran or not, the same publish id makes one retry safe.
            offset, epoch, now, popped = await self._publish(keys, args)
        if now:
            await self._bound(channel, int(now), popped, history.meta_ttl)
        return StreamPosition(int(offset), epoch.decode())

    # -- the cap on streams (module docstring) -------------------------------------------------

    def _stream_keys(self, channel: str) -> list[str]:
        """meta, hist and, outside a cluster with a cap, the index the script updates."""
        keys = [self._key("meta", channel), self._key("hist", channel)]
        if self.max_streams and self.mode != "cluster":
            keys.append(self._index)
        return keys

    def _index_args(self, channel: str) -> list[EncodableT]:
        return [channel, self.max_streams, EVICT_BATCH]

    async def _bound(self, channel: str, now: int, popped: list[bytes], meta_ttl: float) -> None:
        """After a stream was used at Redis time ``now`` (ms): index it (in a cluster; the
        script did elsewhere) and evict what the index popped."""
        if not self.max_streams:
            return
        if self.mode == "cluster":
            args: list[EncodableT] = [channel, now, self.max_streams, EVICT_BATCH, _ms(meta_ttl)]
            popped = await self._index_script([self._index], args)
        if popped:
            await self._evict_popped(popped)

    async def _evict_popped(self, popped: list[bytes]) -> None:
        """Delete the streams popped from the index (``[channel, score, ...]``), except those
        with subscribers somewhere: indexed again, as just used (as the memory broker passes
        them over)."""
        scores = {popped[i].decode(): popped[i + 1] for i in range(0, len(popped), 2)}
        topics = [self._topic(name) for name in scores]
        if isinstance(self._redis, RedisCluster):  # classic pub/sub: each node knows its own
            counts = await self._redis.pubsub_numsub(*topics, target_nodes=RedisCluster.ALL_NODES)
        else:
            counts = await self._redis.pubsub_numsub(*topics)
        subscribed = {
            (topic.decode() if isinstance(topic, bytes) else topic)[len(self._topic_prefix) :]
            for topic, n in counts
            if int(n) > 0
        }
        if subscribed:
            now_ms = int(time.time() * 1000)
            await self._redis.zadd(self._index, dict.fromkeys(subscribed, now_ms))
        for name, score in scores.items():
            if name not in subscribed:
                self.streams_evicted += await self._evict(
                    [self._key("meta", name), self._key("hist", name)], [score]
                )

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
        keys = self._stream_keys(channel)
        args: list[EncodableT] = [
            new_epoch(),
            _ms(meta_ttl),
            "-" if since is None else f"{since.offset + 1}-0",
            -1 if limit is None or limit < 0 else limit,
            int(reverse),
            *self._index_args(channel),
        ]
        offset, epoch, messages, made, popped = await self._history(keys, args)
        if made:  # this read created the stream: it counts against the cap too
            await self._bound(channel, int(made), popped, meta_ttl)
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
        keys = [self._key("pres", channel), self._key("presz", channel)]
        await self._remove_presence(keys, [client])

    @_reachable
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = [self._key("pres", channel), self._key("presz", channel)]
        flat = await self._presence(keys, [])
        return {
            flat[i].decode(): decode_info(orjson.loads(flat[i + 1])) for i in range(0, len(flat), 2)
        }
