"""What only the NATS engine has: subject tokens, offsets under contention, trimming in
JetStream, and failures (a dropped link, a restarted server, lost storage, a killed node).

Failure tests run their own ``nats-server -js`` on a free port (never the shared one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import Settings
from tidings.brokers import (
    BrokerUnavailable,
    ClientInfo,
    HistoryOptions,
    StreamPosition,
    create_broker,
)
from tidings.brokers import nats as nats_engine
from tidings.brokers.nats import NatsBroker, channel_token, token_channel
from tidings.hub import Hub
from tidings.session import Session

from .cfutil import Raw
from .conftest import IN_CI, Serve, free_port
from .engines import ENGINES, NATS_URL, WAIT, Cluster, Recorder, namespace, until, with_prefix
from .proxy import Proxy
from .test_broker_contract import KEEP, sentinel
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with namespace(ENGINES["nats"]) as url:
        nodes = Cluster(url)
        try:
            yield nodes
        finally:
            await nodes.close()



# -- names -------------------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_channel_tokens_are_one_safe_subject_token_and_reversible(name: str) -> None:
    token = channel_token(name)
    assert token and all(c.isascii() and (c.isalnum() or c in "_-=") for c in token)
    assert token_channel(token) == name


def test_channel_tokens_of_subject_syntax() -> None:
    assert channel_token("chat:room.1") == "chat=3Aroom=2E1"
    assert {channel_token(n) for n in ("a.b", "a", "a.*", "a.>", "a b", "$JS", "a=2Eb", "")} == {
        "a=2Eb",
        "a",
        "a=2E=2A",
        "a=2E=3E",
        "a=20b",
        "=24JS",
        "a=3D2Eb",
        "=",
    }
    for bad in ("a.b", "=2", "=zz", "é"):
        with pytest.raises(ValueError):
            token_channel(bad)


async def test_channels_with_subject_characters_stay_apart(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    names = ["a", "a.b", "a.*", "a.>", "a b", "$JS.API", ">", "*", "é"]
    for name in names:
        await b.subscribe(name)
    for i, name in enumerate(names):
        assert await a.publish(name, b"%d" % i, KEEP) == StreamPosition(
            1, (await a.history(name, limit=0)).position.epoch
        )
    await got.until(lambda: len(got.publications()) >= len(names))
    await sentinel(a, b, got)
    for i, name in enumerate(names):
        assert [p.data for p in got.publications(name)] == [b"%d" % i]
        assert [p.data for p in (await a.history(name)).publications] == [b"%d" % i]


def test_url_options() -> None:
    default = create_broker("nats://127.0.0.1:4222")
    tuned = create_broker(
        "nats://u:p@127.0.0.1:4333?prefix=app_1&timeout=2.5&max_age=60"
        "&presence_max_age=30&replicas=3&storage=memory"
    )
    assert isinstance(default, NatsBroker) and isinstance(tuned, NatsBroker)
    assert (default.prefix, default.timeout, default.max_age) == ("tidings", 5.0, 604800.0)
    assert (default.stream, default.presence_stream) == ("tidings-channels", "KV_tidings-presence")
    assert (tuned.prefix, tuned.timeout, tuned.max_age, tuned.presence_max_age) == (
        "app_1",
        2.5,
        60.0,
        30.0,
    )
    assert tuned.replicas == 3 and tuned.storage.value == "memory"
    assert tuned.server == "nats://u:p@127.0.0.1:4333"
    pinging = create_broker(f"{NATS_URL}?ping_interval=0.5")
    assert isinstance(pinging, NatsBroker)
    assert (default.ping_interval, pinging.ping_interval) == (10.0, 0.5)
    assert with_prefix("nats://h:1", "p") == "nats://h:1?prefix=p"
    for bad in (
        "timeout=soon",
        "ping_interval=0",
        "max_age=0",
        "replicas=-1",
        "storage=disk",
        "prefix=a.b",
        "x=1",
    ):
        with pytest.raises(ValueError, match=bad.partition("=")[0]):
            create_broker(f"nats://127.0.0.1?{bad}")


# -- offsets and storage -----------------------------------------------------------------------


async def test_nodes_publishing_at_once_get_consecutive_offsets_delivered_in_order(
    cluster: Cluster,
) -> None:
    """Three nodes race on one channel: every offset is used once, none skipped, and a
    subscribed node receives them in offset order."""
    nodes = [(await cluster.node())[0] for _ in range(3)]
    watcher, got = await cluster.node()
    await watcher.subscribe("race")

    async def burst(n: int) -> list[tuple[int, bytes]]:
        out = []
        for i in range(40):
            data = b'"%d-%d"' % (n, i)
            out.append(((await nodes[n].publish("race", data, KEEP)).offset, data))
        return out

    results = await asyncio.gather(*(burst(n) for n in range(3)))
    made = sorted(p for r in results for p in r)
    assert [offset for offset, _ in made] == list(range(1, 121))
    pubs = await got.wait_publications("race", 120)
    assert [(p.offset, p.data) for p in pubs] == made
    assert len({p.epoch for p in pubs}) == 1


async def stored_subjects(broker: NatsBroker, channel: str) -> int:
    """How many records JetStream holds for ``channel``."""
    nc = await nats.connect(NATS_URL)
    try:
        reply = await nc.request(
            f"$JS.API.STREAM.INFO.{broker.stream}",
            orjson.dumps({"subjects_filter": broker._stored(channel)}),
        )
        subjects = orjson.loads(reply.data)["state"].get("subjects") or {}
        return int(sum(subjects.values()))
    finally:
        await nc.close()


async def test_history_size_per_namespace_is_trimmed_in_jetstream(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    assert isinstance(a, NatsBroker)
    small, large = HistoryOptions(size=3, ttl=60), HistoryOptions(size=40, ttl=60)
    for i in range(64):
        await a.publish("small", b"%d" % i, small)
        await a.publish("large", b"%d" % i, large)
    assert [p.offset for p in (await a.history("small")).publications] == [62, 63, 64]
    assert [p.offset for p in (await a.history("large")).publications] == list(range(25, 65))
    await until(lambda: not a._purging)
    assert await stored_subjects(a, "small") <= 3 + 4 + 8
    assert await stored_subjects(a, "large") <= 40 + 4 + 20
    none = HistoryOptions(size=0, ttl=60)
    for _ in range(3):
        position = await a.publish("unkept", b"x", none)
    assert position.offset == 3
    assert (await a.history("unkept")).publications == []


async def test_history_reads_agree_whether_one_by_one_or_through_a_consumer(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short reads follow links with direct gets, long ones use a consumer: same answers,
    across an epoch change, a size change, meta records and expired publications."""
    a, _ = await cluster.node()
    brief = HistoryOptions(size=50, ttl=60, meta_ttl=0.3)
    await a.publish("both", b"old epoch", brief)
    await asyncio.sleep(0.5)
    assert (await a.history("both", meta_ttl=0.3)).position.offset == 0  # a new epoch
    for i in range(10):
        await a.publish("both", b"%d" % i, HistoryOptions(size=50, ttl=0.2))
    await asyncio.sleep(0.3)  # those ten expire
    for i in range(10, 40):
        await a.publish("both", b"%d" % i, HistoryOptions(size=25 if i > 30 else 50, ttl=60))
    await a.history("both", limit=0)
    epoch = (await a.history("both", limit=0)).position.epoch
    queries: list[dict[str, object]] = [
        {},
        {"limit": 3},
        {"limit": 30},
        {"reverse": True},
        {"reverse": True, "limit": 12},
        {"since": StreamPosition(20, epoch)},
        {"since": StreamPosition(20, epoch), "limit": 4},
        {"since": StreamPosition(35, epoch), "reverse": True},
        {"since": StreamPosition(2, epoch)},
    ]
    answers = {}
    for direct_reads in (10**6, 0):
        monkeypatch.setattr(nats_engine, "DIRECT_READS", direct_reads)
        answers[direct_reads] = [
            [(p.offset, p.data) for p in (await a.history("both", **q)).publications]  # type: ignore[arg-type]
            for q in queries
        ]
    assert answers[0] == answers[10**6]
    assert answers[0][0] == [(o, b"%d" % (o - 1)) for o in range(16, 41)]
    assert answers[0][4] == [(o, b"%d" % (o - 1)) for o in range(40, 28, -1)]


