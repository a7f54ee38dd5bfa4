"""The fallback and unidirectional transports over real sockets: ``http_stream`` and ``sse``
(bidirectional emulation with ``/emulation``, also routed between two nodes on Redis), and
``uni_http_stream`` (a real ``curl -N``), ``uni_sse`` and ``uni_websocket``. The browser tests
(centrifuge-js over http_stream and sse, EventSource on uni_sse) are in
``test_transports_browser.py``."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from .cfutil import SECRET, token
from .conftest import IN_CI, Serve
from .engines import ENGINES, WAIT, namespace
from .nodes import tidings_serve
from .test_limits import wait_for

API = {"x-api-key": "key"}


class Lines:
    """The messages of a streaming response: ndjson lines, or SSE events (whose ``data:``
    lines are joined with ``\\n`` as EventSource does), each split into JSON objects."""

    def __init__(self, response: httpx.Response, sse: bool = False) -> None:
        self.lines = response.aiter_lines()
        self.sse = sse
        self.pending: list[dict[str, Any]] = []
        self.events = 0  # SSE events read (several messages may share one)

    async def _message(self) -> str:
        if not self.sse:
            return await anext(self.lines)
        data: list[str] = []
        while True:
            line = await anext(self.lines)
            if line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                self.events += 1
                return "\n".join(data)

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while not self.pending:
                text = await self._message()
                self.pending = [orjson.loads(part) for part in text.split("\n") if part]
        return self.pending.pop(0)

    async def until(self, key: str) -> dict[str, Any]:
        """The next message with ``key`` (pings, ``{}``, are skipped)."""
        while True:
            message = await self.next()
            if key in message:
                return message


async def publish(http: httpx.AsyncClient, channel: str, data: Any) -> int:
    r = await http.post("/api/publish", json={"channel": channel, "data": data}, headers=API)
    assert r.status_code == 200, r.text
    offset: int = r.json()["result"]["offset"]
    return offset


def emulate(session: dict[str, Any], *commands: dict[str, Any]) -> dict[str, Any]:
    data = "\n".join(orjson.dumps(c).decode() for c in commands)
    return {"session": session["session"], "node": session["node"], "data": data}


@pytest.mark.parametrize("kind", ["http_stream", "sse"])
async def test_emulated_session_runs_commands_posted_to_emulation(serve: Serve, kind: str) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key")
    connect = orjson.dumps({"id": 1, "connect": {"token": token("emu-user")}})
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        if kind == "sse":
            opened = http.stream("GET", "/connection/sse", params={"cf_connect": connect.decode()})
        else:
            opened = http.stream("POST", "/connection/http_stream", content=connect)
        async with opened as response:
            assert response.status_code == 200
            assert response.headers["cache-control"].startswith("private, no-cache")
            stream = Lines(response, sse=kind == "sse")
            reply = await stream.next()
            assert reply["id"] == 1
            result = reply["connect"]
            assert result["node"] == srv.hub.node_id and len(result["session"]) >= 32
            assert result["pong"] is True  # emulated clients answer pings through /emulation
            r = await http.post(
                "/emulation",
                json=emulate(
                    result,
                    {"id": 2, "subscribe": {"channel": "news"}},
                    {"id": 3, "ping": {}},
                ),
            )
            assert r.status_code == 204
            assert (await stream.next()) == {"id": 2, "subscribe": {}}
            assert (await stream.next()) == {"id": 3, "ping": {}}
            offsets = [await publish(http, "news", {"n": i}) for i in range(3)]
            for i, offset in enumerate(offsets):
                pub = {"data": {"n": i}, "offset": offset}
                assert await stream.until("push") == {"push": {"channel": "news", "pub": pub}}
            # a batch of publications reaches the client intact (one write, several messages)
            r = await http.post(
                "/api/batch",
                json={
                    "commands": [
                        {"publish": {"channel": "news", "data": {"b": i}}} for i in range(5)
                    ]
                },
                headers=API,
            )
            assert r.status_code == 200, r.text
            got = [(await stream.until("push"))["push"]["pub"]["data"] for _ in range(5)]
            assert got == [{"b": i} for i in range(5)]
            # commands for a session that is not here, or not commands at all
            missing = {**emulate(result, {"id": 9, "ping": {}}), "session": "nope"}
            assert (await http.post("/emulation", json=missing)).status_code == 404
            assert (await http.post("/emulation", content=b"{")).status_code == 400
            assert (await http.get("/emulation")).status_code == 405
            # the server ends the session: a stream has no close frame, a push says why
            r = await http.post("/api/disconnect", json={"user": "emu-user"}, headers=API)
            assert r.status_code == 200, r.text
            disconnect = await stream.until("push")
            assert disconnect == {
                "push": {"disconnect": {"code": 3503, "reason": "force disconnect"}}
            }
            with pytest.raises(StopAsyncIteration):
                await stream.next()


async def test_protocol_errors_end_the_stream_with_a_disconnect_push(serve: Serve) -> None:
    srv = await serve()
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        async with http.stream("POST", "/connection/http_stream", content=b"not json") as r:
            stream = Lines(r)
            assert (await stream.next())["push"]["disconnect"]["code"] == 3501
        # refusals before streaming: no connect frame, wrong method, too big
        assert (await http.get("/connection/sse")).status_code == 400
        assert (await http.get("/connection/http_stream")).status_code == 405
        big = b" " * (srv.tidings.settings.max_message_size + 1)
        assert (await http.post("/connection/http_stream", content=big)).status_code == 413
        preflight = await http.options("/connection/http_stream")
        assert preflight.status_code == 204
        assert "POST" in preflight.headers["access-control-allow-methods"]


async def test_an_emulated_client_that_stops_answering_pings_is_closed(serve: Serve) -> None:
    # the answered pong is an HTTP request of its own (/emulation): on a loaded machine (four
    # pytest-xdist workers on two cores) it took longer than 0.2 s and the session was closed
    # 3012 before it; 2 s leaves it room, and the unanswered ping still closes the session
    srv = await serve(ping_interval=0.2, pong_timeout=2.0)
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        body = orjson.dumps({"id": 1, "connect": {}})
        async with http.stream("POST", "/connection/http_stream", content=body) as r:
            stream = Lines(r)
            result = (await stream.next())["connect"]
            assert (await stream.next()) == {}  # a ping: answered once, through /emulation
            pong = await http.post("/emulation", json={**emulate(result), "data": "{}"})
            assert pong.status_code == 204
            assert (await stream.next()) == {}  # the next ping: left unanswered
            closed = await stream.until("push")
            assert closed["push"]["disconnect"]["code"] == 3012


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with namespace(ENGINES["redis"]) as url:
        yield url


async def test_emulation_reaches_the_node_that_holds_the_session(
    serve: Serve, redis_url: str
) -> None:
    """Two nodes on Redis: the stream is on A, its commands are posted to B (as behind a load
    balancer); B forwards them to A through the broker."""
    node_a = await serve(broker_url=redis_url)
    node_b = await serve(broker_url=redis_url)
    async with (
        httpx.AsyncClient(base_url=node_a.url, timeout=WAIT) as on_a,
        httpx.AsyncClient(base_url=node_b.url, timeout=WAIT) as on_b,
    ):
        body = orjson.dumps({"id": 1, "connect": {}})
        async with on_a.stream("POST", "/connection/http_stream", content=body) as r:
            stream = Lines(r)
            result = (await stream.next())["connect"]
            assert result["node"] == node_a.hub.node_id != node_b.hub.node_id
            subscribe = emulate(result, {"id": 2, "subscribe": {"channel": "routed"}})
            assert (await on_b.post("/emulation", json=subscribe)).status_code == 204
            assert (await stream.next()) == {"id": 2, "subscribe": {}}
            publish_cmd = emulate(result, {"id": 3, "publish": {"channel": "routed", "data": 7}})
            assert (await on_b.post("/emulation", json=publish_cmd)).status_code == 204
            messages = [await stream.next(), await stream.next()]
            assert {"id": 3, "publish": {}} in messages
            pushes = [m["push"] for m in messages if "push" in m]
            assert [(p["channel"], p["pub"]["data"], p["pub"]["offset"]) for p in pushes] == [
                ("routed", 7, 1)
            ]
            assert pushes[0]["pub"]["info"]["client"] == result["client"]


# -- unidirectional ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def curl() -> str:
    found = shutil.which("curl")
    if found is None:
        if IN_CI:
            pytest.fail("curl is required under CI")
        pytest.skip("curl is not installed")
    return found


async def test_curl_is_a_subscriber_on_uni_http_stream(serve: Serve, curl: str) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key")
    request = orjson.dumps({"token": token("curl-user", channels=["news"])})
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "-N",
        "--data-binary",
        request,
        f"{srv.url}/connection/uni_http_stream",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None

    async def line() -> dict[str, Any]:
        while True:
            async with asyncio.timeout(WAIT):
                raw = await proc.stdout.readline()  # type: ignore[union-attr]
            assert raw, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            message: dict[str, Any] = orjson.loads(raw)
            if message:  # {} is a ping
                return message

    try:
        connected = (await line())["connect"]
        assert connected["subs"]["news"] is not None and "pong" not in connected
        async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
            offsets = [await publish(http, "news", {"n": i}) for i in range(3)]
            for i, offset in enumerate(offsets):
                assert await line() == {
                    "channel": "news",
                    "pub": {"data": {"n": i}, "offset": offset},
                }
            # a server-side subscribe reaches it too, as a bare push
            r = await http.post(
                "/api/subscribe", json={"user": "curl-user", "channel": "extra"}, headers=API
            )
            assert r.status_code == 200, r.text
            pushed = await line()
            assert pushed["channel"] == "extra" and "subscribe" in pushed
            await http.post("/api/disconnect", json={"user": "curl-user"}, headers=API)
            assert await line() == {"disconnect": {"code": 3503, "reason": "force disconnect"}}
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0  # the server ended the response
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_uni_sse_with_a_connect_request_in_the_url(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key")
    request = orjson.dumps({"token": token("sse-user", channels=["news"])}).decode()
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        async with http.stream("GET", "/connection/uni_sse", params={"cf_connect": request}) as r:
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
            stream = Lines(r, sse=True)
            assert "session" in (await stream.next())["connect"]
            offset = await publish(http, "news", "hi")
            assert await stream.next() == {
                "channel": "news",
                "pub": {"data": "hi", "offset": offset},
            }
        bad = await http.get("/connection/uni_sse", params={"cf_connect": "[1]"})
        assert bad.status_code == 400
        refused = orjson.dumps({"token": "not-a-jwt"}).decode()
        async with http.stream("GET", "/connection/uni_sse", params={"cf_connect": refused}) as r:
            assert (await Lines(r, sse=True).next())["disconnect"]["code"] == 3500


@pytest.mark.parametrize("in_url", [True, False])
async def test_uni_websocket_with_a_plain_client(serve: Serve, in_url: bool) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key")
    request = orjson.dumps({"token": token("ws-user", channels=["news"])}).decode()
    url = f"{srv.ws}/connection/uni_websocket"
    if in_url:
        url += "?" + httpx.QueryParams({"cf_connect": request}).__str__()
    async with websockets.connect(url) as ws, httpx.AsyncClient(base_url=srv.url) as http:
        if not in_url:
            await ws.send(request)

        async def message() -> dict[str, Any]:
            while True:
                async with asyncio.timeout(WAIT):
                    frame = await ws.recv()
                for part in str(frame).split("\n"):
                    if part != "{}":
                        got: dict[str, Any] = orjson.loads(part)
                        return got

        assert "news" in (await message())["connect"]["subs"]
        offset = await publish(http, "news", {"x": 1})
        assert await message() == {"channel": "news", "pub": {"data": {"x": 1}, "offset": offset}}
        await ws.send("anything: a unidirectional client's messages are read and dropped")
        await http.post("/api/disconnect", json={"user": "ws-user"}, headers=API)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await message()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3503


async def test_uni_websocket_without_a_connect_request_is_closed(serve: Serve) -> None:
    srv = await serve()
    async with websockets.connect(f"{srv.ws}/connection/uni_websocket") as ws:
        await ws.send("[not an object]")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(WAIT):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3501


async def test_a_stream_that_stops_reading_is_closed_as_slow(serve: Serve) -> None:
    """A client that stops reading its stream fills only its own outbox and is dropped (3008);
    a subscriber that reads gets everything, and the publisher never waits for the slow one."""
    srv = await serve(
        token_hmac_secret=SECRET, api_key="key", outbox_limit=64 * 1024, max_message_size=60_000
    )
    body = orjson.dumps({"token": token("slow", channels=["firehose"])})
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", srv.port))
    stalled.sendall(
        b"POST /connection/uni_http_stream HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    reading = orjson.dumps({"token": token("fast", channels=["firehose"])})
    try:
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http,
            http.stream("POST", "/connection/uni_http_stream", content=reading) as r,
        ):
            stream = Lines(r)
            assert "connect" in await stream.next()
            await wait_for(lambda: srv.hub.subscribers("firehose") == 2, "two subscribers")
            got: list[str] = []

            async def read_all() -> None:
                while len(got) < 300:
                    got.append((await stream.until("pub"))["pub"]["data"])

            reader = asyncio.create_task(read_all())
            payload = "x" * 50_000
            for i in range(300):
                # a deadline, not a measurement: a publisher held up by the stalled client
                # would never get its answer
                await asyncio.wait_for(srv.hub.publish("firehose", f"{i}:{payload}"), 10)
            await asyncio.wait_for(reader, 30)
            assert [m.split(":", 1)[0] for m in got] == [str(i) for i in range(300)]
            assert srv.hub.metrics.slow_clients == 1
            await wait_for(lambda: srv.hub.subscribers("firehose") == 1, "the slow one dropped")
    finally:
        stalled.close()


async def test_tidings_serve_ends_open_streams_when_it_stops(tmp_path: Path) -> None:
    """A stream has no close frame: on SIGTERM `tidings serve` ends each one with a disconnect
    push (3001) instead of waiting for it forever, then exits."""
    proc = tidings_serve(tmp_path, "memory://").start()
    try:
        await asyncio.to_thread(proc.wait_healthy)
        async with (
            httpx.AsyncClient(base_url=proc.url, timeout=WAIT) as http,
            http.stream("POST", "/connection/uni_http_stream", content=b"{}") as uni,
            http.stream(
                "POST", "/connection/http_stream", content=b'{"id":1,"connect":{}}'
            ) as bidi,
        ):
            uni_lines, bidi_lines = Lines(uni), Lines(bidi)
            assert "connect" in await uni_lines.next()
            assert "connect" in await bidi_lines.next()
            proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            shutdown = {"code": 3001, "reason": "shutdown"}
            assert await uni_lines.until("disconnect") == {"disconnect": shutdown}
            assert await bidi_lines.until("push") == {"push": {"disconnect": shutdown}}
        # uvicorn re-raises the signal it stopped on, once it has shut down
        assert await asyncio.to_thread(proc.wait_exit, WAIT) in (0, -signal.SIGTERM)
    finally:
        proc.stop()


async def test_unidirectional_pings_need_no_pong(serve: Serve) -> None:
    """A unidirectional client cannot answer pings: they keep coming, the stream stays open
    (a bidirectional client would be closed 3012 after the first unanswered one)."""
    srv = await serve(ping_interval=0.2, pong_timeout=0.2)
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http,
        http.stream("POST", "/connection/uni_http_stream", content=b"") as r,
    ):
        stream = Lines(r)
        assert "pong" not in (await stream.next())["connect"]
        for _ in range(3):
            assert await stream.next() == {}
        assert srv.hub.sessions and not srv.hub.metrics.slow_clients


async def test_streaming_endpoints_refuse_a_foreign_browser_origin(serve: Serve) -> None:
    """Outside dev mode, a page on another origin opens no stream, posts no command and gets no
    uni_websocket (403 before anything runs); a request without Origin (curl) is not refused."""
    server = await serve(token_hmac_secret=SECRET, api_key="k")
    evil = {"Origin": "https://evil.example"}
    connect = orjson.dumps({"token": token("alice")})
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as http:
        for path in ("/connection/http_stream", "/connection/uni_http_stream", "/emulation"):
            answer = await http.post(path, content=connect, headers=evil)
            assert answer.status_code == 403, path
        answer = await http.get(
            "/connection/uni_sse", params={"cf_connect": connect.decode()}, headers=evil
        )
        assert answer.status_code == 403
        async with http.stream("POST", "/connection/uni_http_stream", content=connect) as stream:
            assert stream.status_code == 200
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            f"{server.ws}/connection/uni_websocket", origin="https://evil.example"
        ):
            pass
    assert refused.value.response.status_code == 403
