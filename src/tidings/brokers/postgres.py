"""The PostgreSQL broker: ``postgresql://user:password@host:5432/db?prefix=tidings`` (asyncpg).

Streams, history and presence are tables in one schema per deployment (the ``prefix``; see
:mod:`.postgres_sql` for the layout), created at start, idempotently, under an advisory lock so
several nodes may start at once. Publications travel by LISTEN/NOTIFY.

**Publishing** is one call of a PL/pgSQL function, one transaction: it takes the channel's next
offset under its stream row's lock, stores the publication (when history keeps it) and NOTIFYs.
Notifications are delivered in commit order and the row lock orders a channel's commits, so
every node receives a channel's publications in offset order, and history never disagrees with
what was delivered. A publication whose notification would not fit PostgreSQL's 8,000-byte
payload limit (or whose data is not valid UTF-8 text) is stored in the table even when history
keeps nothing, and the notification carries a reference that the receiving nodes read back;
such a row stays readable for ``fetch_ttl`` seconds whatever the history options say.

**Delivery.** NOTIFY channel names are identifiers of at most 63 bytes, and tidings channel
names are not, so a deployment uses ONE notification channel (``tidings.<prefix>``) and the
tidings channel travels in the payload: every node receives every publication of the
deployment and drops, locally, those for channels it has no subscriber for (parsing a small
JSON header each; ``bench/RESULTS.md`` has the measured cost). Each node holds one listening
connection (its ``application_name`` is :attr:`PostgresBroker.listener_name`) and a small pool
for everything else.

**Failures.** A lost listening connection (an error, the server closing it, or a ping
unanswered for ``ping_interval`` seconds) is replaced with backoff (0.05 s doubling to 5 s, with
jitter); the node then calls ``handler.on_resync()`` so the hub sends what it missed from
history. While it is down, :meth:`~PostgresBroker.ping` (``/health``) raises and
:meth:`~PostgresBroker.subscribe` waits up to ``subscribe_timeout``. Every asyncpg or socket
error becomes :class:`BrokerUnavailable`; queries give up after ``command_timeout``.

**Cleanup.** Every ``cleanup_interval`` seconds one node (an advisory lock picks it) deletes
expired history rows, streams idle past their ``meta_ttl``, expired presence and old notes, so
the tables stay bounded.

URL options (removed before the URL reaches asyncpg, which passes other query parameters as
server settings; ``sslmode`` etc. work as in libpq):

* ``prefix``: the schema holding the tables, and the notification channel's name (default
  ``tidings``); deployments with different prefixes share a database without seeing each
  other;
* ``pool_size``: most pooled connections per node (default 5);
* ``connect_timeout``: seconds to open a connection (default 5);
* ``command_timeout``: seconds a query may take, including waiting for a pooled connection
  (default 10);
* ``subscribe_timeout``: seconds ``subscribe`` waits for a listening connection that is being
  replaced (default 10);
* ``ping_interval``: seconds between pings on the listening connection (default 10);
* ``cleanup_interval``: seconds between cleanups (default 60);
* ``fetch_ttl``: seconds a large publication not kept by history stays readable (default 60).
* ``unlogged``: ``true`` makes the stream, history and notes tables UNLOGGED (default
  ``false``): no WAL, so a publication does not wait for a disk flush (several times the
  publishes/s), but a server crash empties them (and replicas do not have them): every stream
  then starts over with a new epoch, so a client recovering from a position of the old one
  gets ``recovered: false`` rather than a silent splice. Every node of a deployment must use
  the same value; a node starting with the other one rewrites the tables (ALTER TABLE ... SET
  LOGGED/UNLOGGED).

Use a direct connection or a session-pooling PgBouncer: LISTEN needs a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import asyncpg
import orjson

from . import postgres_sql as sql
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

log = logging.getLogger("tidings.brokers.postgres")

RECONNECT_MIN = 0.05  # seconds before the first reconnection attempt, doubled up to:
RECONNECT_MAX = 5.0

#: seconds-valued URL options and their defaults
SECONDS = {
    "connect_timeout": 5.0,
    "command_timeout": 10.0,
    "subscribe_timeout": 10.0,
    "ping_interval": 10.0,
    "cleanup_interval": 60.0,
    "fetch_ttl": 60.0,
}
OPTIONS: dict[str, OptionKind] = {
    "prefix": str,
    "pool_size": int,
    "unlogged": bool,
    **dict.fromkeys(SECONDS, float),
}

#: room kept in a notification for the offset and epoch the server writes into it
_HEADROOM = 48


P = ParamSpec("P")
R = TypeVar("R")

#: what asyncpg and the socket raise when the server cannot be used right now
_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # e.g. a protocol state broken by the server leaving
    OSError,
    TimeoutError,
)


def _reachable(method: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn asyncpg's and the socket's errors into the engine-neutral BrokerUnavailable."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except _ERRORS as exc:
            raise BrokerUnavailable(f"postgresql: {exc!r}") from exc

    return call


def _name(schema: str) -> str:
    """The notification channel: an identifier of at most 63 bytes."""
    name = f"tidings.{schema}"
    if len(name.encode()) <= 63:
        return name
    return "tidings." + hashlib.sha256(schema.encode()).hexdigest()[:40]


_RESYNC = object()  # in the dispatch queue: the listening connection was replaced here


class PostgresBroker(Broker):
    schemes = ("postgresql", "postgres")

    def __init__(self, url: str = "postgresql://postgres@127.0.0.1:5432/postgres") -> None:
        super().__init__(url)
        # the rest of the query goes to asyncpg (server settings, sslmode ...)
        self._dsn, options = url_options(url, "postgresql", OPTIONS, passthrough=True)
        self.prefix = options.get("prefix", "") or "tidings"
        if len(self.prefix.encode()) > 63 or self.prefix.lower().startswith("pg_"):
            raise ValueError(
                f"postgresql URL option prefix={self.prefix!r}: a schema name of at most 63 "
                "bytes, not starting with pg_ (reserved by PostgreSQL)"
            )
        self.pool_size = options.get("pool_size", 5)
        self.unlogged = options.get("unlogged", False)
        t = {name: options.get(name, default) for name, default in SECONDS.items()}
        self.connect_timeout = t["connect_timeout"]
        self.command_timeout = t["command_timeout"]
        self.subscribe_timeout = t["subscribe_timeout"]
        self.ping_interval = t["ping_interval"]
        self.cleanup_interval = t["cleanup_interval"]
        self.fetch_ttl = t["fetch_ttl"]
        self.notify_channel = _name(self.prefix)
        self._sql = sql.Statements(self.prefix)
        node = new_epoch()
        short = self.prefix[:32]
        #: application_name of this node's listening connection (see pg_stat_activity)
        self.listener_name = f"tidings-{short}-{node}-listen"
        self.pool_name = f"tidings-{short}-{node}"
        # one advisory lock key per schema for the DDL, another for the cleanup
        digest = hashlib.sha256(self.prefix.encode()).digest()
        self._ddl_lock = int.from_bytes(digest[:8], "big", signed=True)
        self._cleanup_lock = int.from_bytes(digest[8:16], "big", signed=True)
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._ready = False  # the schema is known to be in place
        self._ascii_only = False  # the server's encoding is not UTF8: inline ASCII only
        self._channels: set[str] = set()
        self._listening = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        # one round trip on the listening connection serves every caller meanwhile
        self._confirming: tuple[asyncpg.Connection, asyncio.Task[None]] | None = None
        self._queue: deque[object] = deque()
        self._draining: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    # -- connections ---------------------------------------------------------------------------

    def _connect_kwargs(self, application_name: str) -> dict[str, Any]:
        return {
            "timeout": self.connect_timeout,
            "command_timeout": self.command_timeout,
            "server_settings": {"application_name": application_name},
        }

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise BrokerUnavailable("the PostgreSQL broker is closed")
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self.pool_size,
                    **self._connect_kwargs(self.pool_name),
                )
            if not self._ready:
                async with self._pool.acquire(timeout=self.command_timeout) as conn:
                    await self._prepare_schema(conn)
                self._ready = True
        return self._pool

    @contextlib.asynccontextmanager
    async def _conn(self) -> Any:
        pool = await self._get_pool()
        async with pool.acquire(timeout=self.command_timeout) as conn:
            yield conn

    async def _prepare_schema(self, conn: asyncpg.Connection) -> None:
        """Create the tables and functions unless they are there at this version. Several
        nodes may start at once: the advisory lock makes them take turns."""
        self._ascii_only = conn.get_settings().server_encoding.upper() not in ("UTF8", "UTF-8")
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._ddl_lock)
            exists = await conn.fetchval(
                "SELECT to_regclass($1) IS NOT NULL",
                f"{sql.ident(self.prefix)}.tidings_schema",
            )
            if not exists or await conn.fetchval(self._sql.version) != sql.VERSION:
                statements = sql.ddl(self.prefix, self.unlogged)
                schema = sql.ident(self.prefix)
                if await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", schema):
                    # CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
                    # schema exists: a schema made for a user without it must do
                    statements = statements[1:]
                for statement in statements:
                    await conn.execute(statement)
            wanted = "u" if self.unlogged else "p"
            for table in sql.DURABLE:
                name = f"{sql.ident(self.prefix)}.{table}"
                persistence = await conn.fetchval(
                    "SELECT relpersistence::text FROM pg_class WHERE oid = $1::regclass", name
                )
                if persistence != wanted:  # rewrites the table, once, when the option changed
                    mode = "UNLOGGED" if self.unlogged else "LOGGED"
                    log.warning("postgresql: ALTER TABLE %s SET %s", name, mode)
                    await conn.execute(f"ALTER TABLE {name} SET {mode}")

    # -- life ----------------------------------------------------------------------------------

    @_reachable
    async def start(self, handler: EventHandler) -> None:
        await super().start(handler)
        try:
            await self._get_pool()
            conn = await self._listen()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen_forever(conn)),
                loop.create_task(self._cleanup_forever()),
            ]
            self._started = True
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._listening.clear()
        tasks = [*self._tasks, *([self._draining] if self._draining else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # graceful for a healthy link (the server logs no unexpected EOF); a dead one must
        # not hold the shutdown up
        grace = min(self.command_timeout, 2.0)
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), grace)
            self._listener.terminate()
            self._listener = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), grace)
            self._pool.terminate()
        self._channels.clear()
        self._queue.clear()

    @_reachable
    async def ping(self) -> None:
        if self._started and not self._listening.is_set():
            raise BrokerUnavailable("postgresql: the listening connection is down, reconnecting")
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # -- the listening connection --------------------------------------------------------------

    async def _listen(self) -> asyncpg.Connection:
        """A new connection LISTENing on the deployment's notification channel."""
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, **self._connect_kwargs(self.listener_name)
        )
        try:
            await conn.add_listener(self.notify_channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        self._listener = conn
        self._listening.set()
        return conn

    async def _listen_forever(self, conn: asyncpg.Connection | None) -> None:
        delay = RECONNECT_MIN
        while True:
            try:
                if conn is None:
                    conn = await self._listen()
                    log.warning(
                        "postgresql listening connection reconnected (%d channels here); "
                        "catching up from history",
                        len(self._channels),
                    )
                    # after the LISTEN: from then on nothing is missed, and what was published
                    # meanwhile is in history; queued behind what the old connection delivered
                    self._enqueue(_RESYNC)
                    delay = RECONNECT_MIN
                await self._watch(conn)
                raise ConnectionError("the server closed the connection")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._listening.clear()
                self._listener = None
                if conn is not None:
                    log.warning("postgresql listening connection lost: %r", exc)
                    conn.terminate()
                    conn = None
                else:
                    log.warning("postgresql listening connection failed: %r", exc)
                # full jitter keeps nodes that lost the server together from coming back together
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when ``conn`` is closed; ping it so a link that died silently is noticed."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not conn.is_closed():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), self.ping_interval)
            if lost.is_set() or conn.is_closed():
                return
            await self._round_trip(conn)

    async def _round_trip(self, conn: asyncpg.Connection) -> None:
        """One ``SELECT 1`` on the listening connection, shared by whoever asks meanwhile (a
        connection runs one query at a time). Raises if the link is dead."""
        shared = self._confirming
        if shared is None or shared[0] is not conn or shared[1].done():
            task = asyncio.get_running_loop().create_task(self._select_1(conn))
            # its error reaches the callers; if all of them gave up, it is not worth a log line
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            shared = self._confirming = (conn, task)
        await asyncio.shield(shared[1])

    async def _select_1(self, conn: asyncpg.Connection) -> None:
        await conn.fetchval("SELECT 1", timeout=self.ping_interval)

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        """asyncpg calls this in arrival order (call_soon); what needs a read waits its turn."""
        if self._queue or payload[:1] in ("R", "N"):
            self._enqueue(payload)
        else:
            self._emit(self._decode(payload))

    def _enqueue(self, item: object) -> None:
        self._queue.append(item)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            item = self._queue[0]
            try:
                if item is _RESYNC:
                    self.handler.on_resync()
                elif isinstance(item, str) and item[:1] == "R":
                    await self._fetch(item)
                elif isinstance(item, str) and item[:1] == "N":
                    await self._read_note(item)
                elif isinstance(item, str):
                    self._emit(self._decode(item))
            except _ERRORS as exc:
                # the server is away: this node misses that one; the hub finds the gap at the
                # channel's next publication (or at the resync) and fills it from history
                log.warning("postgresql: could not read a referenced notification: %r", exc)
            except Exception:  # whatever arrives, the reader must go on
                log.exception("handling a notification failed")
            self._queue.popleft()

    def _decode(self, payload: str) -> Publication | JoinLeave | bytes | None:
        """An inline notification, or None if nobody here wants it (or it is malformed)."""
        kind = payload[:1]
        try:
            if kind == "P":
                head, data = payload[1:].split("\n", 1)
                offset, epoch, meta_raw = head.split(" ", 2)
                meta = orjson.loads(meta_raw)
                if meta["c"] not in self._channels:
                    return None
                return _publication(meta, int(offset), epoch, data.encode())
            if kind in ("J", "L"):
                channel, info = orjson.loads(payload[1:])
                if channel not in self._channels:
                    return None
                return JoinLeave(channel, decode_info(info), kind == "J")
            if kind == "C":
                return payload[1:].encode()
            raise ValueError(f"unknown notification kind {kind!r}")
        except Exception:  # whatever arrives, the reader must go on
            log.warning("ignoring a malformed notification %r", payload[:80])
            return None

    def _emit(self, event: Publication | JoinLeave | bytes | None) -> None:
        try:
            if isinstance(event, Publication):
                self.handler.on_publication(event)
            elif isinstance(event, JoinLeave):
                self.handler.on_join_leave(event)
            elif event is not None:
                self.handler.on_control(event)
        except Exception:
            log.exception("handling a notification failed")

    async def _fetch(self, payload: str) -> None:
        """A publication too large to notify: read it, unless nobody here wants it."""
        offset, epoch, channel_json = payload[1:].split(" ", 2)
        channel = orjson.loads(channel_json)
        if channel not in self._channels:
            return
        async with self._conn() as conn:
            row = await conn.fetchrow(self._sql.fetch, channel, int(offset))
        if row is None or row["epoch"] != epoch:
            # gone (its fetch window passed, or the stream restarted): the hub finds the gap
            log.warning("publication %s of channel %r is no longer stored", offset, channel)
            return
        if channel in self._channels:  # it may have been unsubscribed during the read
            self._emit(_publication(orjson.loads(row["head"]), int(offset), epoch, row["data"]))

    async def _read_note(self, payload: str) -> None:
        async with self._conn() as conn:
            body = await conn.fetchval(self._sql.read_note, int(payload[1:]))
        if body is None:
            log.warning("note %s is no longer stored", payload[1:])
        elif body[:1] == b"C":  # control data goes on as the bytes it was
            self._emit(bytes(body[1:]))
        else:
            self._emit(self._decode(body.decode()))

    # -- the cleanup ---------------------------------------------------------------------------

    async def _cleanup_forever(self) -> None:
        # the first one at a random point of the interval, so nodes started together spread out
        await asyncio.sleep(self.cleanup_interval * random.uniform(0.1, 1.0))
        while True:
            try:
                await self.cleanup()
            except BrokerUnavailable as exc:
                log.warning("postgresql cleanup failed: %s", exc)
            await asyncio.sleep(self.cleanup_interval)

    @_reachable
    async def cleanup(self) -> int:
        """Delete what expired: history rows, idle streams, presence, notes. Returns the number
        of rows deleted, or -1 if another node's cleanup is running."""
        async with self._conn() as conn:
            deleted: int = await conn.fetchval(self._sql.cleanup, self._cleanup_lock)
        return deleted

    # -- pub/sub -------------------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Deliver ``channel`` here: every node already LISTENs to the whole deployment, so
        this adds it to the local filter, then makes one round trip on the listening connection
        (shared by concurrent callers) to know it is alive: a publication committed after that
        is delivered. While the connection is being replaced this waits for the new one, at
        most ``subscribe_timeout`` seconds, then raises BrokerUnavailable."""
        if not self._started or self._closed:
            raise RuntimeError("the PostgreSQL broker is not started")
        self._channels.add(channel)
        try:
            async with asyncio.timeout(self.subscribe_timeout):
                while True:
                    await self._listening.wait()
                    conn = self._listener
                    if conn is None:
                        await asyncio.sleep(0)
                        continue
                    live: asyncpg.Connection = conn
                    try:
                        await self._round_trip(live)
                        return
                    except _ERRORS as exc:
                        # dead: make the watcher replace it now, and wait for the new one
                        if self._listener is live:
                            self._listening.clear()
                        log.warning("postgresql listening connection failed a round trip: %r", exc)
                        live.terminate()
        except TimeoutError:
            self._channels.discard(channel)
            raise BrokerUnavailable(
                f"postgresql: no listening connection within {self.subscribe_timeout}s"
            ) from None
        except BaseException:
            self._channels.discard(channel)
            raise

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    # -- publishing ----------------------------------------------------------------------------

    def _fits(self, size: int, data: bytes) -> bool:
        """Whether a notification can carry ``data`` (UTF-8 text without NUL, small enough)."""
        if size + _HEADROOM > sql.PAYLOAD_MAX or b"\x00" in data:
            return False
        if self._ascii_only:
            return data.isascii()
        try:
            data.decode()
        except UnicodeDecodeError:
            return False
        return True

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
        meta: dict[str, Any] = {"c": channel, "t": time.time()}
        if info is not None:
            meta["i"] = encode_info(info)
        if tags:
            meta["g"] = tags
        raw_head = orjson.dumps(meta)
        head = raw_head.decode()
        inline = self._fits(len(raw_head) + len(data), data)
        if not inline and len(orjson.dumps(channel)) + _HEADROOM > sql.PAYLOAD_MAX:
            raise ValueError("channel name too long for the PostgreSQL broker")
        async with self._conn() as conn:
            row = await conn.fetchrow(
                self._sql.publish,
                channel,
                new_epoch(),
                history.meta_ttl,
                head,
                data,
                max(history.size, 0),
                history.ttl,
                inline,
                self.fetch_ttl,
                self.notify_channel,
            )
        return StreamPosition(row[0], row[1])

    async def _notify(self, body: bytes) -> None:
        """Notify every node of ``body``, through the notes table if it is no fit."""
        async with self._conn() as conn:
            if self._fits(len(body) - _HEADROOM, body):
                await conn.execute(self._sql.notify, self.notify_channel, body.decode())
            else:
                await conn.execute(self._sql.note, self.notify_channel, body, self.fetch_ttl)

    @_reachable
    async def publish_join_leave(self, event: JoinLeave) -> None:
        kind = b"J" if event.join else b"L"
        await self._notify(kind + orjson.dumps([event.channel, encode_info(event.info)]))

    @_reachable
    async def publish_control(self, data: bytes) -> None:
        await self._notify(b"C" + data)

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
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._sql.history,
                channel,
                new_epoch(),
                meta_ttl,
                None if since is None else since.offset,
                None if limit is None or limit < 0 else limit,
                reverse,
            )
        top, epoch = rows[0][0], rows[0][1]
        pubs = [
            _publication(orjson.loads(r[3]), r[2], epoch, r[4]) for r in rows if r[2] is not None
        ]
        return HistoryResult(pubs, StreamPosition(top, epoch))

    @_reachable
    async def remove_history(self, channel: str) -> None:
        async with self._conn() as conn:
            await conn.execute(self._sql.remove_history, channel)

    # -- presence ------------------------------------------------------------------------------

    @_reachable
    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        async with self._conn() as conn:
            await conn.execute(
                self._sql.add_presence,
                channel,
                info.client,
                orjson.dumps(encode_info(info)).decode(),
                ttl,
            )

    @_reachable
    async def remove_presence(self, channel: str, client: str) -> None:
        async with self._conn() as conn:
            await conn.execute(self._sql.remove_presence, channel, client)

    @_reachable
    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._sql.presence, channel)
        return {r[0]: decode_info(orjson.loads(r[1])) for r in rows}


def _publication(meta: dict[str, Any], offset: int, epoch: str, data: bytes) -> Publication:
    info = decode_info(meta["i"]) if "i" in meta else None
    return Publication(meta["c"], data, offset, epoch, info, meta.get("g"), meta["t"])
