"""A burst of broker commands waits for a pooled Redis connection instead of failing.

Found by bench/soak.py: redis-py's plain pool refuses a command past 100 connections in use
("Too many connections", error 100 to the client), so a burst (every channel healed after the
pub/sub connection dropped while clients recover, or many publishers at once) failed
publishes and subscriptions.
"""

from __future__ import annotations

import asyncio

from tidings import Tidings

from .engines import ENGINES, namespace


async def test_three_hundred_concurrent_publishes_all_succeed() -> None:
    async with namespace(ENGINES["redis"]) as url, Tidings(broker_url=url) as tidings:
        hub = tidings.hub
        results = await asyncio.gather(
            *(hub.publish(f"burst{i % 30}", {"i": i}) for i in range(300)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        for n in range(30):  # every publication is in its channel's history, offsets 1..10
            history = await hub.history(f"burst{n}", limit=-1)
            assert [p.offset for p in history.publications] == list(range(1, 11))
