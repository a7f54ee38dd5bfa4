"""What only the PostgreSQL engine has: its listening connection lost and replaced, outages,
publications larger than a notification, the schema it creates and cleans, its URL options."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import websockets

from tidings import Settings
from tidings.brokers import (
    Broker,
    BrokerUnavailable,
    ClientInfo,
    HistoryOptions,
    JoinLeave,
    Publication,
    StreamPosition,
    create_broker,
)
from tidings.brokers.postgres import PostgresBroker
from tidings.hub import Hub
from tidings.session import Session

from .conftest import IN_CI, Serve, free_port
from .engines import ENGINES, POSTGRES_URL, WAIT, Cluster, Recorder, namespace, until
from .proxy import Proxy
from .test_broker_contract import KEEP, sentinel
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore
from .test_multinode import until_subscribed

MIB = 1024 * 1024


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with namespace(ENGINES["postgres"]) as url:
        nodes = Cluster(url)
        try:
            yield nodes
        finally:
            await nodes.close()


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        yield conn
    finally:
        await conn.close()



async def kill_listener(db: asyncpg.Connection, broker: PostgresBroker) -> None:
    """Terminate the node's listening connection on the server, found by application_name."""
    pids = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", broker.listener_name
    )
    assert len(pids) == 1
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pids[0]["pid"])


def prefix_of(url: str) -> str:
    return urlsplit(url).query.rpartition("prefix=")[2]


def large(n: int, size: int = MIB) -> bytes:
    """A JSON string of ``size`` bytes, different for each ``n``."""
    body = (b"%08d" % n) * ((size - 2) // 8)
    return b'"' + body + b" " * (size - 2 - len(body)) + b'"'


# -- the listening connection ----------------------------------------------------------------


async def test_delivery_resumes_after_the_listening_connection_is_killed(
    cluster: Cluster, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, PostgresBroker)
    await b.subscribe("live")
    with caplog.at_level(logging.WARNING, logger="tidings.brokers.postgres"):
        await kill_listener(db, b)
        await b.subscribe("late")  # asked while the connection is down or coming back
        async with asyncio.timeout(WAIT):  # published until one arrives: the link is back
            while not got.publications("late"):
                await a.publish("late", b"late", KEEP)
                await asyncio.sleep(0.05)
    assert "connection lost" in caplog.text and "reconnected" in caplog.text
    for i in range(20):
        await a.publish("live", b"%d" % i, KEEP)
    pubs = await got.wait_publications("live", 20)
    assert [p.data for p in pubs] == [b"%d" % i for i in range(20)]
    await a.publish_control(b"{}")
    await got.until(lambda: b"{}" in got.events)


async def test_a_hub_catches_up_what_was_published_while_its_link_was_down(
    cluster: Cluster, db: asyncpg.Connection
) -> None:
    """Publications made while a node's listening connection is down reach its subscribers
    after the reconnection, from history, in order and once each."""
    a, _ = await cluster.node()
    broker = create_broker(cluster.url)
    assert isinstance(broker, PostgresBroker)
    async with Hub(broker, Settings()) as hub:
        transport = FrameRecorder()
        session = Session(hub, transport, PassThrough())
        serving = asyncio.create_task(session.serve(ignore))
        await hub.subscribe(session, "feed", PassThrough())
        keep = HistoryOptions(size=100, ttl=60)
        await a.publish("feed", b"0", keep)
        await until(lambda: transport.frames == [b"0"])
        await kill_listener(db, broker)
        for i in range(1, 11):  # while the link is down or coming back
            await a.publish("feed", b"%d" % i, keep)
        # nothing published after them: only the resync after the reconnection brings them
        await until(lambda: len(transport.frames) >= 11)
        for i in range(11, 15):
            await a.publish("feed", b"%d" % i, keep)
        await until(lambda: len(transport.frames) >= 15)
        assert transport.frames == [b"%d" % i for i in range(15)]
        assert hub.metrics.gaps_lost == 0
        transport.gone.set()
        await serving


def via(url: str, port: int, **options: Any) -> str:
    """``url`` pointed at a proxy on ``port``, with more URL options."""
    parts = urlsplit(url)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    query = "&".join([parts.query, *(f"{k}={v}" for k, v in options.items())]).strip("&")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


async def frames(ws: websockets.ClientConnection, n: int) -> list[str]:
    """The next ``n`` frames, skipping probes left over from until_subscribed."""
    got: list[str] = []
    async with asyncio.timeout(WAIT):
        while len(got) < n:
            frame = await ws.recv()
            if frame != "probe":
                got.append(str(frame))
    return got


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[Proxy, int]]:
    target = urlsplit(POSTGRES_URL)
    p = Proxy((target.hostname or "127.0.0.1", target.port or 5432))
    port = await p.start()
    try:
        yield p, port
    finally:
        await p.stop()


