"""Several worker processes on one port: `tidings serve --workers N`, and the two-workers trap
(the README's mount snippet on the memory broker under `uvicorn --workers 2` or gunicorn)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port
from .engines import ENGINES, namespace
from .nodes import BIN, Proc, clean_env, tidings_serve

README_APP = """
from fastapi import FastAPI
from tidings import Tidings

tidings = Tidings(broker_url="memory://")      # or redis://... for several workers
app = FastAPI(lifespan=tidings.lifespan)
app.include_router(tidings.router)             # /ws/{channel}, /api/publish, /health, ...
"""

TRAP = "several workers serving the same socket"
FIX = "TIDINGS_BROKER_URL=redis://"


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding the README's mount snippet as ``app.py``."""
    (tmp_path / "app.py").write_text(README_APP)
    return tmp_path


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def _server(app_dir: Path, *args: str, port: int) -> Proc:
    return Proc(list(args), clean_env(), app_dir / f"server-{port}.log", port, cwd=app_dir)


# -- the two-workers trap --------------------------------------------------------------------


def test_uvicorn_workers_on_the_memory_broker_refuse_to_start(
    app_dir: Path, procs: list[Proc]
) -> None:
    port = free_port()
    proc = _server(
        app_dir, str(BIN / "uvicorn"), "app:app", "--workers", "2", "--port", str(port), port=port
    )
    procs.append(proc.start())
    proc.wait_exit()
    out = proc.output()
    assert TRAP in out and FIX in out, out[-3000:]
    # uvicorn stops every worker when one fails its start-up; nothing stays up half split
    assert proc.health() is None


def test_gunicorn_uvicorn_workers_on_the_memory_broker_refuse_to_start(
    app_dir: Path, procs: list[Proc]
) -> None:
    port = free_port()
    proc = _server(
        app_dir,
        str(BIN / "gunicorn"), "-w", "2", "-k", "uvicorn.workers.UvicornWorker",
        "-b", f"127.0.0.1:{port}", "app:app",
        port=port,
    )  # fmt: skip
    procs.append(proc.start())
    assert proc.wait_exit() == 3  # gunicorn: "Worker failed to boot"
    out = proc.output()
    assert TRAP in out and FIX in out, out[-3000:]


@pytest.mark.parametrize("kind", ["uvicorn --reload", "gunicorn -w 1", "uvicorn --workers 1"])
def test_one_worker_is_not_mistaken_for_several(
    app_dir: Path, procs: list[Proc], kind: str
) -> None:
    """A single worker under a supervisor that holds the socket too is fine."""
    port = free_port()
    args = {
        "uvicorn --reload": [str(BIN / "uvicorn"), "app:app", "--reload", "--port", str(port)],
        "uvicorn --workers 1": [str(BIN / "uvicorn"), "app:app", "--workers", "1",
                                "--port", str(port)],
        "gunicorn -w 1": [str(BIN / "gunicorn"), "-w", "1", "-k", "uvicorn.workers.UvicornWorker",
                          "-b", f"127.0.0.1:{port}", "app:app"],
    }[kind]  # fmt: skip
    proc = _server(app_dir, *args, port=port)
    procs.append(proc.start())
    proc.wait_healthy()
    r = httpx.post(f"{proc.url}/api/publish", json={"channel": "c", "data": 1})
    assert r.json()["result"]["offset"] == 1
    assert TRAP not in proc.output()


SERVE_ON_FD = """
import os, socket, sys
import uvicorn
from tidings import create_app

sock = socket.socket(fileno=int(sys.argv[1]))
uvicorn.Server(uvicorn.Config(create_app(broker_url="memory://"), log_level="warning")).run(
    sockets=[sock]
)
"""


def test_a_sibling_worker_seen_later_fails_health(tmp_path: Path, procs: list[Proc]) -> None:
    """A pre-fork server whose first worker started before the others held the socket: that
    worker cannot refuse any more, so /health fails and an error is logged."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    try:
        first = Proc([sys.executable, "-c", SERVE_ON_FD, str(fd)], clean_env(),
                     tmp_path / "first.log", port)  # fmt: skip
        with first.log.open("ab") as out:
            first.popen = subprocess.Popen(
                first.args, env=first.env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,)
            )
        procs.append(first)
        first.wait_healthy()
        # a second worker of the same "server" (a child of this process holding the socket)
        second = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)"], pass_fds=(fd,)
        )
        try:
            first.wait_until(lambda: first.health() == 503, "/health failing", 30)
            body = httpx.get(f"{first.url}/health").json()
            assert TRAP in body["broker"]["error"] and FIX in body["broker"]["error"]
            assert TRAP in first.output()
        finally:
            second.kill()
            second.wait()
    finally:
        listener.close()


# -- tidings serve --workers -----------------------------------------------------------------


def test_serve_refuses_several_workers_on_the_memory_broker(tmp_path: Path) -> None:
    for how in (["--workers", "2"], []):
        proc = tidings_serve(tmp_path, "memory://", *how, env={"TIDINGS_WORKERS": "3"}).start()
        assert proc.wait_exit() == 2
        out = " ".join(proc.output().split())  # rich wraps long lines
        assert "needs a broker that joins processes" in out and "redis://" in out, out
        assert "Traceback" not in out


def _workers(proc: Proc) -> dict[int, int]:
    """worker index -> pid of the worker that serves now, from the supervisor's log."""
    serving: dict[int, int] = {}
    for index, pid in re.findall(r"worker (\d+) \(pid (\d+)\) serves", proc.output()):
        serving[int(index)] = int(pid)
    return serving


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with namespace(ENGINES["redis"]) as url:
        yield url


