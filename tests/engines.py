"""Broker engines for tests: URLs from env vars, a fresh namespace per test, cleanup after.

Adding an engine = one more entry in ``ENGINES`` (a URL maker, a reachability check, a cleanup,
and a URL that cannot be reached). Under CI=true an unreachable service fails the test.
"""

from __future__ import annotations

import asyncio
import os
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
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_publication(self, publication: Publication) -> None:
        self._add(publication)

    def on_join_leave(self, event: JoinLeave) -> None:
        self._add(event)

    def on_control(self, data: bytes) -> None:
        self._add(data)

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
