"""Start-up time of the client commands: ``tidings publish``, ``token``, ``subscribe --help``.

  .venv/bin/python bench/cli_startup.py [--runs 20]

Runs each command ``--runs`` times as a user's shell does (a fresh ``python -m tidings.cli``
process each time), against a local `tidings serve` it starts itself for ``publish``, and prints
the median and the fastest wall-clock time per command, plus the same for ``python -c pass``
(the interpreter's own start-up, which no command can go below). The target (issue 14) is
under 0.3 s for ``publish``. Which modules the commands import is asserted by
``tests/test_cli_ux.py`` (no FastAPI, uvicorn, pydantic-settings or httpx); this script only
measures. Results go to bench/RESULTS.md with the date and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

CLI = [sys.executable, "-m", "tidings.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(args: list[str], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(args, env=_env(), capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed: {done.stderr.decode()}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [*CLI, "serve", "--port", str(port), "--log-level", "warning"],
        env=_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "tidings publish": [*CLI, "publish", "news", "hi", "--url", url],
            "tidings token": [*CLI, "token", "--user", "alice", "--secret", "s" * 32],
            "tidings subscribe --help": [*CLI, "subscribe", "--help"],
            "tidings serve --help": [*CLI, "serve", "--help"],
        }
        load = os.getloadavg()
        print(f"{runs} runs each; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(f"{'command':<26} {'median s':>9} {'min s':>7}")
        for name, args in commands.items():
            times = _timed(args, runs)
            print(f"{name:<26} {statistics.median(times):>9.3f} {min(times):>7.3f}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
