"""Soak: many recovering Centrifugo clients on one `tidings serve` for a long time.

``python -m bench.soak`` starts a private ``redis-server`` (no persistence) and one
``tidings serve`` on it, then holds ``--connections`` WebSocket connections (default 5,000)
for ``--duration`` seconds (default 30 minutes) while:

* a publisher posts ``--rate`` publications a second over ``--channels`` channels (HTTP API,
  one keep-alive connection);
* churn: every second ``--churn`` clients leave (a clean close) and come back one to three
  seconds later, recovering their subscription from where they were (``recover: true``);
* every ``--kill-every`` seconds the node's Redis pub/sub connection is killed
  (``CLIENT KILL TYPE pubsub``): the broker reconnects and heals the gap from history.

Each client is a small Centrifugo JSON-protocol client of its own over ``websockets`` (the SDK
costs too much per connection for thousands in one process): connect, subscribe
``recoverable``, answer pings, check every publication's offset. A publication a client never
gets, without being told (``recovered: false``, an unsubscribe, a close code that says so),
counts as **lost**; being told counts separately. Lost must be 0.

It reports the server's RSS over time (sampled from ``/proc/PID``; the slope is a least-squares
fit after the warm-up, KiB per minute), its open file descriptors and asyncio tasks
(``/metrics``: ``process_open_fds``, ``tidings_asyncio_tasks``) once every client is connected
and again at the end with the same number connected, and the counts above. Results go to stdout
and, with ``--out FILE``, as JSON. Figures go in bench/RESULTS.md, with the machine's state.

The short run shown in bench/RESULTS.md::

    python -m bench.soak --connections 500 --duration 180 --kill-every 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

BIN = Path(sys.executable).parent

CONFIG = """
[namespaces.soak]
history_size = 2000
history_ttl = 900
force_recovery = true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's (and its children's) open-file limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class Totals:
    """What every client saw, summed."""

    delivered: int = 0
    lost: int = 0  # offsets skipped without being told
    duplicates: int = 0  # offsets seen twice or out of order
    told: int = 0  # times a client was told it could not be made whole
    recovered: int = 0  # resubscriptions that came back recovered: true
    reconnects: int = 0  # connections the client did not close itself
    close_codes: dict[int, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # why reconnects happened
    failures: list[str] = field(default_factory=list)


class SoakClient:
    """One Centrifugo-protocol connection subscribed to one channel, recovering on reconnect."""

    def __init__(self, url: str, channel: str, totals: Totals) -> None:
        self.url = url
        self.channel = channel
        self.totals = totals
        self.offset = 0
        self.epoch = ""
        self.subscribed = False
        self.ws: websockets.ClientConnection | None = None
        self.task: asyncio.Task[None] | None = None
        self.leaving = False  # churn: this client closes on purpose, then comes back
        self.connected = asyncio.Event()
        self.since = 0.0  # when the current connection opened (monotonic seconds)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.session()
                delay = 0.2
            except asyncio.CancelledError:
                raise
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                if not self.leaving:
                    self.totals.reconnects += 1
                    why = f"{type(exc).__name__}: {str(exc)[:80]}"
                    self.totals.reasons[why] = self.totals.reasons.get(why, 0) + 1
                    if isinstance(exc, websockets.ConnectionClosed) and exc.rcvd is not None:
                        code = exc.rcvd.code
                        self.totals.close_codes[code] = self.totals.close_codes.get(code, 0) + 1
            self.connected.clear()
            if self.leaving:
                await asyncio.sleep(random.uniform(1.0, 3.0))
                self.leaving = False
            else:
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def session(self) -> None:
        async with websockets.connect(
            self.url, max_size=None, open_timeout=30, ping_interval=None
        ) as ws:
            self.ws = ws
            self.since = time.monotonic()
            await ws.send('{"id":1,"connect":{}}')
            reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if "connect" not in reply:
                raise OSError(f"connect refused: {reply}")
            sub: dict[str, Any] = {"channel": self.channel, "recoverable": True}
            if self.epoch:
                sub.update(recover=True, offset=self.offset, epoch=self.epoch)
            await ws.send(json.dumps({"id": 2, "subscribe": sub}))
            self.subscribed = False
            async for message in ws:
                for line in str(message).split("\n"):
                    self.handle(ws, json.loads(line) if line else {})
                if self.leaving:
                    await ws.close()
                    return

    def handle(self, ws: websockets.ClientConnection, frame: dict[str, Any]) -> None:
        if not frame:  # a ping: answer it
            asyncio.get_running_loop().create_task(_send(ws, "{}"))
            return
        if frame.get("id") == 2:
            if "error" in frame:
                raise OSError(f"subscribe failed: {frame['error']}")
            result = frame.get("subscribe", {})
            epoch = result.get("epoch", "")
            if result.get("was_recovering"):
                if result.get("recovered"):
                    self.totals.recovered += 1
                    for pub in result.get("publications", []):
                        self.publication(pub)
                else:  # told: start again from the stream's current position
                    self.totals.told += 1
                    self.offset = int(result.get("offset", 0))
            elif not self.epoch:
                self.offset = int(result.get("offset", 0))
            self.epoch = epoch
            self.subscribed = True
            self.connected.set()
            return
        push = frame.get("push")
        if push is None:
            return
        if "pub" in push:
            self.publication(push["pub"])
        elif "unsubscribe" in push:
            self.totals.told += 1
            raise OSError("unsubscribed by the server")

    def publication(self, pub: dict[str, Any]) -> None:
        offset = int(pub.get("offset", 0))
        if offset <= self.offset:
            self.totals.duplicates += 1
            self.totals.failures.append(
                f"{self.channel}: offset {offset} again after {self.offset} "
                f"(since connect {time.monotonic() - self.since:.2f}s)"
            )
            return
        if offset > self.offset + 1:
            self.totals.lost += offset - self.offset - 1
            self.totals.failures.append(
                f"{self.channel}: offset {offset} after {self.offset} ({offset - self.offset - 1}"
                " lost)"
            )
        self.offset = offset
        self.totals.delivered += 1

    def leave(self) -> None:
        """Close cleanly at the next message; come back in 1-3 s, recovering."""
        if self.subscribed and self.ws is not None:
            self.leaving = True
            self.subscribed = False
            asyncio.get_running_loop().create_task(self.ws.close())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()


async def _send(ws: websockets.ClientConnection, text: str) -> None:
    with contextlib.suppress(websockets.ConnectionClosed):
        await ws.send(text)


class Server:
    """The private redis-server and the `tidings serve` under test."""

    def __init__(self, workdir: Path, connections: int) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.port = free_port()
        self.connections = connections
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tidings: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        redis_log = (self.workdir / "redis.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(self.redis_port), "--save", "",
                 "--appendonly", "no", "--bind", "127.0.0.1"],
                stdout=redis_log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
        config = self.workdir / "tidings.toml"
        config.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
        env.update(
            TIDINGS_MAX_CONNECTIONS=str(self.connections * 2 + 100),
            TIDINGS_MAX_COMMANDS_PER_SECOND="0",
            TIDINGS_DEMO="false",
            TIDINGS_LOG_LEVEL="warning",
        )
        log = (self.workdir / "tidings.log").open("ab")
        self.tidings = subprocess.Popen(
            [str(BIN / "tidings"), "serve", "--port", str(self.port), "--config", str(config),
             "--broker", f"redis://127.0.0.1:{self.redis_port}/0?prefix=soak"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(self.tidings)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.tidings.poll() is not None:
                raise SystemExit(f"tidings did not start; see {self.workdir / 'tidings.log'}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.tidings is not None
        return self.tidings.pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def kill_pubsub(self) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.redis_port), "CLIENT", "KILL", "TYPE", "pubsub"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def metrics(http: httpx.AsyncClient) -> dict[str, float]:
    text = (await http.get("/metrics")).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


def slope_kib_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, KiB) samples, in KiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    cov = sum((t - mx) * (v - my) for t, v in samples)
    return cov / var * 60.0


async def wait_connected(clients: list[SoakClient], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for client in clients:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(client.connected.wait(), left)
        except TimeoutError:
            return False
    return True


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="tidings-soak-"))
    server = Server(workdir, args.connections)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    url = f"ws://127.0.0.1:{server.port}/connection/websocket"
    totals = Totals()
    channels = [f"soak:c{i}" for i in range(args.channels)]
    clients = [
        SoakClient(url, channels[i % len(channels)], totals) for i in range(args.connections)
    ]
    published: dict[str, int] = dict.fromkeys(channels, 0)
    publish_errors = 0
    stop = asyncio.Event()
    rss: list[tuple[float, int]] = []
    kills: list[str] = []
    report: dict[str, Any] = {"args": vars(args), "workdir": str(workdir)}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            started = time.monotonic()
            for i, client in enumerate(clients):  # ramp up, 200 at a time
                client.start()
                if i % 200 == 199:
                    await wait_connected(clients[i - 199 : i + 1], 120)
            if not await wait_connected(clients, 300):
                raise SystemExit("not every client connected within 300 s")
            ramp = time.monotonic() - started
            print(f"{args.connections} connected in {ramp:.1f}s", flush=True)
            before = await metrics(http)
            report["before"] = {
                "rss_kib": server.rss_kib(),
                "fds": server.fds(),
                "tasks": before.get("tidings_asyncio_tasks"),
                "connections": before.get("tidings_connections"),
            }

            async def publisher() -> None:
                nonlocal publish_errors
                n = 0
                interval = 1.0 / args.rate
                next_at = time.monotonic()
                while not stop.is_set():
                    channel = channels[n % len(channels)]
                    try:
                        r = await http.post(
                            "/api/publish", json={"channel": channel, "data": {"n": n}}
                        )
                        if r.status_code == 200 and "result" in r.json():
                            published[channel] = int(r.json()["result"]["offset"])
                        else:
                            publish_errors += 1
                    except httpx.HTTPError:
                        publish_errors += 1
                    n += 1
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))

            async def churner() -> None:
                while not stop.is_set():
                    await asyncio.sleep(1.0)
                    for client in random.sample(clients, min(args.churn, len(clients))):
                        client.leave()

            async def killer() -> None:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.kill_every)
                    if not stop.is_set():
                        out = await asyncio.to_thread(server.kill_pubsub)
                        kills.append(out)
                        print(f"killed the pub/sub connection ({out})", flush=True)

            async def sampler() -> None:
                t0 = time.monotonic()
                while not stop.is_set():
                    rss.append((time.monotonic() - t0, server.rss_kib()))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.sample_every)

            tasks = [
                asyncio.create_task(t())
                for t in (publisher, churner, killer, sampler)
            ]  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
            stop.set()
            await asyncio.gather(*tasks)
            # every client back and caught up to the last offset of its channel
            settled = await wait_connected(clients, 120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                behind = [c for c in clients if c.offset < published[c.channel]]
                if not behind:
                    break
                await asyncio.sleep(0.5)
            behind = [c for c in clients if c.offset < published[c.channel]]
            for client in behind:  # never caught up: counted lost
                totals.lost += published[client.channel] - client.offset
            after = await metrics(http)
            report["after"] = {
                "rss_kib": server.rss_kib(),
                "fds": server.fds(),
                "tasks": after.get("tidings_asyncio_tasks"),
                "connections": after.get("tidings_connections"),
            }
            report["server"] = {
                "gaps_healed": after.get("tidings_gaps_healed_total"),
                "gaps_lost": after.get("tidings_gaps_lost_total"),
                "slow_clients": after.get("tidings_slow_clients_total"),
                "publications": after.get("tidings_publications_total"),
            }
            report["settled"] = settled and not behind
    finally:
        for client in clients:
            if client.task is not None:
                client.task.cancel()
        await asyncio.gather(
            *(c.task for c in clients if c.task is not None), return_exceptions=True
        )
        server.stop()
    warm = [s for s in rss if s[0] >= args.duration * 0.1]
    report.update(
        rss_samples=len(rss),
        rss_slope_kib_per_min=round(slope_kib_per_min(warm), 1),
        # the second half alone: a leak keeps its slope, an allocator settling flattens out
        rss_slope_second_half_kib_per_min=round(
            slope_kib_per_min([x for x in rss if x[0] >= args.duration * 0.5]), 1
        ),
        # [seconds into the run, KiB] at every tenth of it: the shape behind the slopes
        rss_profile_kib=[
            [round(t), kib]
            for t, kib in (
                max((x for x in rss if x[0] <= args.duration * k / 10), default=(0.0, 0))
                for k in range(1, 11)
            )
            if kib
        ],
        rss_first_kib=rss[0][1] if rss else None,
        rss_last_kib=rss[-1][1] if rss else None,
        published=sum(published.values()),
        publish_errors=publish_errors,
        broker_kills=len(kills),
        delivered=totals.delivered,
        lost=totals.lost,
        duplicates=totals.duplicates,
        told_not_recovered=totals.told,
        recovered=totals.recovered,
        reconnects=totals.reconnects,
        close_codes=totals.close_codes,
        reconnect_reasons=totals.reasons,
        first_failures=totals.failures[:10],
    )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds")
    parser.add_argument("--kill-every", type=float, default=300.0, help="seconds")
    parser.add_argument("--rate", type=float, default=50.0, help="publications per second")
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--churn", type=int, default=5, help="clients leaving per second")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sample, seconds")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()
    report = asyncio.run(soak(args))
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if report["lost"] or not report.get("settled"):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
