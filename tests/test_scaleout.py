"""Two `tidings serve` processes on one broker, for every networked engine in tests/engines.py.

Node A takes the publishes (HTTP), subscribers sit on A and on B, over the raw endpoint and
Centrifugo's protocol (the official centrifuge-python SDK): every one gets every publication,
in order, once. History, recovery and presence work across nodes. And `tidings serve
--workers 2` on Redis: subscribers land on both workers, every one gets everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from centrifuge import Client, PublicationContext, SubscriptionEventHandler

from .cfutil import Raw
from .engines import ENGINES, WAIT, namespace
from .nodes import Proc, tidings_serve

COUNT = 200
RAW_A, RAW_B, CF_A, CF_B = 13, 12, 12, 13  # 50 subscribers over two nodes and two protocols
#: every engine but the process-local one (named, not asked for a URL: that would start the
#: private Redis Cluster and Sentinel at collection time)
NETWORKED = sorted(name for name in ENGINES if name != "memory")
#: seconds for deliveries that cross a broker on a loaded machine
SLOW_WAIT = 6 * WAIT

CONFIG = """
[defaults]
history_size = 500
history_ttl = 600
presence = true
join_leave = true
allow_publish = true

[namespaces.short]
presence = true
presence_ttl = 2
"""


@pytest.fixture(params=NETWORKED)
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with namespace(ENGINES[request.param]) as url:
        yield url


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tidings.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


async def start_nodes(
    tmp: Path, url: str, config: Path, procs: list[Proc], *names: str, args: tuple[str, ...] = ()
) -> list[Proc]:
    level = "info" if "--workers" in args else "warning"  # info: the workers' "serves" lines
    nodes = [
        tidings_serve(tmp, url, "--config", str(config), "--log-level", level, *args, name=n)
        for n in names
    ]
    for node in nodes:
        procs.append(node.start())
    await asyncio.gather(*(asyncio.to_thread(node.wait_healthy) for node in nodes))
    return nodes


# -- subscribers that record everything ----------------------------------------------------


class RawSub:
    """A raw `/ws/{channel}` subscriber; each text frame is one message."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.messages: list[str] = []
        self.changed = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, node: Proc, channel: str, query: str = "") -> RawSub:
        url = f"{node.ws}/ws/{channel}{'?' + query if query else ''}"
        return cls(await websockets.connect(url, max_size=None))

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in self.ws:
                self.messages.append(message if isinstance(message, str) else message.decode())
                self.changed.set()

    def data(self) -> list[Any]:
        return list(self.messages)

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class CfSub(SubscriptionEventHandler):
    """A centrifuge-python client subscribed to one channel."""

    def __init__(self) -> None:
        self.pubs: list[tuple[Any, int]] = []
        self.changed = asyncio.Event()
        self.client: Client | None = None

    async def on_publication(self, ctx: PublicationContext) -> None:
        self.pubs.append((ctx.pub.data, ctx.pub.offset))
        self.changed.set()

    @classmethod
    async def open(cls, node: Proc, channel: str) -> CfSub:
        sub = cls()
        sub.client = Client(f"{node.ws}/connection/websocket", proxy=None)
        subscription = sub.client.new_subscription(channel, sub)
        await sub.client.connect()
        await subscription.subscribe()
        await subscription.ready(WAIT)
        return sub

    def data(self) -> list[Any]:
        return [data for data, _ in self.pubs]

    async def close(self) -> None:
        if self.client is not None:
            await self.client.disconnect()


Sub = RawSub | CfSub


async def until(subs: list[Sub], done: Any, wait: float = SLOW_WAIT) -> None:
    """Wait until ``done(sub)`` holds for every subscriber (each wakes on its own events)."""

    async def one(sub: Sub) -> None:
        while not done(sub):
            sub.changed.clear()
            await sub.changed.wait()

    async with asyncio.timeout(wait):
        await asyncio.gather(*(one(sub) for sub in subs))


async def probe_until_subscribed(http: httpx.AsyncClient, channel: str, subs: list[Sub]) -> None:
    """Subscriptions become live on every node a little after the handshake (the node asks the
    broker): publish probes until each subscriber has seen one."""
    async with asyncio.timeout(SLOW_WAIT):
        while not all("probe" in sub.data() for sub in subs):
            r = await http.post("/api/publish", json={"channel": channel, "data": "probe"})
            assert r.status_code == 200 and "result" in r.json(), r.text
            with contextlib.suppress(TimeoutError):
                await until(subs, lambda s: "probe" in s.data(), 0.3)


