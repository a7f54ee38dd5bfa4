"""What only the Kafka engine has: a server that goes away and comes back (with or without its
log), presence from a second engine, its URL options.

Tests that break the server start their own Tansu (and a TCP proxy in front of it when the
server must stay up while the link dies); the rest use the session's (see tests/engines.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tidings import Settings
from tidings.brokers import (
    BrokerUnavailable,
    ClientInfo,
    HistoryOptions,
    StreamPosition,
    create_broker,
)
from tidings.brokers._aiokafka import fetching_ended, sending_ended
from tidings.brokers.kafka import KafkaBroker
from tidings.errors import LimitExceeded, NotAvailable
from tidings.hub import Hub
from tidings.session import Session

from .conftest import IN_CI, Serve, free_port
from .engines import ENGINES, REDIS_URL, WAIT, Cluster, Recorder, Tansu, namespace, until
from .proxy import Proxy
from .test_broker_contract import KEEP
from .test_hub import CountingEncoder as PassThrough
from .test_hub import Recorder as FrameRecorder
from .test_hub import _ignore as ignore

KEPT = HistoryOptions(size=100, ttl=60)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with namespace(ENGINES["kafka"]) as url:
        nodes = Cluster(url)
        try:
            yield nodes
        finally:
            await nodes.close()


@pytest.fixture
def tansu() -> Iterator[Tansu]:
    """A private Tansu this test may kill and restart."""
    server = Tansu()
    try:
        server.start()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"tansu did not start: {exc!r}")
        pytest.skip(f"tansu did not start: {exc!r}")
    try:
        yield server
    finally:
        server.kill()



@pytest.fixture
async def proxied() -> AsyncIterator[tuple[Tansu, Proxy]]:
    """A private Tansu that advertises a proxy's port, so every client connects through it."""
    proxy_port = free_port()
    server = Tansu()
    listen = f"tcp://127.0.0.1:{server.port}"
    advertised = f"tcp://127.0.0.1:{proxy_port}"
    try:
        server.start(advertised=advertised)
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"tansu did not start on {listen}: {exc!r}")
        pytest.skip(f"tansu did not start: {exc!r}")
    proxy = Proxy(server.port, port=proxy_port)
    await proxy.start()
    try:
        yield server, proxy
    finally:
        await proxy.stop()
        server.kill()


def _url(port: int, prefix: str = "tidings", **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"prefix": prefix, **options}.items())
    return f"kafka://127.0.0.1:{port}?{query}"


