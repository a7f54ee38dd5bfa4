"""Server CPU per delivery on the streaming transports beside a WebSocket, same protocol.

Starts ``tidings serve`` (the fast path, as users run it) with a token secret, opens ``subs``
unidirectional subscribers of one kind (``uni_http_stream``, ``uni_sse``, ``uni_websocket``; the
channel comes from the token's ``channels`` claim, so all three use the same encoder and only
the transport differs), publishes ``pubs`` messages through ``POST /api/publish`` and waits until
every subscriber has counted every publication. The figure is the server process's CPU time
(user + system, from ``/proc``) over the deliveries: wall time on a shared machine says little.
The clients run in this process on raw sockets and count newline-separated messages (a
WebSocket client parses frames with ``websockets``).

``python -m bench.streams [--subs 200] [--pubs 200] [--kinds uni_http_stream uni_sse
uni_websocket]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import jwt
import orjson
import websockets

SECRET = "bench-secret-that-is-long-enough-for-hs256"
CHANNEL = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _token(i: int) -> str:
    return jwt.encode({"sub": f"u{i}", "channels": [CHANNEL]}, SECRET, algorithm="HS256")


class Counter:
    """Counts publications across subscribers; ``done`` once each got ``expected``."""

    def __init__(self, subs: int, expected: int) -> None:
        self.left = subs
        self.expected = expected
        self.done = asyncio.Event()

    def finished_one(self) -> None:
        self.left -= 1
        if not self.left:
            self.done.set()


async def _stream(port: int, path: str, i: int, ready: asyncio.Event, count: Counter) -> None:
    body = orjson.dumps({"token": _token(i)})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if path.endswith("sse"):
        head = f"GET {path}?cf_connect={quote(body.decode())} HTTP/1.1\r\nHost: b\r\n\r\n"
        writer.write(head.encode())
    else:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: b\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    got = 0
    seen_connect = False
    while got < count.expected:
        chunk = await reader.read(1 << 16)
        if not chunk:
            raise RuntimeError("stream ended")
        if not seen_connect and b'"connect"' in chunk:
            seen_connect = True
            ready.set()
        got += chunk.count(b'"pub":')
    count.finished_one()
    writer.close()


async def _websocket(port: int, i: int, ready: asyncio.Event, count: Counter) -> None:
    request = quote(orjson.dumps({"token": _token(i)}).decode())
    url = f"ws://127.0.0.1:{port}/connection/uni_websocket?cf_connect={request}"
    async with websockets.connect(url, max_size=None) as ws:
        got = 0
        while got < count.expected:
            frame = await ws.recv()
            text = frame if isinstance(frame, str) else frame.decode()
            if '"connect"' in text:
                ready.set()
            got += text.count('"pub":')
        count.finished_one()


async def run(kind: str, subs: int, pubs: int) -> dict[str, float | int | str]:
    port = _free_port()
    env = {
        **os.environ,
        "TIDINGS_TOKEN_HMAC_SECRET": SECRET,
        "TIDINGS_API_KEY": "key",
        "TIDINGS_DEMO": "false",
        "TIDINGS_MAX_CONNECTIONS": "100000",
    }
    cmd = [sys.executable, "-m", "tidings.cli", "serve", "--port", str(port)]
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(600):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            count = Counter(subs, pubs)
            readies = [asyncio.Event() for _ in range(subs)]
            if kind == "uni_websocket":
                tasks = [_websocket(port, i, readies[i], count) for i in range(subs)]
            else:
                path = f"/connection/{kind}"
                tasks = [_stream(port, path, i, readies[i], count) for i in range(subs)]
            clients = [asyncio.create_task(t) for t in tasks]
            await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
            cpu0, wall0 = _cpu(proc.pid), time.perf_counter()
            headers = {"x-api-key": "key"}
            for n in range(pubs):
                body = {"channel": CHANNEL, "data": {"n": n, "text": "x" * 100}}
                r = await http.post("/api/publish", json=body, headers=headers)
                r.raise_for_status()
            await asyncio.wait_for(count.done.wait(), 300)
            cpu, wall = _cpu(proc.pid) - cpu0, time.perf_counter() - wall0
            await asyncio.gather(*clients, return_exceptions=True)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    deliveries = subs * pubs
    return {
        "kind": kind,
        "subs": subs,
        "pubs": pubs,
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subs", type=int, default=200)
    parser.add_argument("--pubs", type=int, default=200)
    parser.add_argument(
        "--kinds", nargs="+", default=["uni_http_stream", "uni_sse", "uni_websocket"]
    )
    args = parser.parse_args()
    for kind in args.kinds:
        print(orjson.dumps(asyncio.run(run(kind, args.subs, args.pubs))).decode(), flush=True)


if __name__ == "__main__":
    main()
