"""Where an idle WebSocket's memory goes: tracemalloc in the server, N connections from a child.

  .bench-venv/bin/python -m bench.idle_memory            # tidings serve's fast path
  .bench-venv/bin/python -m bench.idle_memory --asgi     # uvicorn's websockets-sansio + FastAPI
  .bench-venv/bin/python -m bench.idle_memory --centrifuge   # Centrifugo-protocol connections

Starts the server in this process (uvloop, the options of `tidings serve`), snapshots the Python
heap, lets a child process open ``--n`` subscribers (picows) to ``/ws/t0``, snapshots again and
prints the difference per connection, largest first. RSS per connection (which also counts what
C extensions allocate outside Python's allocator) is what fanout.py's ``mem20k`` reports;
``--rss`` measures it here instead, without tracemalloc (whose own bookkeeping inflates RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import subprocess
import sys
import tracemalloc

#: what a Centrifugo-protocol client sends first (as the shared harness does)
HELLO = b'{"id":1,"connect":{"name":"bench"}}\n{"id":2,"subscribe":{"channel":"t0"}}'


async def _clients(port: int, n: int, centrifuge: bool) -> None:
    from picows import WSListener, WSMsgType, ws_connect

    sem = asyncio.Semaphore(100)
    transports = []
    path = "/connection/websocket" if centrifuge else "/ws/t0"

    async def one() -> None:
        async with sem:
            transport, _ = await ws_connect(WSListener, f"ws://127.0.0.1:{port}{path}")
            if centrifuge:
                transport.send(WSMsgType.TEXT, HELLO)
            transports.append(transport)

    await asyncio.gather(*(one() for _ in range(n)))
    print("connected", flush=True)
    sys.stdin.readline()  # hold the connections until the parent has its snapshot


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


async def _server(n: int, asgi: bool, top: int, centrifuge: bool, rss: bool) -> None:
    import uvicorn

    from tidings import Settings, create_app
    from tidings.serve.front import Front
    from tidings.serve.server import server_options

    settings = Settings(max_connections=n + 100, demo=False)
    app = create_app(settings)
    options = server_options(settings)
    options.pop("loop")
    if asgi:
        options.update(ws="websockets-sansio", http="httptools", interface="auto")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app if asgi else Front(app), log_level="warning", **options)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    for _ in range(600):
        if server.started:
            break
        await asyncio.sleep(0.05)
    gc.collect()
    rss_before = _rss_kib()
    before = None if rss else tracemalloc.take_snapshot()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.idle_memory", "--client", str(port), "--n", str(n),
        *(["--centrifuge"] if centrifuge else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdin is not None
    await child.stdout.readline()
    await asyncio.sleep(1.0)
    gc.collect()
    rss_after = _rss_kib()
    after = None if rss else tracemalloc.take_snapshot()
    child.stdin.write(b"\n")
    await child.wait()
    kind = "asgi" if asgi else "fast"
    if before is None or after is None:
        print(f"{kind}: {(rss_after - rss_before) / n:.2f} KiB of RSS per idle connection")
        server.should_exit = True
        await task
        return
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"{kind}: {total / n:.0f} B of Python heap per idle connection")
    for s in stats[:top]:
        print(f"{s.size_diff / n:8.0f} B  {s.count_diff / n:5.2f} blocks  {s.traceback}")
    server.should_exit = True
    await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--asgi", action="store_true", help="uvicorn's own WebSocket protocol")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--centrifuge", action="store_true", help="/connection/websocket clients")
    ap.add_argument("--rss", action="store_true", help="RSS per connection, no tracemalloc")
    ap.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import uvloop

    if args.client:
        uvloop.run(_clients(args.client, args.n, args.centrifuge))
        return
    if not args.rss:
        tracemalloc.start(1)
    uvloop.run(_server(args.n, args.asgi, args.top, args.centrifuge, args.rss))


if __name__ == "__main__":
    main()
