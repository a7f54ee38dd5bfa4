"""Private Redis deployments for tests: a 3-master Redis Cluster, and a master + replica watched
by a Sentinel, each on free loopback ports, started with the ``redis-server`` and
``redis-cli`` binaries (never the shared Redis on 6379, so a test may kill what it started).

Each is started once per test session, on first use, and stopped when the session ends."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .conftest import free_port

START_TIMEOUT = 60.0  # seconds


def _redis_cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout + done.stderr


def _until(predicate: object, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


@dataclass
class Servers:
    """redis-server processes started by a test; ``stop()`` ends them all."""

    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tidings-redis-")))
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, port: int, *args: str, config: Path | None = None) -> None:
        cmd = ["redis-server"] + ([str(config)] if config else [])
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory), *args]  # fmt: skip
        log = (self.directory / f"redis-{port}.log").open("ab")
        self.procs[port] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _until(lambda: "PONG" in _redis_cli(port, "PING"), f"redis-server on {port}")

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Cluster:
    servers: Servers
    ports: list[int]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)


@dataclass
class Sentinel:
    servers: Servers
    master: int
    replica: int
    sentinel: int
    service: str = "tidings"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel}/{self.service}/0"


def start_cluster(masters: int = 3) -> Cluster:
    servers = Servers()
    ports = [free_port() for _ in range(masters)]
    try:
        for port in ports:
            servers.start(
                port,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000",
                "--cluster-port", str(free_port()),  # port + 10000 may not exist
            )  # fmt: skip
        nodes = [f"127.0.0.1:{p}" for p in ports]
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")
        for port in ports:
            _until(
                lambda port=port: "cluster_state:ok" in _redis_cli(port, "CLUSTER", "INFO"),
                f"cluster node {port} ok",
            )
    except BaseException:
        servers.stop()
        raise
    return Cluster(servers, ports)


def start_sentinel() -> Sentinel:
    servers = Servers()
    master, replica, sentinel = free_port(), free_port(), free_port()
    try:
        servers.start(master)
        servers.start(replica, "--replicaof", "127.0.0.1", str(master))
        _until(
            lambda: "master_link_status:up" in _redis_cli(replica, "INFO", "replication"),
            "replica in sync",
        )
        config = servers.directory / "sentinel.conf"
        config.write_text(
            f"sentinel monitor tidings 127.0.0.1 {master} 1\n"
            "sentinel down-after-milliseconds tidings 1000\n"
            "sentinel failover-timeout tidings 5000\n"
        )
        servers.start(sentinel, "--sentinel", config=config)
        _until(
            lambda: str(master) in _redis_cli(sentinel, "SENTINEL", "get-master-addr-by-name",
                                              "tidings"),
            "sentinel knows the master",
        )  # fmt: skip
    except BaseException:
        servers.stop()
        raise
    return Sentinel(servers, master, replica, sentinel)


_started: dict[str, Cluster | Sentinel] = {}


def shared_cluster() -> Cluster:
    """The session's private Redis Cluster, started on first use."""
    if "cluster" not in _started:
        _started["cluster"] = start_cluster()
        atexit.register(_started["cluster"].servers.stop)
    found = _started["cluster"]
    assert isinstance(found, Cluster)
    return found


def shared_sentinel() -> Sentinel:
    """The session's private master + replica + Sentinel, started on first use."""
    if "sentinel" not in _started:
        _started["sentinel"] = start_sentinel()
        atexit.register(_started["sentinel"].servers.stop)
    found = _started["sentinel"]
    assert isinstance(found, Sentinel)
    return found


def available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None