async def test_an_outage_shows_in_health_fails_publishes_and_heals_after(
    serve: Serve,
    cluster: Cluster,
    proxy: tuple[Proxy, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server loses PostgreSQL: /health says 503, publishing answers a retryable error
    (code 100) without hanging, and once the server is back a subscriber gets, in order, what
    another node published meanwhile."""
    cut, port = proxy
    a, _ = await cluster.node()  # another node, still connected, publishing meanwhile
    url = via(cluster.url, port, ping_interval=0.5, connect_timeout=2, command_timeout=2)
    srv = await serve(broker_url=url)
    async with (
        httpx.AsyncClient(base_url=srv.url) as http,
        websockets.connect(f"{srv.ws}/ws/feed") as ws,
    ):
        await until_subscribed(ws, http, "feed")
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.postgres"):
            cut.cut()
            async with asyncio.timeout(WAIT):
                while (await http.get("/health")).status_code != 503:
                    await asyncio.sleep(0.05)
                r = await http.post("/api/publish", json={"channel": "feed", "data": "x"})
            assert r.json()["error"]["code"] == 100, r.text
            for i in range(10):
                await a.publish("feed", b'"%d"' % i, KEEP)
            cut.restore()
            # nothing published after those: the resync after the reconnection brings them
            got = await frames(ws, 10)
            async with asyncio.timeout(WAIT):
                while (await http.get("/health")).status_code != 200:
                    await asyncio.sleep(0.05)
            for i in range(10, 15):
                await a.publish("feed", b'"%d"' % i, KEEP)
            got += await frames(ws, 5)
        assert got == [str(i) for i in range(15)]
        assert "connection lost" in caplog.text and "reconnected" in caplog.text


async def test_publishing_into_a_black_hole_fails_within_command_timeout(
    cluster: Cluster, proxy: tuple[Proxy, int]
) -> None:
    hole, port = proxy
    broker = create_broker(
        via(cluster.url, port, command_timeout=0.5, ping_interval=0.5, connect_timeout=0.5)
    )
    try:
        await broker.start(Recorder())
        await broker.publish("c", b"1", KEEP)
        hole.black_hole = True
        hole.swallow_existing()
        async with asyncio.timeout(WAIT):  # never a hang, never a false success
            with pytest.raises(BrokerUnavailable):
                await broker.publish("c", b"2", KEEP)
            with pytest.raises(BrokerUnavailable):
                await broker.ping()
    finally:
        await broker.close()


async def test_a_silently_dead_listening_link_is_noticed_and_replaced(
    cluster: Cluster, proxy: tuple[Proxy, int], caplog: pytest.LogCaptureFixture
) -> None:
    hole, port = proxy
    a, _ = await cluster.node()
    broker = create_broker(via(cluster.url, port, ping_interval=0.2))
    got = Recorder()
    try:
        await broker.start(got)
        await broker.subscribe("quiet")
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.postgres"):
            hole.swallow_existing()
            # returns only once a round trip proved the (new) listening connection alive, so
            # one publication made after it is delivered
            await broker.subscribe("fresh")
            await a.publish("fresh", b"1", KEEP)
            await got.wait_publications("fresh", 1)
            async with asyncio.timeout(WAIT):
                while not got.publications("quiet"):
                    await a.publish("quiet", b"probe", KEEP)
                    await asyncio.sleep(0.05)
        assert "connection lost" in caplog.text and "reconnected" in caplog.text
        for i in range(10):
            await a.publish("quiet", b"%d" % i, KEEP)

        def numbered() -> list[Publication]:
            return [p for p in got.publications("quiet") if p.data != b"probe"]

        await got.until(lambda: len(numbered()) >= 10)
        assert [p.data for p in numbered()] == [b"%d" % i for i in range(10)]
    finally:
        await broker.close()


# -- larger than a notification ----------------------------------------------------------------


@pytest.mark.parametrize("size", [10, 0])
async def test_a_1_mib_publication_reaches_other_nodes_in_order(
    cluster: Cluster, db: asyncpg.Connection, size: int
) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(a, PostgresBroker)
    await b.subscribe("big")
    keep = HistoryOptions(size=size, ttl=60)
    sent = [b'"small 1"', large(1), b'"small 2"', large(2), b'{"bad utf-8": "\xff"}']
    positions = [await a.publish("big", data, keep) for data in sent]
    pubs = await got.wait_publications("big", len(sent))
    assert [p.data for p in pubs] == sent
    assert [p.offset for p in pubs] == [p.offset for p in positions] == [1, 2, 3, 4, 5]
    history = await a.history("big")
    assert [p.data for p in history.publications] == (sent if size else [])
    stored = await db.fetch(
        f'SELECT "offset", fetch_until IS NOT NULL AS by_ref '
        f'FROM "{a.prefix}".tidings_publications ORDER BY "offset"'
    )
    # without history only what could not be notified is stored, and only to be fetched
    assert [(r["offset"], r["by_ref"]) for r in stored] == (
        [(1, False), (2, True), (3, False), (4, True), (5, True)]
        if size
        else [(2, True), (4, True), (5, True)]
    )


async def test_concurrent_publishers_deliver_in_offset_order_as_history_has_it(
    cluster: Cluster,
) -> None:
    """Two nodes publish into one channel at once, large and small publications mixed: the
    row lock orders their commits, so every node gets offsets 1..N in order, and history holds
    exactly what was delivered."""
    a, _ = await cluster.node()
    b, _ = await cluster.node()
    c, got = await cluster.node()
    await c.subscribe("race")
    keep = HistoryOptions(size=1000, ttl=60)

    async def publisher(node: Broker, k: int) -> None:
        for i in range(25):
            data = large(k * 100 + i, 9_000) if i % 5 == 0 else b"%d" % (k * 100 + i)
            await node.publish("race", data, keep)

    await asyncio.gather(*(publisher((a, b)[k % 2], k) for k in range(16)))
    pubs = await got.wait_publications("race", 400)
    assert [p.offset for p in pubs] == list(range(1, 401))
    history = await a.history("race")
    assert [(p.offset, p.data) for p in history.publications] == [(p.offset, p.data) for p in pubs]


async def test_large_join_leave_and_control_messages_arrive(cluster: Cluster) -> None:
    a, seen_a = await cluster.node()
    b, got = await cluster.node()
    await b.subscribe("room")
    who = ClientInfo("c1", "bob", large(1, 20_000), None)
    await a.publish_join_leave(JoinLeave("room", who, join=True))
    await a.publish_control(large(2, 50_000))
    await got.until(lambda: len(got.events) >= 2)
    assert got.events == [JoinLeave("room", who, True), large(2, 50_000)]
    await seen_a.until(lambda: bool(seen_a.events))
    assert seen_a.events == [large(2, 50_000)]


async def test_a_large_publication_is_readable_until_fetch_ttl_then_cleaned(
    cluster: Cluster, db: asyncpg.Connection
) -> None:
    cluster.url += "&fetch_ttl=0.2"
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(a, PostgresBroker)
    await b.subscribe("big")
    await a.publish("big", large(1), HistoryOptions(size=0, ttl=0))
    await got.wait_publications("big", 1)
    table = f'"{a.prefix}".tidings_publications'
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 1
    async with asyncio.timeout(WAIT):  # until the fetch window passed and cleanup ran
        while await db.fetchval(f"SELECT count(*) FROM {table}"):
            assert await a.cleanup() >= 0
            await asyncio.sleep(0.05)


# -- schema, channels, cleanup -----------------------------------------------------------------


async def test_nodes_starting_together_create_the_schema_once(
    cluster: Cluster, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tidings.brokers.postgres"):
        nodes = await asyncio.gather(*(cluster.node() for _ in range(6)))
    assert "SET" not in caplog.text  # created as wanted: nothing rewritten
    broker = nodes[0][0]
    assert isinstance(broker, PostgresBroker)
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
        "ORDER BY table_name",
        broker.prefix,
    )
    assert [t["table_name"] for t in tables] == [
        "tidings_notes",
        "tidings_presence",
        "tidings_publications",
        "tidings_schema",
        "tidings_streams",
    ]
    assert await db.fetchval(f'SELECT count(*) FROM "{broker.prefix}".tidings_schema') == 1
    await broker.publish("x", b"1", KEEP)
    again, _ = await cluster.node()  # a node on an existing schema at this version
    assert (await again.history("x")).position.offset == 1


async def test_a_user_without_create_on_the_database_uses_a_schema_made_for_it(
    cluster: Cluster, db: asyncpg.Connection
) -> None:
    prefix = prefix_of(cluster.url)
    role = f"{prefix}_user"
    await db.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        await db.execute(f'CREATE SCHEMA "{prefix}" AUTHORIZATION "{role}"')  # as a DBA would
        parts = urlsplit(cluster.url)
        cluster.url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        a, _ = await cluster.node()
        b, got = await cluster.node()
        await b.subscribe("c")
        await a.publish("c", b"1", KEEP)
        assert [p.data for p in await got.wait_publications("c", 1)] == [b"1"]
        await cluster.close()
        cluster.brokers.clear()
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')
        await db.execute(f'DROP ROLE "{role}"')


async def test_channel_names_of_any_length_and_characters(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    names = ["x" * 300, "chat:ümlaut space \"quote\" 'q' \\ \n", "$private#a,b", "😀" * 40]
    for name in names:
        await b.subscribe(name)
    for name in names:
        await a.publish(name, name.encode(), KEEP)
        await a.publish(name, large(len(name), 10_000), KEEP)
    await got.until(lambda: len(got.publications()) >= 2 * len(names))
    assert [(p.channel, p.data) for p in got.publications()] == [
        pair for name in names for pair in ((name, name.encode()), (name, large(len(name), 10_000)))
    ]
    for name in names:
        assert (await a.history(name)).position.offset == 2


async def test_prefixes_keep_deployments_apart(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    async with namespace(ENGINES["postgres"]) as other_url:
        other = Cluster(other_url)
        try:
            x, seen_x = await other.node()
            await x.subscribe("same")
            await a.publish("same", b"1", KEEP)
            assert await x.publish("same", b"2", KEEP) == (await x.history("same")).position
            assert (await x.history("same")).position.offset == 1
            await sentinel(x, x, seen_x)
            assert [p.data for p in seen_x.publications("same")] == [b"2"]
        finally:
            await other.close()


async def test_cleanup_deletes_what_expired_and_keeps_the_rest(
    cluster: Cluster, db: asyncpg.Connection
) -> None:
    a, _ = await cluster.node()
    assert isinstance(a, PostgresBroker)
    brief = HistoryOptions(size=10, ttl=0.2, meta_ttl=0.2)
    await a.publish("brief", b"1", brief)
    await a.add_presence("brief", ClientInfo("gone"), 0.2)
    await a.publish_control(large(1, 10_000))  # a note
    kept = await a.publish("kept", b"1", KEEP)
    await a.add_presence("kept", ClientInfo("stays"), 60)
    s = f'"{a.prefix}"'

    async def counts() -> dict[str, int]:
        return {
            t: await db.fetchval(f"SELECT count(*) FROM {s}.tidings_{t}")
            for t in ("streams", "publications", "presence", "notes")
        }

    assert await counts() == {"streams": 2, "publications": 2, "presence": 2, "notes": 1}
    await asyncio.sleep(0.3)  # let the brief ones expire (fetch_ttl of the note: 60 s)
    assert await a.cleanup() == 3
    assert await counts() == {"streams": 1, "publications": 1, "presence": 1, "notes": 1}
    assert (await a.history("kept")).position == kept
    assert list(await a.presence("kept")) == ["stays"]


async def test_only_one_node_cleans_at_a_time(cluster: Cluster, db: asyncpg.Connection) -> None:
    a, _ = await cluster.node()
    assert isinstance(a, PostgresBroker)
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", a._cleanup_lock)
        assert await a.cleanup() == -1
    assert await a.cleanup() == 0


async def test_malformed_notifications_are_skipped(
    cluster: Cluster, db: asyncpg.Connection
) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, PostgresBroker)
    await b.subscribe("bad")
    for junk in ("", "Pnonsense", "P1 e {}\n1", "P1 e [1]\n1", "J{}", "R1 e [", "N99", "?"):
        await db.execute("SELECT pg_notify($1, $2)", b.notify_channel, junk)
    await a.publish("bad", b"good", KEEP)
    pubs = await got.wait_publications("bad", 1)
    assert [p.data for p in pubs] == [b"good"]
    assert got.events == pubs


# -- presence of a node that dies ----------------------------------------------------------------


async def test_presence_of_a_tidings_serve_killed_with_sigkill_expires(cluster: Cluster) -> None:
    """A real `tidings serve` node keeps its subscriber's presence alive (refreshing it every
    third of presence_ttl); killed with SIGKILL, nobody removes it, and it expires."""
    a, _ = await cluster.node()
    ttl = 1.5
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env |= {
        "TIDINGS_BROKER_URL": cluster.url,
        "TIDINGS_DEFAULTS__PRESENCE": "true",
        "TIDINGS_DEFAULTS__PRESENCE_TTL": str(ttl),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
        async with websockets.connect(f"ws://127.0.0.1:{port}/connection/websocket") as ws:
            await ws.send('{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"room"}}')
            async with asyncio.timeout(WAIT):
                replies = ""
                while '"id":2' not in replies:
                    replies += str(await ws.recv())
            assert '"error"' not in replies, replies
            [client] = list(await a.presence("room"))
            await asyncio.sleep(2 * ttl)  # outlives its ttl while the node refreshes it
            assert list(await a.presence("room")) == [client]
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            async with asyncio.timeout(WAIT):  # nobody refreshes it any more: it expires
                while await a.presence("room"):
                    await asyncio.sleep(0.1)
        assert (await a.publish("room", b"1", KEEP)).offset == 1  # the others keep serving
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- URL options -------------------------------------------------------------------------------


def test_url_options_are_ours_and_the_rest_go_to_asyncpg() -> None:
    default = create_broker("postgresql://u@127.0.0.1/db")
    tuned = create_broker(
        "postgres://u:p@db.example:6543/app?prefix=app1&pool_size=3&connect_timeout=1.5"
        "&command_timeout=4&subscribe_timeout=3&ping_interval=2&cleanup_interval=30"
        "&fetch_ttl=120&sslmode=disable"
    )
    assert isinstance(default, PostgresBroker) and isinstance(tuned, PostgresBroker)
    assert (default.prefix, default.notify_channel, default.pool_size) == (
        "tidings",
        "tidings.tidings",
        5,
    )
    assert tuned.prefix == "app1" and tuned.notify_channel == "tidings.app1"
    assert tuned._dsn == "postgres://u:p@db.example:6543/app?sslmode=disable"
    assert (
        tuned.pool_size,
        tuned.connect_timeout,
        tuned.command_timeout,
        tuned.subscribe_timeout,
        tuned.ping_interval,
        tuned.cleanup_interval,
        tuned.fetch_ttl,
    ) == (3, 1.5, 4.0, 3.0, 2.0, 30.0, 120.0)
    assert tuned.listener_name.startswith("tidings-app1-") and len(tuned.listener_name) < 64
    long = create_broker("postgresql://h/db?prefix=" + "p" * 60)
    assert isinstance(long, PostgresBroker) and len(long.notify_channel.encode()) <= 63
    for bad in (
        "pool_size=0",
        "command_timeout=soon",
        "ping_interval=-1",
        "prefix=" + "p" * 64,
        "prefix=pg_x",
    ):
        with pytest.raises(ValueError, match=bad.partition("=")[0]):
            create_broker(f"postgresql://h/db?{bad}")


async def test_unlogged_switches_the_durable_tables(
    cluster: Cluster, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    base = cluster.url
    cluster.url = base + "&unlogged=true"
    with caplog.at_level(logging.WARNING, logger="tidings.brokers.postgres"):
        fast, _ = await cluster.node()
    assert "SET" not in caplog.text  # created UNLOGGED, not altered
    assert isinstance(fast, PostgresBroker) and fast.unlogged
    kinds = (
        "SELECT relname::text, relpersistence::text FROM pg_class "
        "WHERE relnamespace = $1::regnamespace AND relkind = 'r' ORDER BY relname"
    )
    assert dict(await db.fetch(kinds, fast.prefix)) == {
        "tidings_notes": "u",
        "tidings_presence": "u",
        "tidings_publications": "u",
        "tidings_schema": "p",
        "tidings_streams": "u",
    }
    position = await fast.publish("u", b"1", KEEP)
    cluster.url = base
    durable, _ = await cluster.node()
    assert dict(await db.fetch(kinds, fast.prefix))["tidings_streams"] == "p"
    assert [p.data for p in (await durable.history("u")).publications] == [b"1"]
    assert (await durable.history("u")).position == position


async def test_position_survives_a_new_node(cluster: Cluster) -> None:
    """The stream lives in the database, not in a node: a node started later continues it."""
    a, _ = await cluster.node()
    first = await a.publish("durable", b"1", KEEP)
    await a.close()
    b, _ = await cluster.node()
    assert await b.publish("durable", b"2", KEEP) == StreamPosition(2, first.epoch)


# -- a private PostgreSQL server, restarted --------------------------------------------------------


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if found:
        return found[-1].parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


class PrivateServer:
    """A PostgreSQL server of this test's own, in a temporary directory, on a free port, that
    the test may restart or crash (never the shared one)."""

    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # initdb refuses to run as root: run the server as the postgres user then
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.prefix:
            shutil.chown(root, "postgres")

    async def _run(self, *args: str) -> None:
        # output to a file, not a pipe: the server pg_ctl starts would hold a pipe open
        with tempfile.TemporaryFile() as out:
            proc = await asyncio.create_subprocess_exec(*self.prefix, *args, stdout=out, stderr=out)
            async with asyncio.timeout(60):
                await proc.wait()
            out.seek(0)
            assert proc.returncode == 0, out.read().decode(errors="replace")

    async def init(self) -> None:
        await self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip

    async def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data} -c fsync=off"
        await self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
            str(self.data / "log"), "start",
        )  # fmt: skip

    async def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: a crash (recovery at the next start)."""
        await self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "stop")


