"""A burst of broker commands waits for a pooled Redis connection instead of failing.

Found by bench/soak.py: redis-py's plain pool refuses a command past 100 connections in use
("Too many connections", error 100 to the client), so a burst (every channel healed after the
pub/sub connection dropped while clients recover, or many publishers at once) failed
publishes and subscriptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tidings import Tidings

from .engines import ENGINES, namespace

#: per engine: concurrent commands enough to pass 100 connections in use on one node (a
#: cluster spreads its channels over 3 shards, each node with its own pool of 100)
BURSTS = {"redis": 300, "redis_cluster": 900, "redis_sentinel": 300}


@pytest.fixture(params=sorted(BURSTS))
async def deployment(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int]]:
    async with namespace(ENGINES[request.param]) as url:
        yield url, BURSTS[request.param]


async def test_a_burst_of_concurrent_publishes_all_succeed(deployment: tuple[str, int]) -> None:
    url, burst = deployment
    async with Tidings(broker_url=url) as tidings:
        hub = tidings.hub
        results = await asyncio.gather(
            *(hub.publish(f"burst{i % 30}", {"i": i}) for i in range(burst)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        each = burst // 30
        for n in range(30):  # every publication is in its channel's history, offsets 1..each
            history = await hub.history(f"burst{n}", limit=-1)
            assert [p.offset for p in history.publications] == list(range(1, each + 1))


async def test_a_burst_of_concurrent_history_reads_all_succeed(
    deployment: tuple[str, int],
) -> None:
    """As every channel's gap read after a lost pub/sub connection, or clients recovering."""
    url, burst = deployment
    async with Tidings(broker_url=url) as tidings:
        hub = tidings.hub
        positions = [await hub.publish(f"read{n}", {"n": n}) for n in range(30)]
        results = await asyncio.gather(
            *(hub.history(f"read{i % 30}", limit=-1) for i in range(burst)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        for i, result in enumerate(results):
            assert not isinstance(result, BaseException)
            assert result.position == positions[i % 30]
            assert [p.data for p in result.publications] == [b'{"n":%d}' % (i % 30)]
