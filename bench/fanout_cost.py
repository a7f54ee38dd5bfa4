"""Fan-out in one process: ``subs`` sessions on FastWebSocket's own write path.

No sockets and no client: each session's transport is a real :class:`FastWebSocket` whose
asyncio transport only counts bytes, so the number is the server's cost from ``hub.publish``
to ``transport.write`` (encode, frame, queue, pack) per delivery, for the raw or the Centrifugo
protocol (``centrifuge``: JSON; ``protobuf``: the ``centrifuge-protobuf`` flavour). CPU time of
this process, not wall time: other processes on the machine inflate it
far less. Shapes:

- ``through``: one publication per loop iteration (written during the fan-out),
- ``batch``: ``batch`` publications per loop iteration (queued, packed into one write each),
- ``ceiling``: the raw ceiling's loop for comparison: one frame built per publication, then
  ``transport.write(frame)`` for every subscriber, nothing else.

``python -m bench.fanout_cost [--protocol raw|centrifuge|protobuf] [--subs 1000] [--pubs 200]
[--batch 10] [--shapes through batch ceiling]``; for instruction counts, run one shape under
``valgrind --tool=callgrind`` with two ``--pubs`` values (``--repeats 1``): the difference over
the extra deliveries is the cost of one.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from tidings import Hub, Settings
from tidings.brokers import create_broker
from tidings.frames import text_frame
from tidings.protocol import centrifuge
from tidings.protocol.raw import RAW_FRAMED
from tidings.serve.websocket import FastWebSocket
from tidings.session import Session
from tidings.state import State


class _Socket:
    """An asyncio transport that drops what it is given, counting the bytes."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)


class _WebSocket(FastWebSocket):
    """FastWebSocket's write path; closing (at the hub's shutdown) does nothing."""

    __slots__ = ()

    def finish(self, frames: list[Any], code: int, reason: str, timeout: float) -> None:
        return None


def _websocket(sock: _Socket) -> FastWebSocket:
    ws = _WebSocket.__new__(_WebSocket)  # the write path only: no handshake, no loop
    ws.transport = sock  # type: ignore[assignment]
    ws.state = State.OPEN
    ws.writable = True
    ws.on_drain = ws.on_sink = None
    ws.sink = sock
    return ws


def _ceiling(sockets: list[_Socket], pubs: int, data: str) -> None:
    """The raw ceiling's fan-out (shared/bench/peers/raw_ceiling.py): frame once, write each."""
    writes = [s.write for s in sockets]
    for _ in range(pubs):
        frame = text_frame(data.encode())
        for write in writes:
            write(frame)


async def measure(
    subs: int,
    pubs: int,
    batch: int,
    shapes: tuple[str, ...] = ("through", "batch"),
    protocol: str = "centrifuge",
) -> dict[str, Any]:
    hub = Hub(create_broker("memory://"), Settings(max_connections=100_000))
    await hub.start()
    sock = _Socket()
    # the session's format, as the endpoints pick it for a direct transport
    wire: Any = (
        RAW_FRAMED
        if protocol == "raw"
        else centrifuge.CentrifugeEncoders().wire_format(True, protobuf=protocol == "protobuf")
    )
    encoder = RAW_FRAMED if protocol == "raw" else wire.encoder(False)
    try:
        for _ in range(subs):
            session = Session(hub, _websocket(sock), wire)
            hub.connect(session)
            session.open()
            await hub.subscribe(session, "bench", encoder)
        data = {"text": "x" * 100}
        out: dict[str, Any] = {"subs": subs, "pubs": pubs, "batch": batch}
        out["format"] = type(wire).__name__
        for shape in shapes:
            if shape == "ceiling":
                t0 = time.process_time()
                _ceiling([_Socket() for _ in range(subs)], pubs, "x" * 100)
                cpu = time.process_time() - t0
                out["ceiling_us_per_delivery"] = round(cpu / (pubs * subs) * 1e6, 3)
                continue
            per_iteration = batch if shape == "batch" else 1
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            t0, w0 = time.process_time(), sock.written
            for i in range(pubs):
                await hub.publish("bench", data)
                if i % per_iteration == per_iteration - 1:
                    await asyncio.sleep(0)  # the Flusher runs
            await asyncio.sleep(0)
            cpu = time.process_time() - t0
            out[f"{shape}_us_per_delivery"] = round(cpu / (pubs * subs) * 1e6, 3)
            out[f"{shape}_bytes"] = sock.written - w0
    finally:
        await hub.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subs", type=int, default=1000)
    parser.add_argument("--pubs", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=["through", "batch", "ceiling"])
    parser.add_argument(
        "--protocol", choices=["raw", "centrifuge", "protobuf"], default="centrifuge"
    )
    args = parser.parse_args()
    shapes = tuple(args.shapes)
    runs = [
        asyncio.run(measure(args.subs, args.pubs, args.batch, shapes, args.protocol))
        for _ in range(args.repeats)
    ]
    best = dict(runs[0])
    for key in best:
        if key.endswith("_us_per_delivery"):
            best[key] = min(r[key] for r in runs)  # the least disturbed run
    print(best)


if __name__ == "__main__":
    main()
