"""The PostgreSQL engine on its own: publishes/s, and what a node pays for notifications of
channels it does not subscribe (every node of a deployment receives every publication).

    python -m bench.postgres_engine [--url postgresql://postgres@127.0.0.1:5432/test]

Prints one JSON line per measurement. Uses a fresh schema, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid

import asyncpg

from tidings.brokers import HistoryOptions, Publication, create_broker
from tidings.brokers.postgres import PostgresBroker

KEEP = HistoryOptions(size=100, ttl=300)


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.last: list[float] = []
        self.done = asyncio.Event()
        self.want = 0

    def on_publication(self, publication: Publication) -> None:
        self.n += 1
        self.last.append(time.perf_counter())
        if self.n >= self.want:
            self.done.set()

    def on_join_leave(self, event: object) -> None: ...

    def on_control(self, data: bytes) -> None: ...

    def on_resync(self) -> None: ...


# A node in its own process that subscribes only "start" and "end": the CPU it spends between
# them, divided by what was published to other channels meanwhile, is what one notification
# it does not want costs it, asyncpg's parsing and the event loop included.
LISTENER = """
import asyncio, sys, time
import uvloop
from tidings.brokers import create_broker
class H:
    def __init__(self):
        self.marks = {}
        self.done = asyncio.Event()
    def on_publication(self, p):
        self.marks[p.channel] = time.process_time()
        if p.channel == "end":
            self.done.set()
    def on_join_leave(self, e): ...
    def on_control(self, d): ...
    def on_resync(self): ...
async def main():
    h = H()
    b = create_broker(sys.argv[1])
    await b.start(h)
    await b.subscribe("start")
    await b.subscribe("end")
    print("ready", flush=True)
    await asyncio.wait_for(h.done.wait(), 600)
    print(h.marks["end"] - h.marks["start"], flush=True)
    await b.close()
uvloop.install()  # as tidings serve runs
asyncio.run(main())
"""


async def dropped_cost(url: str, a: object, count: int, data: bytes) -> float:
    """µs of CPU a node spends per notification of a channel it does not subscribe."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LISTENER, url, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"ready\n"
    publish = a.publish  # type: ignore[attr-defined]
    await publish("start", data, KEEP)

    async def worker(k: int) -> None:
        for i in range(k, count, 16):
            await publish(f"other{i % 1000}", data, KEEP)

    await asyncio.gather(*(worker(k) for k in range(16)))
    await publish("end", data, KEEP)
    cpu = float((await proc.stdout.readline()).decode())
    await proc.wait()
    return cpu / count * 1e6


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(url: str, count: int) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    url = f"{url}{'&' if '?' in url else '?'}prefix={prefix}&pool_size=10"
    a = create_broker(url)
    b = create_broker(url)
    got = Counter()
    await a.start(Counter())
    await b.start(got)
    try:
        data = b'{"text":"' + b"x" * 100 + b'"}'
        # 1. one publisher, one channel, each publish awaited: the round trip of one transaction
        await b.subscribe("one")
        got.want = count
        start = time.perf_counter()
        for _ in range(count):
            await a.publish("one", data, KEEP)
        elapsed = time.perf_counter() - start
        await asyncio.wait_for(got.done.wait(), 60)
        report(
            what="sequential publish, 1 channel, 128-byte data, history 100",
            publishes_per_s=round(count / elapsed),
            ms_per_publish=round(elapsed / count * 1000, 3),
        )

        # 2. 1,000 channels, 32 publishers at once (pool_size 10), one subscriber node
        channels = [f"c{i}" for i in range(1000)]
        await asyncio.gather(*(b.subscribe(c) for c in channels))
        got.n, got.done = 0, asyncio.Event()
        got.want = count

        async def worker(k: int) -> None:
            for i in range(k, count, 32):
                await a.publish(channels[i % 1000], data, KEEP)

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(32)))
        elapsed = time.perf_counter() - start
        await asyncio.wait_for(got.done.wait(), 60)
        report(
            what="concurrent publish, 1,000 channels, 32 publishers, pool_size 10",
            publishes_per_s=round(count / elapsed),
        )

        # 3. what a node pays for a notification it drops (a channel nobody here wants) and
        # for one it delivers: the engine's own Python, from payload to handler
        assert isinstance(b, PostgresBroker)
        payload = 'P17 0b35b48c {"c":"not-here:room-42","t":1764500000.123}\n' + data.decode()
        wanted = payload.replace("not-here:room-42", "c1")
        for name, p in (("dropped", payload), ("delivered", wanted)):
            runs = []
            for _ in range(5):
                n = 100_000
                t0 = time.perf_counter()
                for _ in range(n):
                    b._on_notify(None, 0, "", p)
                runs.append((time.perf_counter() - t0) / n * 1e6)
            report(
                what=f"notification {name} by a node (engine code only)",
                us_per_notification=round(statistics.median(runs), 2),
            )

        report(
            what="CPU of a node per notification it drops (own process, asyncpg included)",
            us_per_notification=round(await dropped_cost(url, a, count, data), 2),
        )

        # 4. 1 MiB publications (by reference: the node reads them back from the table)
        big = b'"' + b"y" * (1024 * 1024 - 2) + b'"'
        got.n, got.done = 0, asyncio.Event()
        got.want = 50
        start = time.perf_counter()
        for _ in range(50):
            await a.publish("one", big, HistoryOptions(size=0, ttl=0))
        await asyncio.wait_for(got.done.wait(), 120)
        elapsed = time.perf_counter() - start
        report(what="1 MiB publications, published and received", per_s=round(50 / elapsed, 1))
    finally:
        await a.close()
        await b.close()
        conn = await asyncpg.connect(url.partition("?")[0])
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
        finally:
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.count))
