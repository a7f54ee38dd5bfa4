"""`tidings run module:app`: the README's mounted app served by a real ``tidings run`` process.

Its own routes answer through FastAPI; tidings' routes go through the fast path of `tidings
serve`: the banner says so, and the WebSocket handshake shows tidings' protocol (it declines
permessage-deflate, which uvicorn's own protocols accept from the same client).
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import httpx
import pytest
import websockets

from .clirun import running, tidings
from .conftest import free_port, served
from .test_readme import programs

WAIT = 10.0


def write_app(directory: Path, name: str, code: str) -> str:
    (directory / f"{name}.py").write_text(code)
    return f"{name}:app"


async def test_readme_mounted_app_under_tidings_run(tmp_path: Path) -> None:
    target = write_app(tmp_path, "readme_mount_app", programs()["mount"].code)
    port = free_port()
    base, ws_base = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    with running("run", target, "--app-dir", str(tmp_path), "--port", str(port)) as proc:
        [banner] = await asyncio.to_thread(proc.wait, "listening on")
        assert banner.endswith(
            f"tidings run: {target} listening on {base}; tidings routes /ws/{{channel}}, "
            "/connection/websocket and POST /api/..., /publish/... on the fast path"
        )
        async with (
            websockets.connect(f"{ws_base}/ws/orders") as ws,
            httpx.AsyncClient(base_url=base) as http,
        ):
            # tidings' protocol declines compression; uvicorn's accepts it (see below)
            assert ws.protocol.extensions == []
            # the app's own route publishes through the hub
            r = await http.post("/orders", json={"id": 7})
            assert r.status_code == 200 and r.json() == {"ok": True}
            assert await asyncio.wait_for(ws.recv(), WAIT) == '{"id":7}'
            # tidings' publishing routes, answered by the front door
            r = await http.post("/api/publish", json={"channel": "orders", "data": {"id": 8}})
            assert r.status_code == 200 and r.json()["result"]["offset"] == 2
            assert await asyncio.wait_for(ws.recv(), WAIT) == '{"id":8}'
            r = await http.post("/publish/orders", content=b"nine")
            assert r.status_code == 200
            assert await asyncio.wait_for(ws.recv(), WAIT) == "nine"
            # everything else is the app's: its other tidings routes, docs, 404s
            assert (await http.get("/health")).status_code == 200
            assert (await http.get("/openapi.json")).json()["paths"]["/orders"]
            assert (await http.get("/nowhere")).status_code == 404
            r = await http.post("/api/nosuchmethod", json={})  # the server API's own answer
            assert r.status_code == 404 and r.json()["error"]["code"] == 104


async def test_the_same_app_under_uvicorn_accepts_compression() -> None:
    """The other half of the fast-path assertion above: it is not the client's doing."""
    namespace: dict[str, object] = {}
    exec(compile(programs()["mount"].code, "readme-mount", "exec"), namespace)
    app = namespace["app"]
    async with (
        served(app) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/ws/orders") as ws,
    ):
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]


PREFIXED = """
from fastapi import FastAPI
from tidings import Tidings

tidings = Tidings(broker_url="memory://")
app = FastAPI()
tidings.install(app, prefix="/rt")

@app.get("/")
async def home() -> dict:
    return {"home": True}
"""

WITH_MIDDLEWARE = (
    PREFIXED
    + """
@app.middleware("http")
async def stamp(request, call_next):
    response = await call_next(request)
    response.headers["x-stamp"] = "app"
    return response
"""
)


async def test_installed_under_a_prefix(tmp_path: Path) -> None:
    target = write_app(tmp_path, "prefixed_app", PREFIXED)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running("run", target, "--app-dir", str(tmp_path), "--port", str(port)) as proc:
        [banner] = await asyncio.to_thread(proc.wait, "listening on")
        assert "/rt/ws/{channel}" in banner and "on the fast path" in banner
        async with (
            websockets.connect(f"ws://127.0.0.1:{port}/rt/ws/news") as ws,
            httpx.AsyncClient(base_url=base) as http,
        ):
            assert ws.protocol.extensions == []
            assert (await http.post("/rt/publish/news", content=b"hi")).status_code == 200
            assert await asyncio.wait_for(ws.recv(), WAIT) == "hi"
            assert (await http.get("/")).json() == {"home": True}
            # outside the prefix, tidings' paths are the app's: not found
            assert (await http.post("/publish/news", content=b"x")).status_code == 404
            with pytest.raises(websockets.InvalidStatus):
                async with websockets.connect(f"ws://127.0.0.1:{port}/ws/news"):
                    pass


