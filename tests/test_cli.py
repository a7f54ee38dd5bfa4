"""`tidings serve`, `tidings publish` and `tidings subscribe` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from .clirun import running
from .conftest import free_port

CLI = [sys.executable, "-m", "tidings.cli"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_server(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--log-level", "warning"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_healthy(url: str) -> None:
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("tidings serve did not come up")


@pytest.fixture
def server() -> Iterator[str]:
    port = free_port()
    proc = start_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def tidings(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=_env(), capture_output=True, text=True, timeout=30)


def _connections(url: str) -> int:
    return int(httpx.get(f"{url}/health").json()["connections"])


def test_publish_subscribe_round_trip(server: str) -> None:
    sub = subprocess.Popen(
        [*CLI, "subscribe", "news", "--url", server, "--count", "3"],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(200):
            if _connections(server) == 1:
                break
            time.sleep(0.05)
        for args in [["hello"], ['{"n": 1}'], ["[1, 2]", "--text"]]:
            done = tidings("publish", "news", *args, "--url", server)
            assert done.returncode == 0, done.stderr
            assert "published to news: offset" in done.stderr
        out, _ = sub.communicate(timeout=30)
    finally:
        sub.kill()
    assert out.splitlines() == ["hello", '{"n":1}', "[1, 2]"]
    assert sub.returncode == 0


def test_publish_reports_api_errors(server: str) -> None:
    done = tidings("publish", "nope:x", "1", "--url", server)
    assert done.returncode == 2
    assert "unknown channel namespace" in done.stderr


def test_serve_refuses_public_address_in_dev_mode() -> None:
    done = tidings("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2
    assert "--insecure" in done.stderr


def test_subscribe_keeps_retrying_until_the_server_is_back() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("subscribe", "news", "--url", url, "--count", "1") as sub:
        sub.wait("cannot connect", count=2)  # a few failed attempts while nothing listens
        proc = start_server(port)
        try:
            sub.wait("^subscribed to news")  # its backoff brings it back on its own
            assert tidings("publish", "news", "back", "--url", url).returncode == 0
            assert sub.finish() == 0
        finally:
            proc.terminate()
            proc.wait(10)
    assert sub.out == ["back"]
