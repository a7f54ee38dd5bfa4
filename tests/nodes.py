"""Real server processes for tests: `tidings serve` (one node or a supervisor of workers),
uvicorn and gunicorn, each started as a user would, with its output kept in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .conftest import free_port

START_TIMEOUT = 60.0  # seconds a server gets to answer /health (the machine may be loaded)
BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without TIDINGS_* (the test says what it wants), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Proc:
    """A server process; its stdout and stderr go to ``log``."""

    args: Sequence[str]
    env: dict[str, str]
    log: Path
    port: int
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                list(self.args), env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``predicate`` until true; fail naming ``what`` (with the output) if the process
        exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.popen is not None and self.popen.poll() is not None:
                raise AssertionError(
                    f"{what}: exited with {self.popen.returncode}\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout}s\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def health(self) -> int | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> Proc:
        self.wait_until(lambda: self.health() == 200, f"{self.args[:3]} healthy", timeout)
        return self

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"did not exit within {timeout}s\n{self.output()[-3000:]}"
            ) from None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def tidings_serve(
    tmp: Path,
    broker_url: str,
    *args: str,
    port: int | None = None,
    name: str = "node",
    env: dict[str, str] | None = None,
) -> Proc:
    """``tidings serve --broker URL --port P ...`` (not yet started)."""
    port = port or free_port()
    cmd = [str(BIN / "tidings"), "serve", "--broker", broker_url, "--port", str(port), *args]
    return Proc(cmd, clean_env(**(env or {})), tmp / f"{name}-{port}.log", port)