async def api(http: httpx.AsyncClient, method: str, **params: Any) -> Any:
    r = await http.post(f"/api/{method}", json=params)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert "result" in answer, answer
    return answer["result"]


# -- the tests -----------------------------------------------------------------------------


async def test_publications_on_a_reach_50_subscribers_on_a_and_b_in_order(
    tmp_path: Path, broker_url: str, config: Path, procs: list[Proc]
) -> None:
    node_a, node_b = await start_nodes(tmp_path, broker_url, config, procs, "a", "b")
    channel = "fan"
    subs: list[Sub] = []
    try:
        subs += await asyncio.gather(*(RawSub.open(node_a, channel) for _ in range(RAW_A)))
        subs += await asyncio.gather(*(RawSub.open(node_b, channel) for _ in range(RAW_B)))
        subs += await asyncio.gather(*(CfSub.open(node_a, channel) for _ in range(CF_A)))
        subs += await asyncio.gather(*(CfSub.open(node_b, channel) for _ in range(CF_B)))
        async with httpx.AsyncClient(base_url=node_a.url, timeout=WAIT) as http:
            await probe_until_subscribed(http, channel, subs)
            offsets = []
            for i in range(COUNT):
                offsets.append(
                    (await api(http, "publish", channel=channel, data=f"m{i}"))["offset"]
                )
        assert offsets == list(range(offsets[0], offsets[0] + COUNT))
        expected = [f"m{i}" for i in range(COUNT)]

        def received(sub: Sub) -> list[Any]:
            return [d for d in sub.data() if d != "probe"]

        await until(subs, lambda s: len(received(s)) >= COUNT)
        for sub in subs:
            assert received(sub) == expected, type(sub).__name__
            if isinstance(sub, CfSub):  # the offsets the publishers were given, in order
                assert [o for d, o in sub.pubs if d != "probe"] == offsets
        async with httpx.AsyncClient(base_url=node_b.url, timeout=WAIT) as http:
            info_b = (await api(http, "info"))["nodes"][0]
            assert info_b["num_clients"] == RAW_B + CF_B
            history = await api(http, "history", channel=channel, limit=-1)
        assert [p["data"] for p in history["publications"] if p["data"] != "probe"] == expected
        assert history["offset"] == offsets[-1]
    finally:
        await asyncio.gather(*(sub.close() for sub in subs), return_exceptions=True)


async def test_history_recovery_and_presence_across_nodes(
    tmp_path: Path, broker_url: str, config: Path, procs: list[Proc]
) -> None:
    node_a, node_b = await start_nodes(tmp_path, broker_url, config, procs, "a", "b")
    channel = "room"
    async with (
        httpx.AsyncClient(base_url=node_a.url, timeout=WAIT) as on_a,
        httpx.AsyncClient(base_url=node_b.url, timeout=WAIT) as on_b,
    ):
        # a Centrifugo client on B, positioned: presence and history are seen from A
        client = await Raw.open(node_b.ws)
        try:
            me = (await client.connect())["client"]
            first = await client.subscribe(channel, recoverable=True)
            presence = (await api(on_a, "presence", channel=channel))["presence"]
            assert list(presence) == [me]
            stats = await api(on_a, "presence_stats", channel=channel)
            assert (stats["num_clients"], stats["num_users"]) == (1, 1)
            for i in range(3):
                await api(on_a, "publish", channel=channel, data={"n": i})
            pubs = await client.publications(channel, 3, wait=SLOW_WAIT)
            assert [p["data"] for p in pubs] == [{"n": 0}, {"n": 1}, {"n": 2}]
            offset, epoch = pubs[-1]["offset"], first["epoch"]
        finally:
            await client.close()
        # B's presence entry goes when its client leaves, for A too
        async with asyncio.timeout(SLOW_WAIT):
            while (await api(on_a, "presence", channel=channel))["presence"]:
                await asyncio.sleep(0.05)
        # published on A while the client is away
        for i in range(3, 8):
            await api(on_a, "publish", channel=channel, data={"n": i})
        history_b = await api(on_b, "history", channel=channel, limit=-1)
        assert [p["data"]["n"] for p in history_b["publications"]] == list(range(8))
        assert (history_b["offset"], history_b["epoch"]) == (offset + 5, epoch)
        since = await api(
            on_a, "history", channel=channel, limit=2, since={"offset": offset, "epoch": epoch}
        )
        assert [p["data"]["n"] for p in since["publications"]] == [3, 4]
        # ... and recovers it on the other node, A
        client = await Raw.open(node_a.ws)
        try:
            await client.connect()
            again = await client.subscribe(
                channel, recoverable=True, recover=True, offset=offset, epoch=epoch
            )
            assert again["recovered"] is True and again["was_recovering"] is True
            assert [p["data"]["n"] for p in again["publications"]] == [3, 4, 5, 6, 7]
            assert [p["offset"] for p in again["publications"]] == list(
                range(offset + 1, offset + 6)
            )
        finally:
            await client.close()
        # the raw endpoint on B catches up the same way, then goes live
        raw = await RawSub.open(node_b, channel, f"since={offset}&epoch={epoch}")
        try:
            await until([raw], lambda s: len(s.data()) >= 5)
            await api(on_a, "publish", channel=channel, data={"n": 8})
            await until([raw], lambda s: len(s.data()) >= 6)
            assert raw.data() == [f'{{"n":{i}}}' for i in range(3, 9)]
        finally:
            await raw.close()
        # a position from another life of the stream is not recovered, and says so
        client = await Raw.open(node_a.ws)
        try:
            await client.connect()
            stale = await client.subscribe(
                channel, recoverable=True, recover=True, offset=1, epoch="other"
            )
            # (Centrifugo's JSON leaves false and empty fields out)
            assert stale["was_recovering"] is True and not stale.get("recovered")
            assert not stale.get("publications") and stale["epoch"] == epoch
        finally:
            await client.close()