async def test_a_dropped_link_resumes_where_it_stopped_and_loses_nothing(
    proxied: tuple[Tansu, Proxy], caplog: pytest.LogCaptureFixture
) -> None:
    """The link to the server dies (the server keeps its log): publishing fails fast with
    BrokerUnavailable, ping fails, the outage is logged; when the link is back the node reads on
    from where it stopped, so a subscriber gets every confirmed publication once, in order, in
    one epoch."""
    _, proxy = proxied
    url = _url(proxy.port, timeout="1", check_interval="0.1")
    broker = create_broker(url)
    assert isinstance(broker, KafkaBroker)
    publisher = create_broker(url)
    publisher_events = Recorder()
    await publisher.start(publisher_events)
    confirmed: list[StreamPosition] = []
    try:
        async with Hub(broker, Settings()) as hub:
            transport = FrameRecorder()
            session = Session(hub, transport, PassThrough())
            serving = asyncio.create_task(session.serve(ignore))
            await hub.subscribe(session, "feed", PassThrough())
            for i in range(5):
                confirmed.append(await publisher.publish("feed", b"%d" % i, KEPT))
            await until(lambda: len(transport.frames) == 5)

            with caplog.at_level(logging.WARNING, logger="tidings.brokers.kafka"):
                await proxy.stop()  # the port refuses connections
                # refused with an error, never a hang (the bound only turns a hang into a failure)
                with pytest.raises(BrokerUnavailable):
                    async with asyncio.timeout(WAIT):
                        await publisher.publish("feed", b"lost?", KEPT)
                async with asyncio.timeout(WAIT):
                    while True:
                        try:
                            await broker.ping()
                        except BrokerUnavailable:
                            break
                        await asyncio.sleep(0.05)
                # ping() may fail on its own request before the engine's watcher has noticed
                # and said so: wait for the watcher's line, not for ping alone
                await until(lambda: "kafka unreachable" in caplog.text)
                await proxy.start()
                async with asyncio.timeout(WAIT):
                    while True:
                        try:
                            await broker.ping()
                            break
                        except BrokerUnavailable:
                            await asyncio.sleep(0.05)
                assert "reachable again" in caplog.text
                await publisher_events.until(lambda: publisher_events.resyncs > 0)
            # aiokafka logs each reconnection attempt; the engine lets each line through once
            noise = [(r.name, r.msg) for r in caplog.records if r.name.startswith("aiokafka")]
            assert len(noise) == len(set(noise))
            for i in range(5, 15):
                async with asyncio.timeout(WAIT):
                    while True:
                        try:
                            confirmed.append(await publisher.publish("feed", b"%d" % i, KEPT))
                            break
                        except BrokerUnavailable:
                            await asyncio.sleep(0.05)
            datas = [b"%d" % i for i in range(15)]
            # the publish that failed during the outage may or may not have been written: if it
            # was, it is delivered too, at its place
            await until(lambda: [f for f in transport.frames if f != b"lost?"] == datas)
            positions = [p.offset for p in confirmed]
            assert len({p.epoch for p in confirmed}) == 1
            assert positions == sorted(positions) and len(set(positions)) == 15
            assert hub.metrics.gaps_lost == 0
            transport.gone.set()
            await serving
    finally:
        await publisher.close()