async def test_remove_history_purges_jetstream(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    assert isinstance(a, NatsBroker)
    for _ in range(5):
        position = await a.publish("gone", b"x", KEEP)
    await a.remove_history("gone")
    assert await stored_subjects(a, "gone") == 1  # the meta record: offset and epoch
    assert (await a.history("gone")).position == position


async def test_malformed_messages_are_skipped(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(b, NatsBroker)
    await b.subscribe("bad")
    nc = await nats.connect(NATS_URL)
    try:
        subject = b._live("bad")
        for junk in (b"", b"J\n{}", b"?", b"L\nnot json"):
            await nc.publish(subject, junk)
        await nc.publish(subject, b"x", headers={"Nats-Stream": "s", "Tidings-Kind": "P"})
        await nc.flush()
    finally:
        await nc.close()
    await a.publish("bad", b"good", KEEP)
    pubs = await got.wait_publications("bad", 1)
    assert [p.data for p in pubs] == [b"good"]
    assert got.events == pubs


async def test_prefixes_keep_deployments_apart(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    async with namespace(ENGINES["nats"]) as other_url:
        other = Cluster(other_url)
        try:
            x, seen_x = await other.node()
            await x.subscribe("same")
            await a.publish("same", b"1", KEEP)
            await x.publish("same", b"2", KEEP)
            assert (await x.history("same")).position.offset == 1
            await sentinel(x, x, seen_x)
            assert [p.data for p in seen_x.publications("same")] == [b"2"]
        finally:
            await other.close()


# -- a private server for failures -------------------------------------------------------------


async def _quiet(exc: Exception) -> None:
    """nats-py logs every refused attempt at ERROR without an error callback."""


class PrivateNats:
    """``nats-server -js`` on a free loopback port, storing in ``store``."""

    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, *, fresh_store: bool = False) -> None:
        if fresh_store:
            shutil.rmtree(self.store, ignore_errors=True)
        self.proc = await asyncio.create_subprocess_exec(
            NATS_SERVER,
            *("-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(WAIT):  # until JetStream answers
            while True:
                with contextlib.suppress(Exception):
                    nc = await nats.connect(
                        self.url,
                        allow_reconnect=False,
                        max_reconnect_attempts=1,  # one more attempt, not 60 every 2 s
                        reconnect_time_wait=0,
                        connect_timeout=1,
                        error_cb=_quiet,
                    )
                    try:
                        await nc.request("$JS.API.INFO", b"", timeout=1)
                        return
                    finally:
                        await nc.close()
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


@pytest.fixture
async def private(tmp_path: Path) -> AsyncIterator[PrivateNats]:
    if not os.access(NATS_SERVER, os.X_OK):
        message = f"{NATS_SERVER} not installed (apt-get install nats-server)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = PrivateNats(tmp_path / "jetstream")
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


async def test_a_hub_catches_up_what_was_published_while_its_link_was_down(
    private: PrivateNats, caplog: pytest.LogCaptureFixture
) -> None:
    """The node's connection is cut mid-stream and refused for a while; publications made
    meanwhile reach its subscriber after the reconnection, from JetStream, in order, once."""
    proxy = Proxy(private.port)
    port = await proxy.start()
    prefix = "cut"
    publisher = create_broker(f"{private.url}?prefix={prefix}")
    broker = create_broker(f"nats://127.0.0.1:{port}?prefix={prefix}")
    try:
        async with Hub(broker, Settings()) as hub:
            transport = FrameRecorder()
            session = Session(hub, transport, PassThrough())
            serving = asyncio.create_task(session.serve(ignore))
            await hub.subscribe(session, "feed", PassThrough())
            keep = HistoryOptions(size=100, ttl=60)
            await publisher.publish("feed", b"0", keep)
            await until(lambda: transport.frames == [b"0"])
            with caplog.at_level(logging.WARNING, logger="tidings.brokers.nats"):
                proxy.cut()
                await until(lambda: "connection to" in caplog.text)
                with pytest.raises(BrokerUnavailable):
                    await broker.ping()
                with pytest.raises(BrokerUnavailable):
                    await broker.publish("feed", b"lost?", keep)
                for i in range(1, 11):  # while the link is down: missed live, kept in JetStream
                    await publisher.publish("feed", b"%d" % i, keep)
                proxy.restore()
                await until(lambda: len(transport.frames) >= 11)
            assert "reconnected" in caplog.text
            for i in range(11, 15):
                await publisher.publish("feed", b"%d" % i, keep)
            await until(lambda: len(transport.frames) >= 15)
            assert transport.frames == [b"%d" % i for i in range(15)]
            assert hub.metrics.gaps_healed >= 1 and hub.metrics.gaps_lost == 0
            assert [p.offset for p in (await broker.history("feed")).publications] == list(
                range(1, 16)
            )
            transport.gone.set()
            await serving
    finally:
        await publisher.close()
        await proxy.stop()


async def test_a_silently_dead_link_is_noticed_and_replaced(
    private: PrivateNats, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = Proxy(private.port)
    port = await proxy.start()
    publisher = create_broker(f"{private.url}?prefix=quiet")
    listener = create_broker(f"nats://127.0.0.1:{port}?prefix=quiet&ping_interval=0.5")
    got = Recorder()
    try:
        await listener.start(got)
        await listener.subscribe("quiet")
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.nats"):
            proxy.swallow_existing()
            await until(lambda: "reconnected" in caplog.text)
        assert "lost; reconnecting" in caplog.text
        for i in range(10):
            await publisher.publish("quiet", b"%d" % i, KEEP)
        pubs = await got.wait_publications("quiet", 10)
        assert [p.data for p in pubs] == [b"%d" % i for i in range(10)]
    finally:
        await listener.close()
        await publisher.close()
        await proxy.stop()


async def test_server_restart_keeps_streams_and_outage_is_a_prompt_error(
    private: PrivateNats, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted server with its store: /health says 503 meanwhile, publishing fails at once,
    then the same epoch carries on and live delivery resumes."""
    url = f"{private.url}?prefix=rs"
    srv = await serve(broker_url=url)
    sub = await Raw.open(srv.ws)
    await sub.connect()
    first = await sub.subscribe("news", recoverable=True)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        answer = (await http.post("/api/publish", json={"channel": "news", "data": 1})).json()
        position = answer["result"]
        assert position["offset"] == 1 and position["epoch"] == first["epoch"]
        assert [p["data"] for p in await sub.publications("news", 1)] == [1]
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.nats"):
            await private.kill()
            await until(lambda: "lost; reconnecting" in caplog.text)
            health = await http.get("/health")
            assert health.status_code == 503 and health.json()["broker"]["ok"] is False
            async with asyncio.timeout(WAIT):  # an answer, not a hang
                r = await http.post("/api/publish", json={"channel": "news", "data": "x"})
            assert r.json()["error"]["code"] == 100
            await private.start()
            async with asyncio.timeout(WAIT):
                while (await http.get("/health")).status_code != 200:
                    await asyncio.sleep(0.05)
        r = await http.post("/api/publish", json={"channel": "news", "data": 2})
        assert r.json()["result"] == {"offset": 2, "epoch": first["epoch"]}
        assert [p["data"] for p in await sub.publications("news", 2)] == [1, 2]
    await sub.close()


async def test_lost_storage_starts_a_new_epoch_and_recovery_says_so(
    private: PrivateNats, serve: Serve
) -> None:
    """The server comes back without its JetStream store: streams are created again, the
    channel starts over with a new epoch, and a client recovering from the old position is
    told it was not recovered."""
    url = f"{private.url}?prefix=lost"
    srv = await serve(broker_url=url)
    hub = srv.hub
    old = [await hub.publish("news", i) for i in range(3)]
    await private.kill()
    await private.start(fresh_store=True)
    async with asyncio.timeout(WAIT):
        while True:
            with contextlib.suppress(BrokerUnavailable):
                await hub.broker.ping()
                break
            await asyncio.sleep(0.05)
    fresh = await hub.publish("news", "after")
    assert fresh.offset == 1 and fresh.epoch != old[-1].epoch
    client = await Raw.open(srv.ws)
    await client.connect()
    result = await client.subscribe(
        "news", recoverable=True, recover=True, offset=3, epoch=old[-1].epoch
    )
    # the protocol's JSON drops false fields, as Centrifugo's does: absent means false
    assert result["was_recovering"] is True and result.get("recovered", False) is False
    assert result["epoch"] == fresh.epoch and result["offset"] == 1
    assert result.get("publications", []) == []
    await client.close()


KILLED_NODE = """
import asyncio, sys
from tidings.brokers import ClientInfo, create_broker

async def main():
    broker = create_broker(sys.argv[1])
    await broker.add_presence("room", ClientInfo("doomed", "zed"), float(sys.argv[2]))
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_killed_node_presence_expires_within_its_ttl(cluster: Cluster) -> None:
    a, _ = await cluster.node()
    await a.add_presence("room", ClientInfo("alive", "amy"), 60)
    node = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_NODE,
        cluster.url,
        "1.0",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert node.stdout is not None
        async with asyncio.timeout(30):
            assert (await node.stdout.readline()).strip() == b"ready"
        assert set(await a.presence("room")) == {"alive", "doomed"}
        node.send_signal(signal.SIGKILL)
        await node.wait()
        async with asyncio.timeout(WAIT):
            while "doomed" in await a.presence("room"):
                await asyncio.sleep(0.1)
        assert set(await a.presence("room")) == {"alive"}
        assert (await a.publish("room", b"1", KEEP)).offset == 1  # the others keep serving
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()