async def test_an_app_with_middleware_keeps_it_on_tidings_routes(tmp_path: Path) -> None:
    """Skipping the app's middleware would change what a request gets: not done."""
    target = write_app(tmp_path, "stamped_app", WITH_MIDDLEWARE)
    port = free_port()
    with running("run", target, "--app-dir", str(tmp_path), "--port", str(port)) as proc:
        [banner] = await asyncio.to_thread(proc.wait, "listening on")
        assert "through the app (the app has middleware (BaseHTTPMiddleware))" in banner
        async with (
            websockets.connect(f"ws://127.0.0.1:{port}/rt/ws/news") as ws,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
        ):
            assert ws.protocol.extensions == []  # still tidings' WebSocket protocol
            r = await http.post("/rt/publish/news", content=b"hi")
            assert r.status_code == 200 and r.headers["x-stamp"] == "app"
            assert await asyncio.wait_for(ws.recv(), WAIT) == "hi"


def test_an_app_without_tidings_is_refused(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        from fastapi import FastAPI
        app = FastAPI()
    """)
    target = write_app(tmp_path, "plain_app", code)
    done = tidings("run", target, "--app-dir", str(tmp_path), "--port", str(free_port()))
    assert done.returncode == 2
    assert "the app includes no tidings routes" in done.stderr
    assert "Traceback" not in done.stderr


def test_an_app_that_cannot_be_imported_is_one_line(tmp_path: Path) -> None:
    done = tidings("run", "no_such_module:app", "--app-dir", str(tmp_path))
    assert done.returncode == 2
    assert "no_such_module" in done.stderr and "Traceback" not in done.stderr


async def test_prepare_gives_uvicorn_the_same_fast_path() -> None:
    """The README's recipe for those who start uvicorn themselves."""
    from tidings.serve.front import Front
    from tidings.serve.mounted import prepare
    from tidings.serve.websocket import FastWebSocket

    namespace: dict[str, object] = {}
    exec(compile(programs()["mount"].code, "readme-mount", "exec"), namespace)
    application, options = prepare(namespace["app"])
    assert isinstance(application, Front) and options["ws"] is FastWebSocket
    options.pop("loop")  # the test's own loop runs the server
    async with (
        served(application, **options) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/ws/orders") as ws,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        assert ws.protocol.extensions == []
        assert (await http.post("/orders", json={"id": 1})).json() == {"ok": True}
        assert await asyncio.wait_for(ws.recv(), WAIT) == '{"id":1}'


def test_find_and_front_under_a_prefix() -> None:
    """Where an app put tidings' routes, and which requests the front door takes there."""
    from fastapi import Depends, FastAPI

    from tidings import Tidings
    from tidings.serve.front import Front
    from tidings.serve.mounted import RunError, find

    tidings = Tidings(broker_url="memory://")
    app = FastAPI()
    tidings.install(app, prefix="/rt")
    found = find(app)
    assert (found.tidings, found.prefix, found.through_app) == (tidings, "/rt", None)
    front = Front(app, found.tidings, found.prefix)
    assert front.route("/rt/api/publish") is not None
    assert front.route("/rt/publish/news") is not None
    for other in ("/api/publish", "/publish/news", "/rtx/publish/news", "/rt/health", "/rt"):
        assert front.route(other) is None, other

    guarded = FastAPI()
    guarded.include_router(Tidings(broker_url="memory://").router, dependencies=[Depends(str)])
    assert find(guarded).through_app == "tidings' routes have dependencies in the app"

    twice = FastAPI()
    again = Tidings(broker_url="memory://")
    twice.include_router(again.router)
    twice.include_router(again.router, prefix="/b")
    with pytest.raises(RunError, match="more than once"):
        find(twice)