async def test_a_server_restart_that_loses_the_log_starts_new_epochs_and_says_so(
    tansu: Tansu, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu keeps its log in memory: killed and restarted, it has lost every record. The node
    notices, logs it, and every stream starts a new epoch, so a client recovering from its old
    position is told it was not recovered; live delivery resumes in the new epoch.

    Publishing goes on through the restart, so Tansu may also be left with a partition it
    cannot read (see test_an_unreadable_partition_is_repaired...): with repair=1 the nodes
    then start the topic once more, which is one more new epoch."""
    url = _url(tansu.port, check_interval="0.1", timeout="2", repair="1")
    broker = create_broker(url)
    publisher = create_broker(url)
    await publisher.start(Recorder())
    try:
        async with Hub(broker, Settings()) as hub:
            transport = FrameRecorder()
            session = Session(hub, transport, PassThrough())
            serving = asyncio.create_task(session.serve(ignore))
            await hub.subscribe(session, "feed", PassThrough())
            before = [await publisher.publish("feed", b"%d" % i, KEPT) for i in range(5)]
            await until(lambda: len(transport.frames) == 5)

            with caplog.at_level(logging.ERROR, logger="tidings.brokers.kafka"):
                tansu.kill()
                tansu.start()
                after: list[StreamPosition] = []
                async with asyncio.timeout(3 * WAIT):
                    while len(after) < 5:
                        try:
                            data = b"%d" % (5 + len(after))
                            after.append(await publisher.publish("feed", data, KEPT))
                        except BrokerUnavailable:
                            await asyncio.sleep(0.05)
                await until(lambda: "was lost" in caplog.text)
            assert before[0].epoch not in {p.epoch for p in after}
            for one, two in itertools.pairwise(after):  # 1, 2, 3... within each new epoch
                assert two.offset == (one.offset + 1 if two.epoch == one.epoch else 1)
            # the subscriber is told its stream was lost (closed 3010: a session without a
            # protocol listener), never sent the new epoch's publications after the old one's
            await until(lambda: transport.closed is not None)
            assert transport.closed == (3010, "insufficient state")
            assert transport.frames == [b"%d" % i for i in range(5)]

            # a client that was at offset 5 of the old epoch: the position says it cannot be
            # made whole (connection.is_recovered compares epochs), on either node
            for node in (broker, publisher):
                async with asyncio.timeout(3 * WAIT):
                    while True:
                        try:
                            recovering = await node.history("feed", since=before[-1])
                            break
                        except BrokerUnavailable:
                            await asyncio.sleep(0.05)
                assert recovering.position.epoch != before[-1].epoch
            transport.gone.set()
            await serving
    finally:
        await publisher.close()


async def test_a_stale_client_writing_right_after_a_restart_does_not_wedge_the_node(
    tansu: Tansu, caplog: pytest.LogCaptureFixture
) -> None:
    """Tansu 0.6 acknowledges a record sent, right after a restart, by a client that still
    believes in the topic; it creates the topic anew (with its default partition count), and
    depending on timing that record can never be read and its partition takes no other. The
    node follows the new partition layout; a partition it cannot read it reports, and with
    repair=1 it deletes the topic and creates it again. Either way publishing works again."""
    from aiokafka import AIOKafkaProducer

    url = _url(tansu.port, check_interval="0.3", timeout="1", repair="1")
    node = create_broker(url)
    await node.start(Recorder())
    stale = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{tansu.port}")
    await stale.start()
    try:
        old = await node.publish("c", b"1", KEEP)
        await stale.send_and_wait("tidings", b"x", key=b"c", partition=0)  # knows the topic
        with caplog.at_level(logging.WARNING, logger="tidings.brokers.kafka"):
            tansu.kill()
            tansu.start()
            await stale.send_and_wait("tidings", b"x", key=b"c", partition=0)
            # noticed within check_interval (a publication confirmed before that is counted
            # in the old epoch, and counted again in the new one)
            async with asyncio.timeout(3 * WAIT):
                while "was lost" not in caplog.text:
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(3 * WAIT):
                while True:
                    try:
                        position = await node.publish("c", b"2", KEEP)
                        history = await node.history("c")
                        break
                    except BrokerUnavailable:
                        await asyncio.sleep(0.05)
        assert position.epoch != old.epoch
        assert history.position == position
        assert [p.offset for p in history.publications] == list(range(1, position.offset + 1))
        assert history.publications[-1].data == b"2"
        if "nothing can be read" in caplog.text:
            assert "deleting kafka topic tidings" in caplog.text
    finally:
        await stale.stop()
        await node.close()


@pytest.mark.parametrize("client", ["reader", "producer"])
async def test_a_client_whose_background_task_died_is_replaced_and_work_goes_on(
    tansu: Tansu, caplog: pytest.LogCaptureFixture, client: str
) -> None:
    """aiokafka (0.14) fetches in one background task per consumer and sends in one per
    producer. An unexpected error there ends it for good (seen after a Tansu restart under
    uvloop: a RuntimeError writing to a connection the server had just closed, logged as
    "Unexpected error in fetcher routine"), and from then on the client does nothing, silently.
    The node replaces such a client and reads on from where it stopped: nothing lost, the same
    epoch, publishing works again."""
    url = _url(tansu.port, check_interval="0.1", timeout="1")
    node = create_broker(url)
    assert isinstance(node, KafkaBroker)
    events = Recorder()
    await node.start(events)
    try:
        await node.subscribe("c")
        first = await node.publish("c", b"1", KEEP)

        async def closed_transport(*args: object, **kwargs: object) -> bool:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        with caplog.at_level(logging.WARNING):
            if client == "reader":
                dead: object = node._consumer
                assert node._consumer is not None
                fetcher = node._consumer._fetcher
                assert not fetching_ended(dead)
                fetcher._proc_fetch_request = closed_transport  # the next fetch fails so
                await until(lambda: fetching_ended(dead))  # brokers/_aiokafka.py's assumption
                assert "Unexpected error in fetcher routine" in caplog.text
                expected = "kafka clients replaced: the reader's client stopped fetching"
            else:
                dead = node._producer
                assert node._producer is not None
                sender = node._producer._sender
                assert not sending_ended(dead)
                sender._send_produce_req = closed_transport  # the next send fails so
                with pytest.raises(BrokerUnavailable):
                    await node.publish("c", b"lost", KEEP)
                assert sending_ended(dead)  # brokers/_aiokafka.py's assumption
                expected = "kafka clients replaced: the producer stopped sending"
            await until(
                lambda: (
                    node._consumer is not dead
                    and node._producer is not dead
                    and node._reader is not None
                )
            )
        assert expected in caplog.text
        second = await node.publish("c", b"2", KEEP)
        assert second == StreamPosition(2, first.epoch)
        pubs = await events.wait_publications("c", 2)
        assert [(p.data, p.offset) for p in pubs] == [(b"1", 1), (b"2", 2)]
    finally:
        await node.close()


async def test_publishing_while_the_server_is_down_fails_promptly_and_health_says_so(
    serve: Serve, tansu: Tansu
) -> None:
    srv = await serve(
        broker_url=_url(tansu.port, timeout="1", check_interval="0.1") + f"&presence={REDIS_URL}"
    )
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        r = await http.post("/api/publish", json={"channel": "news", "data": 1})
        assert r.json()["result"]["offset"] == 1
        epoch = r.json()["result"]["epoch"]
        assert (await http.get("/health")).status_code == 200
        tansu.kill()
        r = await http.post("/api/publish", json={"channel": "news", "data": 2})
        assert r.json()["error"]["code"] == 100, r.text
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["broker"]["ok"] is False
        tansu.start()
        async with asyncio.timeout(WAIT):
            while (await http.get("/health")).status_code != 200:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(WAIT):
            while (
                "result"
                not in (
                    r := await http.post("/api/publish", json={"channel": "news", "data": 3})
                ).json()
            ):
                await asyncio.sleep(0.05)
        # the restarted Tansu lost the old stream; the publication that failed may have been
        # written after all (the client library retries it), never the reverse
        assert r.json()["result"]["epoch"] != epoch


async def test_a_record_too_large_for_the_server_is_a_limit_not_an_outage(
    cluster: Cluster,
) -> None:
    a, _ = await cluster.node()
    with pytest.raises(LimitExceeded, match="larger than the kafka broker takes"):
        await a.publish("big", b"x" * (2 << 20), KEEP)
    assert (await a.publish("big", b"x" * (256 << 10), KEEP)).offset == 1
    await a.ping()


async def test_presence_without_a_second_engine_fails_loudly(
    tansu: Tansu, caplog: pytest.LogCaptureFixture
) -> None:
    broker = create_broker(_url(tansu.port))
    with caplog.at_level(logging.WARNING, logger="tidings.brokers.kafka"):
        await broker.start(Recorder())
    try:
        assert "presence=redis://" in caplog.text
        for call in (
            broker.add_presence("c", ClientInfo("x"), 10),
            broker.presence("c"),
            broker.remove_presence("c", "x"),
        ):
            with pytest.raises(NotAvailable, match=r"\?presence=redis://"):
                await call
        # everything else works without one
        assert (await broker.publish("c", b"1", KEEP)).offset == 1
    finally:
        await broker.close()


async def test_presence_comes_from_the_second_engine_under_the_same_prefix(
    cluster: Cluster,
) -> None:
    from redis.asyncio import Redis

    a, _ = await cluster.node()
    assert isinstance(a, KafkaBroker)
    await a.add_presence("room", ClientInfo("c1", "u1"), 60)
    client = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"{a.prefix}:*")]
        assert keys and all(k.decode().startswith(f"{a.prefix}:pres") for k in keys)
    finally:
        await client.aclose()


async def test_a_node_started_later_counts_the_same_offsets(cluster: Cluster) -> None:
    """Offsets are counted from the log: a node that replays it agrees with the others."""
    a, _ = await cluster.node()
    for i in range(7):
        await a.publish("count", b"%d" % i, HistoryOptions(size=3, ttl=60))
    await a.remove_history("other")
    late, _ = await cluster.node()
    result = await late.history("count")
    assert result.position == (await a.history("count", limit=0)).position
    assert [p.offset for p in result.publications] == [5, 6, 7]
    assert (await late.publish("count", b"7", KEEP)).offset == 8


async def test_the_stream_cap_forgets_the_same_streams_on_every_node(cluster: Cluster) -> None:
    """history_max_streams bounds each node's streams by count, and every node forgets the same
    ones (decided from the log): the least recently active stream of the partition goes, and its
    channel's next record starts a new life (offset 1, a new epoch) on both nodes alike."""
    nodes: list[KafkaBroker] = []
    for _ in range(2):
        broker = create_broker(cluster.url)
        assert isinstance(broker, KafkaBroker)
        broker.max_streams = 5
        await broker.start(Recorder())
        cluster.brokers.append(broker)
        nodes.append(broker)
    a, b = nodes
    first = [await a.publish(f"cap{i}", b"old %d" % i, KEPT) for i in range(12)]
    again = await b.publish("cap0", b"new", KEPT)  # written by the other node this time
    assert again.offset == 1 and again.epoch != first[0].epoch
    for node in nodes:
        assert (await node.history("cap0", limit=0)).position == again
        result = await node.history("cap0")
        assert [(p.data, p.offset) for p in result.publications] == [(b"new", 1)]
    # a channel forgotten and not published again: history starts it afresh (a touch), alike
    forgotten = await a.history("cap1")
    assert forgotten.publications == []
    assert forgotten.position.offset == 0 and forgotten.position.epoch != first[1].epoch
    assert (await b.history("cap1", limit=0)).position == forgotten.position
    # the most recently active channel was kept, in its first life, on both nodes
    for node in nodes:
        assert (await node.history("cap11", limit=0)).position == first[11]
    partitions = len(a._tps)
    cap = max(1, 5 // partitions)
    for node in nodes:
        assert len(node._streams) <= max(5, partitions)
        assert all(len(recent) <= cap for recent in node._activity.values())
    # 12 + cap0 again + the touch of cap1 = 14 streams started; the cap kept what it could
    assert a.streams_evicted == b.streams_evicted >= 14 - 5
    if partitions == 1:
        assert a.streams_evicted == 14 - 5


async def test_malformed_records_are_skipped(cluster: Cluster) -> None:
    from aiokafka import AIOKafkaProducer

    a, _ = await cluster.node()
    b, got = await cluster.node()
    assert isinstance(a, KafkaBroker)
    await b.subscribe("bad")
    producer = AIOKafkaProducer(bootstrap_servers=a.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(a.topic, b"x", key=b"bad", headers=[("k", b"p")])
        await producer.send_and_wait(a.topic, b"x", key=b"bad")  # no kind at all
    finally:
        await producer.stop()
    await a.publish("bad", b"fine", KEEP)
    pubs = await got.wait_publications("bad", 1)
    assert [(p.data, p.offset) for p in pubs] == [(b"fine", 1)]


def test_url_options() -> None:
    broker = create_broker(
        "kafka://k1:9092,k2:9092?prefix=app&partitions=3&timeout=2.5&fetch_wait=0.2"
        "&presence=redis://r:6379/1"
    )
    assert isinstance(broker, KafkaBroker)
    assert broker.bootstrap == ["k1:9092", "k2:9092"]
    assert (broker.topic, broker.partitions, broker.timeout, broker.fetch_wait) == (
        "app",
        3,
        2.5,
        0.2,
    )
    assert broker.presence_url == "redis://r:6379/1"
    presence = broker._presence
    assert presence is not None and getattr(presence, "prefix", None) == "app"
    assert create_broker("kafka://k:9092?topic=events.v1").topic == "events.v1"  # type: ignore[attr-defined]
    for bad, message in [
        ("partitions=0", "partitions"),
        ("partitions=1.5", "partitions"),
        ("timeout=soon", "timeout"),
        ("topic=a/b", "topic name"),
        ("socket=1", "unknown kafka URL option"),
    ]:
        with pytest.raises(ValueError, match=message):
            create_broker(f"kafka://k:9092?{bad}")
    with pytest.raises(ValueError, match="names no server"):
        create_broker("kafka://?prefix=x")


async def test_a_node_killed_with_sigkill_leaves_presence_that_expires(
    serve: Serve, cluster: Cluster, tmp_path: Path
) -> None:
    """A `tidings serve` node on kafka:// (presence in Redis) is SIGKILLed with a subscriber
    present: the entry expires after its presence_ttl and the other node keeps serving."""
    from .cfutil import Raw

    config = tmp_path / "tidings.toml"
    config.write_text("[namespaces.room]\npresence = true\npresence_ttl = 1.0\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    node_a = await asyncio.create_subprocess_exec(
        *[
            sys.executable,
            "-m",
            "tidings.cli",
            "serve",
            "--port",
            str(port),
            "--broker",
            cluster.url,
            "--config",
            str(config),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            async with asyncio.timeout(WAIT):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(f"http://127.0.0.1:{port}/health")).is_success:
                            break
                    await asyncio.sleep(0.05)
            client = await Raw.open(f"ws://127.0.0.1:{port}")
            client_id = (await client.connect())["client"]
            await client.subscribe("room:a")
            node_b = await serve(
                broker_url=cluster.url,
                namespaces={"room": {"presence": True, "presence_ttl": 1.0}},
            )

            async def present() -> list[str]:
                r = await http.post(f"{node_b.url}/api/presence", json={"channel": "room:a"})
                return list(r.json()["result"]["presence"])

            assert await present() == [client_id]
            node_a.kill()
            await node_a.wait()
            async with asyncio.timeout(WAIT):
                while await present():
                    await asyncio.sleep(0.1)
            r = await http.post(f"{node_b.url}/api/publish", json={"channel": "room:a", "data": 1})
            assert r.json()["result"]["offset"] >= 1
            with contextlib.suppress(Exception):
                await client.close()
    finally:
        if node_a.returncode is None:
            node_a.kill()
            await node_a.wait()


async def test_centrifugo_clients_recover_across_nodes_and_are_told_when_the_log_was_lost(
    serve: Serve, tansu: Tansu
) -> None:
    """Through real servers and the Centrifugo protocol: a client that reconnects to another
    node recovers what it missed from the Kafka log; after Tansu lost its log, a client
    recovering from its old position is told ``recovered: false`` with the new epoch."""
    from .cfutil import Raw

    url = _url(tansu.port, check_interval="0.1", timeout="2", repair="1")
    feed = {"feed": {"force_recovery": True, "history_size": 100, "history_ttl": 300}}
    node_a = await serve(broker_url=url, namespaces=feed)
    node_b = await serve(broker_url=url, namespaces=feed)
    client = await Raw.open(node_a.ws)
    await client.connect()
    position = await client.subscribe("feed:x")
    for i in range(3):
        await node_b.hub.publish("feed:x", i)
    live = [p["data"] for p in await client.publications("feed:x", 3)]
    assert live == [0, 1, 2]
    await client.close()
    for i in range(3, 6):  # missed while away
        await node_a.hub.publish("feed:x", i)

    again = await Raw.open(node_b.ws)
    await again.connect()
    result = await again.subscribe("feed:x", recover=True, offset=3, epoch=position["epoch"])
    assert result["recovered"] is True
    assert [p["data"] for p in result["publications"]] == [3, 4, 5]
    await again.close()

    tansu.kill()
    tansu.start()
    async with asyncio.timeout(3 * WAIT):  # both nodes notice, then publishing works again
        while True:
            try:
                after = await node_a.hub.publish("feed:x", 6)
                if after.epoch != position["epoch"]:
                    break
            except BrokerUnavailable:
                pass
            await asyncio.sleep(0.05)
    told = await Raw.open(node_b.ws)
    await told.connect()
    async with asyncio.timeout(3 * WAIT):
        while True:
            answer = await told.call(
                "subscribe", channel="feed:x", recover=True, offset=6, epoch=position["epoch"]
            )
            if "subscribe" in answer:
                break
            assert answer["error"]["code"] == 100, answer  # temporarily unavailable: retry
            await asyncio.sleep(0.05)
    result = answer["subscribe"]
    # recovered: false (left out of the reply, as Centrifugo leaves out false fields)
    assert result["was_recovering"] is True and not result.get("recovered")
    assert result["epoch"] != position["epoch"] and "publications" not in result
    await told.close()
