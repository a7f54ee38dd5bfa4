"""Shared fixtures: a real tidings server under uvicorn on a free loopback port.

Every test that takes the ``serve`` fixture runs once per server path, as uvicorn's own suite
runs each test on every protocol implementation: ``[uvicorn]`` (stock uvicorn, the path of an
app mounted elsewhere) and ``[fast]`` (`tidings serve`'s own protocols and front door). Tests
that start no server run once. A test that picks its paths itself (``serve(fast=True)``,
or a ``fast`` parameter of its own) is marked ``@pytest.mark.one_path`` and runs once.
``TIDINGS_TEST_FAST=1`` (or ``0``) runs only the fast (or only the uvicorn) path, locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from tidings import Settings, create_app
from tidings.app import Tidings
from tidings.serve.front import Front
from tidings.serve.mounted import RunError, prepare
from tidings.serve.server import server_options

IN_CI = os.environ.get("CI", "").lower() == "true"
#: the server paths a ``serve`` test runs on: name -> ``fast``
PATHS = {"uvicorn": False, "fast": True}
#: TIDINGS_TEST_FAST=1 selects the fast path only, 0 the uvicorn path only; unset: both
_ONLY = os.environ.get("TIDINGS_TEST_FAST", "")
SELECTED_PATHS = list(PATHS) if _ONLY == "" else ["uvicorn"] if _ONLY == "0" else ["fast"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_path: the test picks its server paths itself (serve(fast=...)): it runs once, "
        "not once per path",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``[uvicorn]`` and ``[fast]`` for every test that starts a server with ``serve``."""
    if "serve" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("one_path") is not None:
        return
    if "fast" in metafunc.fixturenames:  # a ``fast`` parameter of the test's own
        return
    metafunc.parametrize("server_path", SELECTED_PATHS, indirect=True)


@pytest.fixture
def server_path(request: pytest.FixtureRequest) -> str:
    """The path ``serve()`` uses when a test does not pin one (see the module docstring)."""
    return str(getattr(request, "param", SELECTED_PATHS[0]))


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """uvloop, as `tidings serve` runs: tests see the loop users get."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@contextlib.contextmanager
def exclusive(what: str) -> Iterator[None]:
    """Hold an inter-process lock named ``what`` for the block (an flock on a file in the
    temporary directory): pytest-xdist's workers are separate processes, and two that install
    into one directory at once break each other's install."""
    digest = hashlib.sha256(what.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"tidings-tests-{digest}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield


def npm_once(directory: Path, done: Path, command: str = "install") -> None:
    """``npm <command>`` in ``directory`` unless ``done`` (a file it installs) exists; one
    process at a time (``exclusive``), so a second worker waits and finds it installed.

    Raises:
        pytest.fail.Exception: npm is missing under CI=true (``pytest.skip`` elsewhere).
        subprocess.CalledProcessError: npm failed."""
    if done.exists():
        return
    with exclusive(f"npm {directory.resolve()}"):
        if done.exists():  # installed by another worker while this one waited
            return
        npm = shutil.which("npm")
        if npm is None:
            if IN_CI:
                pytest.fail(f"npm is required under CI ({directory}: npm {command})")
            pytest.skip("npm is not installed")
        subprocess.run(
            [npm, command, "--no-audit", "--no-fund"], cwd=directory, check=True, timeout=300
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    """A server started by the ``serve`` fixture."""

    tidings: Tidings
    port: int
    server: uvicorn.Server
    fast: bool = False  # served as `tidings serve` does

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def hub(self) -> Any:
        return self.tidings.hub


Serve = Callable[..., Awaitable[Running]]


class PromptServer(uvicorn.Server):
    """uvicorn's server, whose main loop notices ``should_exit`` when it is set rather than at
    its next 0.1 s tick: a test's teardown does not wait for the tick. Everything else (the
    ticks' work, the shutdown) is uvicorn's own."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._wake: asyncio.Event | None = None
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._wake is not None:
            self._wake.set()

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        if self._should_exit:
            self._wake.set()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # uvicorn's tick
                    await self._wake.wait()


@contextlib.asynccontextmanager
async def served(app: Any, **options: Any) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """Serve any ASGI app under uvicorn on a free loopback port in this loop."""
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, **{"log_level": "warning", "lifespan": "on", **options})
    server = PromptServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(1000):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("server did not start")
        yield port, server
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


@pytest.fixture
async def serve(server_path: str) -> AsyncIterator[Serve]:
    """``await serve(**settings)`` starts a server in this test's loop; stopped at teardown.

    It serves on the test's path (``server_path``: each test runs on both) unless the call
    pins one with ``fast=``."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            settings: Settings | None = None,
            *,
            app: Any = None,
            fast: bool | None = None,
            uvicorn_options: dict[str, Any] | None = None,
            **overrides: Any,
        ) -> Running:
            """Serve ``Settings(**overrides)``, or ``app`` (with a Tidings installed).

            ``fast=True`` serves it as `tidings serve` does (tidings' own WebSocket protocol
            and front door), ``fast=False`` on stock uvicorn, the path of an app mounted
            elsewhere; unset, the test's ``server_path``. ``uvicorn_options`` override the
            server's settings."""
            own = app is None  # the standalone app, as `tidings serve` builds it
            if app is not None:
                settings = app.state.tidings.settings
            elif settings is None:
                settings = Settings(**overrides)
            assert settings is not None
            if app is None:
                app = create_app(settings)
            if fast is None:
                fast = PATHS[server_path]
            if fast and own:
                asgi: Any = Front(app)
                options = server_options(settings)
                options.pop("loop")  # the test's own loop runs the server
            elif fast:  # a user's app, as `tidings run` serves it (serve/mounted.py)
                try:
                    asgi, options = prepare(app)
                except RunError:  # its tidings is not found: served without a front door
                    asgi, options = app, server_options(settings)
                options = {**options, "lifespan": "on", "access_log": False}
                options.pop("loop")
            else:
                asgi = app
                options = {
                    "ws_max_size": settings.max_message_size,
                    "ws_ping_interval": settings.ping_interval,
                    "ws_ping_timeout": settings.pong_timeout,
                }
            port, server = await stack.enter_async_context(
                served(asgi, **{**options, **(uvicorn_options or {})})
            )
            return Running(app.state.tidings, port, server, fast)

        yield start


# -- Chromium for the browser tests (README: Test) -----------------------------------------------

CHROMIUM = os.environ.get("TIDINGS_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A launched headless Chromium (a Playwright ``Browser``), closed on exit."""
    if not shutil.which(CHROMIUM):
        if IN_CI:
            pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
        pytest.skip("Chromium not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium for one test (:func:`chromium`)."""
    async with chromium() as launched:
        yield launched
