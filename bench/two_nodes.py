"""Two nodes on one broker, as one command for fanout.py's ``--server-cmd``.

  python -m bench.two_nodes --port SUBPORT --pub-port PUBPORT --broker redis://127.0.0.1:6379/9
  python -m bench.two_nodes ... --server broadcaster --broker redis://127.0.0.1:6379

Node A (``--pub-port``) takes the publishes, node B (``--port``, which fanout.py waits for)
holds the subscribers, so every delivery crosses the broker. fanout.py measures the CPU of this
process tree (both nodes); SIGTERM stops both. ``--server tidings`` (the default) runs
``tidings serve --broker URL``; ``--server broadcaster`` runs the shared FastAPI + broadcaster
peer (``../shared/bench/peers/seed2_broadcaster.py``, ``BROADCAST_URL=URL``) under uvicorn.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _wait(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"node on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"node on port {port} did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True, help="node B: subscribers")
    ap.add_argument("--pub-port", type=int, required=True, help="node A: publishes")
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--server", choices=["tidings", "broadcaster"], default="tidings")
    args = ap.parse_args()
    if args.server == "tidings":
        env = {**os.environ, "TIDINGS_BROKER_URL": args.broker}
    else:
        env = {**os.environ, "BROADCAST_URL": args.broker}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import shared_dir

    peers = shared_dir() / "peers"
    nodes = []
    for port in (args.pub_port, args.port):  # A first: B's open port means both are up
        if args.server == "tidings":
            cmd = [sys.executable, "-m", "tidings.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning"]  # fmt: skip
        else:
            cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(peers),
                   "seed2_broadcaster:app", "--host", "127.0.0.1", "--port", str(port),
                   "--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env)
        nodes.append(proc)
        _wait(port, proc)

    def stop(*_: object) -> None:
        for proc in nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in nodes:
            proc.wait(15)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(proc.poll() is None for proc in nodes):
        time.sleep(0.2)
    stop()


if __name__ == "__main__":
    main()
