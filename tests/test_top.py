"""`tidings top` against real servers: a `tidings serve` process read by `tidings top --once`
(figures change as clients connect and publish), rates from two real samples, every node of a
cluster in ``info`` (node announcements through the broker), and a refused key in one line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets
from rich.console import Console

from tidings import Hub, Settings
from tidings.brokers import create_broker
from tidings.control import NodeInfo
from tidings.nodes import NodeDirectory
from tidings.top import UPTIME, Sample, frame, render, sample

from .conftest import Serve, free_port
from .engines import ENGINES, WAIT, namespace

CLI = [sys.executable, "-m", "tidings.cli"]
KEY = "top-test-key"


def env(**extra: str) -> dict[str, str]:
    """No TIDINGS_* from the caller; wide lines so tables are not cut."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    out.update(PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1", **extra)
    return out


@contextlib.contextmanager
def tidings_serve(**settings: str) -> Iterator[str]:
    """A `tidings serve` process on a free port; its base URL once /health answers."""
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        env=env(**{f"TIDINGS_{k.upper()}": v for k, v in settings.items()}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url) as http:
            for _ in range(600):
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    raise AssertionError(f"tidings serve exited: {proc.stderr.read()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/health").status_code == 200:
                        break
                time.sleep(0.05)  # polling for readiness (the process gives no other sign)
            else:
                raise AssertionError("tidings serve did not answer /health")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def sample_of(url: str) -> Sample:
    with httpx.Client(base_url=url) as http:
        return sample(http)


async def top_once(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `tidings top --once` (two samples 0.2 s apart) without blocking this loop."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "top",
        "--url",
        url,
        "--once",
        "--interval",
        "0.2",
        *args,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())


def figure(output: str, label: str) -> int:
    """The number after ``label`` in the summary (``connections 3``)."""
    found = re.search(rf"\b{label} ([\d,]+)", output)
    assert found, f"no {label!r} in:\n{output}"
    return int(found.group(1).replace(",", ""))


def table(output: str, title: str) -> dict[str, list[str]]:
    """The rows of the table titled ``title``: first cell -> the other cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


async def until(check: Any, what: str) -> None:
    """Wait (at most WAIT seconds) until ``await check()`` is true."""
    async with asyncio.timeout(WAIT):
        while not await check():
            await asyncio.sleep(0.02)


async def test_top_once_shows_figures_change_as_clients_connect_and_publish() -> None:
    headers = {"X-API-Key": KEY}
    # an API key (so top must send it), and anonymous raw subscribers allowed
    with tidings_serve(api_key=KEY, defaults__allow_subscribe="anonymous") as url:
        before = await top_once(url, "--api-key", KEY)
        assert before.returncode == 0, before.stderr
        assert figure(before.stdout, "nodes") == 1
        assert figure(before.stdout, "connections") == 0
        assert figure(before.stdout, "publications") == 0
        assert "broker ok (MemoryBroker)" in before.stdout
        assert table(before.stdout, "Top channels by subscribers") == {}

        ws_url = url.replace("http", "ws", 1)
        async with (
            httpx.AsyncClient(base_url=url, headers=headers) as http,
            websockets.connect(f"{ws_url}/ws/news") as a,
            websockets.connect(f"{ws_url}/ws/news") as b,
            websockets.connect(f"{ws_url}/ws/sports"),
        ):

            async def subscribed() -> bool:
                r = await http.post("/api/channels", json={})
                channels = r.json()["result"]["channels"]
                return {k: v["num_clients"] for k, v in channels.items()} == {
                    "news": 2,
                    "sports": 1,
                }

            await until(subscribed, "three subscribers")
            for i in range(5):
                r = await http.post("/api/publish", json={"channel": "news", "data": f"m{i}"})
                assert "result" in r.json(), r.text
            for ws in (a, b):
                for i in range(5):
                    assert await asyncio.wait_for(ws.recv(), WAIT) == f"m{i}"

            after = await top_once(url, "--api-key", KEY)
            assert after.returncode == 0, after.stderr
            out = after.stdout
            assert figure(out, "connections") == 3
            assert figure(out, "subscriptions") == 3
            assert figure(out, "channels") == 2
            assert figure(out, "publications") == 5
            assert figure(out, "deliveries") == 10
            by_subs = table(out, "Top channels by subscribers")
            assert list(by_subs) == ["news", "sports"]  # most subscribers first
            assert by_subs["news"][0] == "2" and by_subs["news"][2] == "5"
            assert by_subs["sports"][0] == "1" and by_subs["sports"][2] == "0"
            (node,) = table(out, "Nodes").values()
            assert node[1:5] == ["3", "0", "2", "3"]  # clients, users, channels, subs


async def test_top_refused_key_is_one_line_and_exit_2() -> None:
    with tidings_serve(api_key=KEY) as url:
        for args in ((), ("--api-key", "wrong")):
            done = await top_once(url, *args)
            assert done.returncode == 2
            assert "refused the API key" in done.stderr and "TIDINGS_API_KEY" in done.stderr
            assert "Traceback" not in done.stderr and done.stdout == ""


async def test_top_unreachable_server_is_one_line() -> None:
    done = await top_once(f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert "cannot reach http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


def test_top_imports_no_web_framework() -> None:
    """A client command: importing it (and the CLI) loads no server side."""
    code = (
        "import sys, tidings.top, tidings.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('fastapi', 'uvicorn', 'starlette', 'tidings.app')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


async def test_rates_come_from_two_samples(serve: Serve) -> None:
    """pub/s and deliveries/s are the counters' differences over the time between samples."""
    srv = await serve()
    async with websockets.connect(f"{srv.ws}/ws/rates") as ws:
        with httpx.Client(base_url=srv.url) as http:

            async def subscribed() -> bool:
                return bool(srv.hub.subscribers("rates") == 1)

            await until(subscribed, "subscriber")
            first = await asyncio.to_thread(sample, http)
            for i in range(10):
                await srv.hub.publish("rates", i)
            for i in range(10):
                assert await asyncio.wait_for(ws.recv(), WAIT) == str(i)
            second = await asyncio.to_thread(sample, http)
    view = frame(srv.url, second, first)
    seconds = second.at - first.at
    (row,) = [c for c in view.channels if c.name == "rates"]
    assert row.subscribers == 1 and row.publications == 10
    assert row.rate is not None and round(row.rate * seconds) == 10
    (node,) = view.nodes
    # a node's rates are over the time between its own readings
    span = node.info["metrics"]["items"][UPTIME] - first.nodes[0]["metrics"]["items"][UPTIME]
    assert node.publications is not None and round(node.publications * span) == 10
    assert node.deliveries is not None and round(node.deliveries * span) == 10
    assert node.slow == 0
    # the first frame has no rates: nothing to compare with
    assert frame(srv.url, first, None).nodes[0].deliveries is None


