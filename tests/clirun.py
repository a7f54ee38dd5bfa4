"""Running the ``tidings`` command as a user does: a real process, its output read line by line."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CLI = [sys.executable, "-m", "tidings.cli"]
WAIT = 30.0  # seconds to wait for an expected line before failing


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without TIDINGS_* variables (only what a test sets counts), wide
    enough that help text does not wrap mid-word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200", NO_COLOR="1", **extra)
    return env


def tidings(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``tidings ARGS`` to completion."""
    return subprocess.run(
        [*CLI, *args], env=env or clean_env(), capture_output=True, text=True, timeout=60
    )


class Lines:
    """A running ``tidings`` process whose stdout and stderr lines are collected as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._events: queue.Queue[None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((proc.stdout, self.out), (proc.stderr, self.err))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, into: list[str]) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            into.append(line.rstrip("\n"))
            self._events.put(None)
        self._events.put(None)

    def wait(self, pattern: str, stream: str = "err", count: int = 1) -> list[str]:
        """Wait until ``count`` lines of ``stream`` ("err"/"out") match ``pattern`` (a regex)."""
        lines = self.err if stream == "err" else self.out
        regex = re.compile(pattern)
        while True:
            done = not any(reader.is_alive() for reader in self._readers)
            found = [line for line in lines if regex.search(line)]
            if len(found) >= count:
                return found
            if done:
                raise AssertionError(
                    f"tidings exited ({self.proc.returncode}) before {pattern!r} on std{stream}:"
                    f"\nstdout: {self.out}\nstderr: {self.err}"
                )
            try:
                self._events.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(
                    f"no {pattern!r} on std{stream} within {WAIT} s:"
                    f"\nstdout: {self.out}\nstderr: {self.err}"
                ) from None

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the process to end by itself; its exit code."""
        code = self.proc.wait(timeout)
        return code


@contextmanager
def running(*args: str, env: dict[str, str] | None = None) -> Iterator[Lines]:
    """``tidings ARGS`` in the background; terminated (SIGTERM) at the end."""
    proc = subprocess.Popen(
        [*CLI, *args],
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield Lines(proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
