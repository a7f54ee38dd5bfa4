"""In-process publishing: ``await hub.publish(...)`` and ``hub.publish_many`` from Python.

No sockets: the cost of the call itself (encode once, broker, hub routing) with ``subs`` local
subscribers that only queue (their transports discard writes), so the number is the publisher's
cost, not the fan-out's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tidings import Hub, Settings
from tidings.brokers import create_broker
from tidings.frames import Frame
from tidings.protocol.raw import RAW_FRAMED
from tidings.session import Session


class _Sink:
    """A direct transport that drops what it is given."""

    on_drain: Any = None
    on_sink: Any = None
    sink: Any = None
    writable = True
    framed = True

    async def receive(self) -> Frame | None:
        await asyncio.Event().wait()
        return None

    async def send(self, frames: list[Frame]) -> None:
        return None

    async def close(self, code: int, reason: str) -> None:
        return None

    def write_frames(self, frames: list[Frame]) -> None:
        return None

    def write_frame(self, frame: Frame) -> None:
        return None

    def finish(self, frames: list[Frame], code: int, reason: str, timeout: float) -> None:
        return None


async def measure(count: int = 100_000, subs: int = 1, batch: int = 100) -> dict[str, float]:
    hub = Hub(create_broker("memory://"), Settings(max_connections=100_000))
    await hub.start()
    try:
        for _ in range(subs):
            session = Session(hub, _Sink(), RAW_FRAMED)
            hub.connect(session)
            session.open()
            await hub.subscribe(session, "bench", RAW_FRAMED)
        data = {"text": "x" * 100}
        t0 = time.perf_counter()
        for i in range(count):
            await hub.publish("bench", data)
            if i % 64 == 63:  # let the Flusher run, as any caller that awaits I/O does
                await asyncio.sleep(0)
        one = time.perf_counter() - t0
        items = [("bench", data)] * batch
        t0 = time.perf_counter()
        for _ in range(count // batch):
            await hub.publish_many(items)
        many = time.perf_counter() - t0
        await asyncio.sleep(0)
    finally:
        await hub.stop()
    return {
        "publish_per_s": round(count / one),
        "publish_us": round(one / count * 1e6, 2),
        "publish_many_per_s": round(count // batch * batch / many),
    }


def main() -> None:
    for subs in (0, 1, 1000):
        print({"subscribers": subs, **asyncio.run(measure(subs=subs))})


if __name__ == "__main__":
    main()