def test_render_shows_a_broker_that_is_down_and_escapes_names() -> None:
    now = Sample(
        at=10.0,
        nodes=[{"uid": "n1", "name": "[bold]node", "num_clients": 1, "uptime": 5}],
        channels={"[red]x": {"num_clients": 1, "num_pubs": 3}},
        health={"status": "error", "broker": {"ok": False, "error": "Connection refused"}},
        healthy=False,
    )
    console = Console(record=True, width=200, color_system=None)
    console.print(render(frame("http://h:1", now, None)))
    text = console.export_text()
    assert "broker DOWN: Connection refused" in text
    assert "[bold]node" in text and "[red]x" in text  # shown as typed, not read as markup


# -- every node in info, through the broker ------------------------------------------------------


@pytest.fixture(params=sorted(ENGINES))
async def broker_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with namespace(ENGINES[request.param]) as url:
        yield url


async def test_info_lists_every_node_of_a_cluster(serve: Serve, broker_url: str) -> None:
    a = await serve(broker_url=broker_url, node_info_interval=0.1)
    b = await serve(broker_url=broker_url, node_info_interval=0.1)
    async with (
        httpx.AsyncClient(base_url=a.url) as http,
        websockets.connect(f"{b.ws}/ws/on-b") as _ws,
    ):
        nodes: dict[str, dict[str, Any]] = {}

        async def both_seen_with_bs_client() -> bool:
            nonlocal nodes
            r = await http.post("/api/info", json={})
            nodes = {n["uid"]: n for n in r.json()["result"]["nodes"]}
            other = nodes.get(b.hub.node_id)
            return other is not None and other["num_clients"] == 1

        await until(both_seen_with_bs_client, "node B with its client, as seen from A")
        assert set(nodes) == {a.hub.node_id, b.hub.node_id}
        assert nodes[a.hub.node_id]["num_clients"] == 0
        assert nodes[b.hub.node_id]["num_subs"] == 1
        assert "tidings_deliveries" in nodes[b.hub.node_id]["metrics"]["items"]
        # tidings top shows both
        view = frame(a.url, await asyncio.to_thread(sample_of, a.url), None)
        console = Console(record=True, width=200, color_system=None)
        console.print(render(view))
        text = console.export_text()
        assert figure(text, "nodes") == 2 and figure(text, "connections") == 1
        assert b.hub.node_id in text and a.hub.node_id in text


