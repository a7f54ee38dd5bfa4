"""One Redis pub/sub connection that survives: confirmed (un)subscribes, pings, reconnection.

redis-py's ``PubSub`` answers ``subscribe()`` before Redis confirmed it and hides the
confirmations; that is how a publication made right after subscribing gets lost. Here one task
reads the connection: a confirmation wakes whoever asked for it, a message goes to
``on_message(topic, data)`` in arrival order. When the connection dies (an error, or no byte for
three ping intervals) it is replaced with backoff, and every wanted topic is subscribed again.
Given several pools (the nodes of a Redis Cluster, where classic pub/sub reaches every node),
each new connection is tried on the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection

from .base import BrokerUnavailable

log = logging.getLogger("tidings.brokers.redis")

_RESYNC = "tidings-resync"
RECONNECT_MIN = 0.05  # seconds before the first reconnection attempt, doubled up to:
RECONNECT_MAX = 5.0

_SUB, _UNSUB = b"subscribe", b"unsubscribe"


class PubSub:
    def __init__(
        self,
        pools: Sequence[ConnectionPool],
        name: str,
        on_message: Callable[[str, bytes], None],
        *,
        subscribe_timeout: float,
        ping_interval: float,
        on_resync: Callable[[], None] = lambda: None,
    ) -> None:
        # The pools must speak RESP2 (protocol=2): under RESP3 redis-py hands subscribe
        # confirmations to a push handler, not us.
        self._pools = list(pools)
        self._next_pool = 0
        for pool in self._pools:
            # idle is normal here; _ping_forever keeps traffic so a read timeout means a dead link
            pool.connection_kwargs["socket_timeout"] = None
        self.name = name
        self.on_message = on_message
        self.on_resync = on_resync
        self.subscribe_timeout = subscribe_timeout
        self.ping_interval = ping_interval
        self._wanted: set[str] = set()  # topics wanted, subscribed again after a reconnection
        self._waiters: dict[tuple[bytes, str], deque[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None  # None while (re)connecting
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self) -> None:
        conn = await self._connect()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_forever(conn)),
            loop.create_task(self._ping_forever()),
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
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
        for pool in self._pools:
            await pool.disconnect()

    async def subscribe(self, topic: str) -> None:
        await self._request(_SUB, topic)

    async def unsubscribe(self, topic: str) -> None:
        await self._request(_UNSUB, topic)

    async def _connect(self) -> AbstractConnection:
        """A new connection subscribed to every wanted topic (the reader sees the replies)."""
        pool = self._pools[self._next_pool % len(self._pools)]
        self._next_pool += 1
        conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
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
                    # Answered after every SUBSCRIBE above: from then on nothing is missed, so
                    # that is when the node catches up on what was published meanwhile.
                    await conn.send_command("PING", _RESYNC)
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
        while True:
            await asyncio.sleep(self.ping_interval)
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.send_command("PING")

    def _dispatch(self, reply: Any) -> None:
        kind, topic = reply[0], reply[1].decode()
        if kind == b"message":
            if topic in self._wanted:
                try:
                    self.on_message(topic, reply[2])
                except Exception:
                    log.exception("handling a message on %r failed", topic)
        elif kind == b"pong":
            if topic == _RESYNC:
                try:
                    self.on_resync()
                except Exception:
                    log.exception("resync after reconnection failed")
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

    async def _request(self, kind: bytes, topic: str) -> None:
        """(Un)subscribe ``topic`` and wait until Redis confirms it (or a reconnection does)."""
        if not self._tasks or self._closed:
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
            if kind == _SUB and not self._waiters.get((kind, topic)):
                self._wanted.discard(topic)
            if not isinstance(exc, TimeoutError):
                raise
            if kind == _SUB:
                raise BrokerUnavailable(
                    f"redis did not confirm SUBSCRIBE {topic} within {self.subscribe_timeout}s"
                ) from None
            # not wanted any more, so its messages are dropped here either way
            log.warning("redis did not confirm UNSUBSCRIBE %s", topic)
