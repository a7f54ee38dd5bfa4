"""permessage-deflate: server CPU per delivery and bytes on the wire, compressed vs not.

Every subscriber is a raw client over a real socket that offers deflate as Chromium does
(``permessage-deflate; client_max_window_bits``) and speaks the Centrifugo JSON protocol on
``/connection/websocket``. One publication at a time goes in through ``POST /api/publish``; the
next goes once every subscriber has received the previous one (whole frames counted at the
socket; the client's own CPU is not measured). The server runs in its own process;
its CPU time (user + system, from ``/proc``) over the publishing phase divided by the deliveries
is the number, with the bytes every client read divided by the deliveries beside it.

Servers:

- ``fast_deflate``: ``tidings serve`` with ``TIDINGS_COMPRESSION=true``: negotiated without
  context takeover, ONE compressed frame per publication written to every subscriber.
- ``fast_plain``: ``tidings serve`` without compression (the extension is declined).
- ``asgi_deflate``: the mounted path, uvicorn's websockets-sansio protocol with its own
  per-connection deflate (``--ws-per-message-deflate true``, uvicorn's default): context
  takeover, every message compressed once per connection.
- ``asgi_plain``: the same with ``--ws-per-message-deflate false``.

``python -m bench.deflate [--subs 200] [--pubs 200] [--size 2000] [--servers ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from typing import Any

import httpx
import orjson

PY = sys.executable
SERVERS = ("fast_deflate", "fast_plain", "asgi_deflate", "asgi_plain")
OFFER = "permessage-deflate; client_max_window_bits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(server: str, port: int) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "TIDINGS_DEMO": "false", "TIDINGS_LOG_LEVEL": "warning"}
    env["TIDINGS_MAX_CONNECTIONS"] = "100000"
    if server.startswith("fast"):
        env["TIDINGS_COMPRESSION"] = "true" if server == "fast_deflate" else "false"
        return [PY, "-m", "tidings.cli", "serve", "--port", str(port)], env
    deflate = "true" if server == "asgi_deflate" else "false"
    return [
        PY, "-m", "uvicorn", "--factory", "tidings:create_app", "--port", str(port),
        "--ws", "websockets-sansio", "--loop", "uvloop", "--http", "httptools",
        "--ws-per-message-deflate", deflate, "--log-level", "warning",
    ], env  # fmt: skip


def _cpu(pid: int) -> float:
    """Seconds of CPU (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Subscriber:
    """A raw Centrifugo client: counts the bytes and the publication frames it reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.bytes = 0
        self.frames = 0
        self.compressed = 0
        self.changed = asyncio.Event()
        # inflates with context takeover: valid for both servers (a message compressed
        # without it refers to nothing before it, which an inflater with history reads too)
        self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)

    @classmethod
    async def open(cls, port: int, channel: str) -> Subscriber:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**22)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {OFFER}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        sub = cls(reader, writer)
        # uncompressed commands: a deflate connection may send plain messages (RSV1 clear)
        sub.send(orjson.dumps({"id": 1, "connect": {}}))
        await sub.reply()  # one at a time, so no two replies share a frame
        sub.send(orjson.dumps({"id": 2, "subscribe": {"channel": channel}}))
        await sub.reply()
        return sub

    async def reply(self) -> None:
        """Read up to the next frame that is not a ping (a reply), inflating it if needed."""
        while True:
            first, _, data = await self.frame()
            if first & 0x0F == 0x1:
                if first & 0x40:
                    data = self.inflater.decompress(data + b"\x00\x00\xff\xff")
                if data == b"{}":  # a Centrifugo ping came first: answer it, read on
                    self.send(b"{}")
                    continue
                return

    def send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else (
            struct.pack("!BBH", 0x81, 0x80 | 126, n))  # fmt: skip
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def frame(self) -> tuple[int, int, bytes]:
        head = await self.reader.readexactly(2)
        n = head[1] & 0x7F
        extra = 0
        if n == 126:
            extra, n = 2, struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            extra, n = 8, struct.unpack("!Q", await self.reader.readexactly(8))[0]
        data = await self.reader.readexactly(n)
        return head[0], 2 + extra + n, data

    async def run(self) -> None:
        while True:
            try:
                first, size, data = await self.frame()
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the server stopped
            if first & 0x0F == 0x8:
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                raise SystemExit(f"the server closed a subscriber: {code} {data[2:]!r}")
            if first & 0x0F != 0x1:  # a WebSocket ping: not part of the measurement
                continue
            compressed = bool(first & 0x40)
            if compressed:
                data = self.inflater.decompress(data + b"\x00\x00\xff\xff")
            lines = data.split(b"\n")
            if b"{}" in lines:  # a Centrifugo ping: answer it, or the server closes us
                self.send(b"{}")
            pushes = sum(line.startswith(b'{"push"') for line in lines)
            if not pushes:
                continue
            self.bytes += size
            self.frames += pushes
            self.compressed += compressed * pushes
            self.changed.set()


def payload(size: int, seed: int = 0) -> dict[str, Any]:
    """A JSON document of about ``size`` bytes that looks like application data (records with
    repeated keys and varied values), not a run of one character that compresses to nothing;
    ``seed`` varies the values, so consecutive publications differ as real ones do (a
    compressor with context takeover still finds the keys in its window)."""
    rows = []
    n = seed * 1009
    while len(orjson.dumps(rows)) < size:
        status = ("open", "closed", "pending")[n % 3]
        user, score, ts = f"user{n * 7919 % 1000}", n * 31 % 977, 1764500000 + n * 13
        rows.append({"id": n, "user": user, "score": score, "status": status, "ts": ts})
        n += 1
    return {"rows": rows}


async def measure(server: str, subs: int, pubs: int, size: int) -> dict[str, Any]:
    port = _free_port()
    cmd, env = _command(server, port)
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(300):
                try:
                    if (await http.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            clients = [await Subscriber.open(port, "bench") for _ in range(subs)]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            datas = [orjson.dumps(payload(size, i)) for i in range(pubs)]
            bodies = [b'{"channel":"bench","data":' + d + b"}" for d in datas]
            wall = time.perf_counter()
            cpu = _cpu(proc.pid)
            for i, body in enumerate(bodies, start=1):
                r = await http.post("/api/publish", content=body)
                assert r.status_code == 200, r.text
                for c in clients:
                    while c.frames < i:
                        c.changed.clear()
                        await asyncio.wait_for(c.changed.wait(), 30)
            cpu = _cpu(proc.pid) - cpu
            wall = time.perf_counter() - wall
            for t in tasks:
                t.cancel()
            for c in clients:
                c.writer.close()
    finally:
        proc.terminate()
        await proc.wait()
    deliveries = subs * pubs
    return {
        "server": server,
        "subs": subs,
        "pubs": pubs,
        "payload_bytes": round(sum(map(len, datas)) / pubs),
        "cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2),
        "wire_bytes_per_delivery": round(sum(c.bytes for c in clients) / deliveries, 1),
        "compressed_share": round(sum(c.compressed for c in clients) / deliveries, 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subs", type=int, default=200)
    parser.add_argument("--pubs", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="payload bytes (JSON)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for server in args.servers:
        result = asyncio.run(measure(server, args.subs, args.pubs, args.size))
        print(orjson.dumps(result).decode(), flush=True)


if __name__ == "__main__":
    main()