async def test_a_silent_node_is_forgotten_and_our_own_announcement_ignored() -> None:
    hub = Hub(create_broker("memory://"), Settings())
    directory = NodeDirectory(hub, interval=0.05)
    directory.on_node(NodeInfo(uid="other", name="z_other", num_clients=4))
    directory.on_node(NodeInfo(uid=hub.node_id, name="me", num_clients=99))
    assert [n.uid for n in directory.nodes()] == [hub.node_id, "other"]
    assert directory.nodes()[0].num_clients == 0  # our own figures, not the echo

    async def forgotten() -> bool:
        return len(directory.nodes()) == 1

    await until(forgotten, "the silent node dropped")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


async def test_live_view_in_a_terminal_follows_the_server(serve: Serve) -> None:
    """`tidings top` in a real pseudo-terminal redraws as clients come and publish, and leaves
    with exit code 0 on Ctrl-C."""
    import pty
    import signal

    srv = await serve()
    leader, follower = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *("top", "--url", srv.url, "--interval", "0.1"),
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env(TERM="xterm-256color", LINES="60"),
    )
    os.close(follower)
    screen: list[str] = []
    changed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the process is gone
            data = b""
        if not data:
            loop.remove_reader(leader)
        screen.append(ANSI.sub("", data.decode(errors="replace")))
        changed.set()

    async def shown(pattern: str) -> None:
        """Wait until the terminal shows ``pattern`` (a regex) after this call."""
        start = len(screen)
        async with asyncio.timeout(WAIT):
            while not re.search(pattern, "".join(screen[start:])):
                changed.clear()
                await changed.wait()

    loop.add_reader(leader, readable)
    try:
        await shown(r"connections 0 ")
        async with websockets.connect(f"{srv.ws}/ws/live") as ws:
            await shown(r"connections 1 ")
            await shown(r"│ live\s+│\s+1 │")
            for i in range(3):
                await srv.hub.publish("live", i)
                assert await asyncio.wait_for(ws.recv(), WAIT) == str(i)
            await shown(r"publications 3 ")
        await shown(r"connections 0 ")
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
        assert "Traceback" not in "".join(screen)
    finally:
        loop.remove_reader(leader)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        os.close(leader)


def test_node_info_codec() -> None:
    from tidings import control

    info = NodeInfo(uid="n1", name="h_n1", version="1", num_clients=2, metrics={"x": 1.5})
    wire = control.encode(info)
    assert wire.startswith(b'{"op":"node","uid":"n1"')
    assert control.decode(wire) == info
    # a newer node's extra keys are ignored
    assert control.decode(b'{"op":"node","uid":"n2","future":1}') == NodeInfo(uid="n2")
    for bad in (
        b'{"op":"node"}',
        b'{"op":"node","uid":""}',
        b'{"op":"node","uid":"n","num_clients":-1}',
        b'{"op":"node","uid":"n","uptime":true}',
        b'{"op":"node","uid":"n","metrics":{"x":"1"}}',
        b'{"op":"node","uid":"n","metrics":[]}',
    ):
        with pytest.raises(control.ControlError):
            control.decode(bad)


def test_hub_keeps_node_announcements_from_its_handlers() -> None:
    from tidings import control

    hub = Hub(create_broker("memory://"), Settings())
    seen: list[object] = []
    hub.on_control_message(seen.append)
    hub.on_control(control.encode(NodeInfo(uid="peer", name="p", num_subs=7)))
    assert seen == []  # handlers get the messages about users only
    (_, peer) = hub.directory.nodes()
    assert (peer.uid, peer.num_subs) == ("peer", 7)


def test_another_nodes_rates_hold_between_its_announcements() -> None:
    """Node b reports every few seconds: samples in between keep its last rates, and a new
    report is divided by the time between b's own readings, not between the samples."""

    def node(uid: str, at: float, delivered: float) -> dict[str, Any]:
        items = {UPTIME: at, "tidings_deliveries": delivered}
        return {"uid": uid, "name": uid, "metrics": {"interval": 0, "items": items}}

    s1 = Sample(at=100.0, nodes=[node("a", 10.0, 0), node("b", 50.0, 0)], channels={})
    s2 = Sample(at=101.0, nodes=[node("a", 11.0, 5), node("b", 53.0, 300)], channels={})
    s3 = Sample(at=102.0, nodes=[node("a", 12.0, 15), node("b", 53.0, 300)], channels={})
    f2 = frame("u", s2, s1)
    assert [n.deliveries for n in f2.nodes] == [5.0, 100.0]  # b: 300 over its 3 s
    f3 = frame("u", s3, s2, f2)
    assert [n.deliveries for n in f3.nodes] == [10.0, 100.0]  # b: no new reading, held
    assert frame("u", s3, s2).nodes[1].deliveries is None  # nothing shown before: unknown