def test_workers_share_the_port_a_dead_one_comes_back_sigterm_stops_all(
    tmp_path: Path, procs: list[Proc], redis_url: str
) -> None:
    """Two workers on one port (Redis joins them); SIGKILL one: another takes its place;
    SIGTERM to the supervisor stops everything with status 0."""
    proc = tidings_serve(tmp_path, redis_url, "--workers", "2")
    procs.append(proc.start())
    proc.wait_until(lambda: len(_workers(proc)) == 2, "two workers serving", 60)
    first = _workers(proc)
    assert proc.health() == 200
    os.kill(first[0], signal.SIGKILL)
    proc.wait_until(lambda: _workers(proc).get(0, first[0]) != first[0], "worker 0 replaced", 60)
    assert f"worker 0 (pid {first[0]}) exited with code -9" in proc.output()
    assert proc.health() == 200
    now = _workers(proc)
    assert proc.stop() == 0
    assert not any(_alive(pid) for pid in now.values())


def test_workers_that_cannot_start_stop_the_command(tmp_path: Path) -> None:
    """A worker that fails before serving (here: no Redis there) ends `tidings serve --workers`
    with an error instead of being restarted forever."""
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    proc = tidings_serve(tmp_path, nowhere, "--workers", "2").start()
    try:
        assert proc.wait_exit() == 1
    finally:
        proc.stop()
    assert "before serving; stopping" in proc.output()


def test_a_port_in_use_is_refused_before_any_worker_starts(tmp_path: Path, redis_url: str) -> None:
    """With SO_REUSEPORT a worker could otherwise join whatever else listens there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = tidings_serve(tmp_path, redis_url, "--workers", "2", port=port).start()
        assert proc.wait_exit() == 2
        out = " ".join(proc.output().split())
        assert f"cannot listen on 127.0.0.1:{port}" in out, out
        assert "worker 0 started" not in out


def test_check_refuses_what_several_workers_cannot_serve() -> None:
    from tidings import Settings
    from tidings.serve.workers import WorkersError, check

    redis = "redis://127.0.0.1:6379/0"
    check(Settings(broker_url=redis, port=8000), 4)
    check(Settings(port=0), 1)  # one worker: anything goes
    for settings, workers, message in (
        (Settings(port=8000), 2, "memory:// keeps everything inside one process"),
        (Settings(broker_url="memory://shared", port=8000), 2, "needs a broker"),
        (Settings(broker_url=redis, port=0), 2, "fixed --port"),
        (Settings(broker_url=redis, port=8000), 0, "at least 1"),
    ):
        with pytest.raises(WorkersError, match=message):
            check(settings, workers)


WITHOUT_REUSEPORT = """
import sys
import tidings.serve.workers
from tidings.cli import main

tidings.serve.workers.reuse_port_available = lambda: False  # as on a system without SO_REUSEPORT
sys.argv = ["tidings", *sys.argv[1:]]
main()
"""


def test_without_so_reuseport_the_supervisor_shares_one_socket(
    tmp_path: Path, procs: list[Proc], redis_url: str
) -> None:
    port = free_port()
    args = [sys.executable, "-c", WITHOUT_REUSEPORT, "serve", "--workers", "2",
            "--broker", redis_url, "--port", str(port)]  # fmt: skip
    proc = Proc(args, clean_env(), tmp_path / "shared.log", port)
    procs.append(proc.start())
    proc.wait_until(lambda: len(_workers(proc)) == 2, "two workers serving", 60)
    assert proc.health() == 200
    # one listening socket, held by the supervisor and both workers
    from tidings import processes

    held = [
        {
            inode
            for link in processes._fd_links(pid).values()
            if (inode := processes._socket_inode(link)) is not None
        }
        for pid in (proc.pid, *_workers(proc).values())
    ]
    assert set.intersection(*held)
    assert proc.stop() == 0


def test_children_found_by_scanning_proc_match_the_kernels_list() -> None:
    """The fallback for kernels without /proc/PID/task/TID/children finds the same pids."""
    from tidings import processes

    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
                for _ in range(2)]  # fmt: skip
    try:
        listed: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            listed.update(
                int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split()
            )
        assert {p.pid for p in sleepers} <= listed
        assert set(processes._children_by_scan(os.getpid())) == listed
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