async def test_presence_of_a_node_killed_with_sigkill_expires_and_the_other_serves_on(
    tmp_path: Path, broker_url: str, config: Path, procs: list[Proc]
) -> None:
    node_a, node_b = await start_nodes(tmp_path, broker_url, config, procs, "a", "b")
    channel = "short:room"
    async with httpx.AsyncClient(base_url=node_a.url, timeout=WAIT) as on_a:
        client = await Raw.open(node_b.ws)
        try:
            me = (await client.connect())["client"]
            await client.subscribe(channel)
            assert list((await api(on_a, "presence", channel=channel))["presence"]) == [me]
            assert node_b.popen is not None
            node_b.popen.kill()  # no goodbye: its entries stay until they expire
            node_b.popen.wait(WAIT)
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        # presence_ttl is 2 s; waited for as an event (a loaded machine is slow), not timed
        async with asyncio.timeout(SLOW_WAIT):
            while (await api(on_a, "presence", channel=channel))["presence"]:
                await asyncio.sleep(0.1)
        result = await api(on_a, "publish", channel=channel, data="still here")
        assert result["offset"] >= 1
        assert node_a.health() == 200


# -- tidings serve --workers 2 ---------------------------------------------------------------


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with namespace(ENGINES["redis"]) as url:
        yield url


async def test_two_workers_on_redis_share_subscribers_and_deliver_everything(
    tmp_path: Path, redis_url: str, config: Path, procs: list[Proc]
) -> None:
    (server,) = await start_nodes(
        tmp_path, redis_url, config, procs, "workers", args=("--workers", "2")
    )
    # both workers listen before anyone connects, or the first would get every connection
    await asyncio.to_thread(
        server.wait_until,
        lambda: len(re.findall(r"worker \d+ \(pid \d+\) serves", server.output())) == 2,
        "both workers serving",
        SLOW_WAIT,
    )
    channel = "spread"
    subs: list[Sub] = list(await asyncio.gather(*(RawSub.open(server, channel) for _ in range(50))))
    try:
        # each request on a new connection: the kernel spreads them over the workers as it
        # spreads the subscribers, so both workers answer `info` sooner or later
        counts: dict[str, int] = {}
        async with asyncio.timeout(SLOW_WAIT):
            while len(counts) < 2 or sum(counts.values()) != 50:
                async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
                    node = (await api(http, "info"))["nodes"][0]
                counts[node["uid"]] = node["num_clients"]
        assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
            await probe_until_subscribed(http, channel, subs)
            for i in range(COUNT):
                await api(http, "publish", channel=channel, data=f"m{i}")
        expected = [f"m{i}" for i in range(COUNT)]
        await until(subs, lambda s: len([d for d in s.data() if d != "probe"]) >= COUNT)
        for sub in subs:
            assert [d for d in sub.data() if d != "probe"] == expected
    finally:
        await asyncio.gather(*(sub.close() for sub in subs), return_exceptions=True)