@pytest.fixture
async def private() -> AsyncIterator[PrivateServer]:
    bindir = _bindir()
    if bindir is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        message = "PostgreSQL server binaries (pg_ctl, initdb) not found"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # not under pytest's tmp_path: its parents are private to root, the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="tidings-pg-"))
    try:
        server = PrivateServer(bindir, root)
        await server.init()
        await server.start()
        try:
            yield server
        finally:
            with contextlib.suppress(AssertionError):
                await server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def publish_until_it_works(broker: Broker, channel: str, data: bytes) -> StreamPosition:
    """Publishing while the server is away fails (BrokerUnavailable); retried until it is back."""
    async with asyncio.timeout(WAIT):
        while True:
            try:
                return await broker.publish(channel, data, KEEP)
            except BrokerUnavailable:
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_a_server_restart_keeps_offsets_epoch_and_history(
    private: PrivateServer, mode: str
) -> None:
    """WAL-logged tables survive a restart, clean or after a crash: the epoch stays, offsets go
    on, history is whole, and the nodes' listening connections come back by themselves."""
    nodes = Cluster(private.url + "?prefix=restart&connect_timeout=2")
    try:
        a, _ = await nodes.node()
        b, got = await nodes.node()
        await b.subscribe("feed")
        before = [await a.publish("feed", b"%d" % i, KEEP) for i in range(3)]
        await got.wait_publications("feed", 3)
        await private.stop(mode)
        with pytest.raises(BrokerUnavailable):
            await a.publish("feed", b"lost", KEEP)
        await private.start()
        after = await publish_until_it_works(a, "feed", b"3")
        assert after == StreamPosition(4, before[0].epoch)
        history = await b.history("feed")
        assert [p.data for p in history.publications] == [b"0", b"1", b"2", b"3"]
        async with asyncio.timeout(WAIT):  # b's listener is back: live delivery resumes
            while not [p for p in got.publications("feed") if p.offset > 4]:
                await a.publish("feed", b"more", KEEP)
                await asyncio.sleep(0.05)
    finally:
        await nodes.close()


async def test_a_crash_empties_unlogged_tables_and_streams_start_a_new_epoch(
    private: PrivateServer,
) -> None:
    nodes = Cluster(private.url + "?prefix=crash&unlogged=true&connect_timeout=2")
    try:
        a, _ = await nodes.node()
        old = [await a.publish("feed", b"%d" % i, KEEP) for i in range(3)][-1]
        await private.stop("immediate")
        await private.start()
        new = await publish_until_it_works(a, "feed", b"after")
        assert new.offset == 1 and new.epoch != old.epoch  # recovering clients are told
        # a client recovering from the old position sees the epoch changed: recovered false
        assert (await a.history("feed", since=old)).position == new
        assert [p.data for p in (await a.history("feed")).publications] == [b"after"]
    finally:
        await nodes.close()
