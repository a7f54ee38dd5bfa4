"""Brokers side by side: tidings and FastAPI + broadcaster on the same engine, two nodes each.

  python -m bench.brokers --broker redis://127.0.0.1:6379/9
  python -m bench.brokers --broker postgresql://postgres@127.0.0.1/test \\
      --broadcast-url postgres://postgres@127.0.0.1/test
  python -m bench.brokers --broker memory://            # one node each: no broker to cross

For each server, through the shared harness (``../shared/bench/fanout.py``), with node A taking
the HTTP publishes and node B holding the subscribers (bench/two_nodes.py), so every delivery
crosses the broker:

* ``latency``: ``--subs`` subscribers (100) on one channel, ``--rate-messages`` publications at
  10/s: p50 and p99 of publish-on-A to receive-on-B;
* ``throughput``: one subscriber on each of ``--channels`` channels (1,000), ``--messages``
  publications to every channel as fast as the publisher gets answers (``--inflight`` 16
  requests in flight): publications/s accepted and delivered, and how many were lost.

``--broadcast-url`` is broadcaster's URL for the same engine (default: ``--broker`` without its
query string; ``none`` skips broadcaster). A ``memory://`` broker runs one node per server.
Results: one JSON line per run in ``--out`` (default ``bench/results/brokers-<time>/``) and a
table on stdout. The machine is shared by servers, clients and the broker: compare within a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import ROOT, shared_dir

PY = sys.executable
SHARED = shared_dir()
RAW_SUB = "ws://127.0.0.1:{port}/ws/{topic}"
PUB = "http://127.0.0.1:{port}/publish/{topic}"
ENV = ["TIDINGS_MAX_CONNECTIONS=100000", "TIDINGS_DEMO=false"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def servers(broker: str, broadcast: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, fanout.py spec) for tidings and broadcaster on the engine of ``broker``."""
    engine = urlsplit(broker).scheme.replace("+", "_")
    one_node = engine == "memory"
    plan: list[tuple[str, dict[str, Any]]] = []
    for server, url in (("tidings", broker), ("broadcaster", broadcast)):
        if url is None:
            continue
        if one_node:
            if server == "tidings":
                cmd = (f"{PY} -m tidings.cli serve --host 127.0.0.1 --port {{port}} "
                       "--log-level warning")  # fmt: skip
                env = [*ENV, f"TIDINGS_BROKER_URL={url}"]
            else:
                cmd = (f"{PY} -m uvicorn --app-dir {SHARED / 'peers'} seed2_broadcaster:app "
                       "--host 127.0.0.1 --port {port} --loop uvloop --http httptools "
                       "--log-level warning")  # fmt: skip
                env = [f"BROADCAST_URL={url}"]
            plan.append((f"{server}_{engine}_1node", {"cmd": cmd, "pub": PUB, "env": env}))
        else:
            pub_port = _free_port()
            cmd = (f"{PY} {ROOT / 'bench' / 'two_nodes.py'} --server {server} --port {{port}} "
                   f"--pub-port {pub_port} --broker {url}")  # fmt: skip
            pub = f"http://127.0.0.1:{pub_port}/publish/{{topic}}"
            plan.append((f"{server}_{engine}_2nodes", {"cmd": cmd, "pub": pub, "env": ENV}))
    return plan


def scenarios(args: argparse.Namespace) -> dict[str, list[str]]:
    return {
        "latency": ["-n", str(args.subs), "-m", str(args.rate_messages), "--rate", "10"],
        "throughput": ["-n", str(args.channels), "--topics", str(args.channels),
                       "-m", str(args.messages), "--inflight", str(args.inflight)],
    }  # fmt: skip


def run_one(label: str, spec: dict[str, Any], extra: list[str], out: Path, rep: int) -> None:
    cmd = [
        PY, str(SHARED / "fanout.py"), "--label", label, "--server-cmd", spec["cmd"],
        "--sub-url", RAW_SUB, "--pub-url", spec["pub"], "--flavor", "raw", *extra,
        "--json-out", str(out / f"{label}.jsonl"),
        "--server-log", str(out / f"{label}.rep{rep}.server.log"),
    ]  # fmt: skip
    for e in spec["env"]:
        cmd += ["--env", e]
    print(f"=== rep {rep} {label}", file=sys.stderr, flush=True)
    started = time.monotonic()
    rc = subprocess.call(cmd, cwd=SHARED, stdout=subprocess.DEVNULL)
    print(f"=== rc={rc} {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)


def table(out: Path) -> str:
    """Medians per label: the latency and throughput columns side by side."""
    rows: dict[str, dict[str, list[float]]] = {}
    for path in sorted(out.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            run = json.loads(line)
            server, _, scenario = run["label"].rpartition("__")
            cell = rows.setdefault(server, {})
            if scenario == "latency":
                keys = ("lat_p50_ms", "lat_p99_ms", "lost")
            else:
                keys = ("publish_rate_posts_s", "deliveries_per_s", "lost")
            for key in keys:
                if run.get(key) is not None:
                    cell.setdefault(f"{scenario}:{key}", []).append(float(run[key]))
    columns = [
        ("latency:lat_p50_ms", "p50 ms", "{:.1f}"),
        ("latency:lat_p99_ms", "p99 ms", "{:.1f}"),
        ("latency:lost", "lost", "{:.0f}"),
        ("throughput:publish_rate_posts_s", "publishes/s", "{:,.0f}"),
        ("throughput:deliveries_per_s", "delivered/s", "{:,.0f}"),
        ("throughput:lost", "lost", "{:.0f}"),
    ]
    lines = [
        "| server | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for server, cell in rows.items():
        values = []
        for key, _, fmt in columns:
            got = cell.get(key)
            values.append(fmt.format(statistics.median(got)) if got else "-")
        lines.append(f"| {server} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def broadcast_default(broker: str) -> str:
    parts = urlsplit(broker)
    if parts.scheme == "memory":
        return "memory://"
    return urlunsplit(parts._replace(query=""))


def run(args: argparse.Namespace) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = Path(args.out or ROOT / "bench" / "results" / f"brokers-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    broadcast = None if args.broadcast_url == "none" else (
        args.broadcast_url or broadcast_default(args.broker)
    )  # fmt: skip
    plan = servers(args.broker, broadcast)
    for rep in range(1, args.repeats + 1):
        for scenario, extra in scenarios(args).items():
            for name, spec in plan:
                run_one(f"{name}__{scenario}", spec, extra + args.extra, out, rep)
                time.sleep(args.pause)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--broker", required=True, help="tidings broker URL")
    ap.add_argument("--broadcast-url", help="broadcaster's URL for the same engine ('none': skip)")
    ap.add_argument("--subs", type=int, default=100, help="latency: subscribers (100)")
    ap.add_argument("--rate-messages", type=int, default=200, help="latency: messages at 10/s")
    ap.add_argument("--channels", type=int, default=1000, help="throughput: channels (1000)")
    ap.add_argument("--messages", type=int, default=100, help="throughput: messages per channel")
    ap.add_argument(
        "--inflight", type=int, default=16, help="throughput: publish requests in flight (16)"
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    ap.add_argument("--out", help="result directory")
    ap.add_argument("--table", help="print the table of an earlier result directory and exit")
    ap.add_argument("extra", nargs="*", help="more fanout.py options, after --")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.table:
        print(table(Path(args.table)))
        return 0
    if not (SHARED / "fanout.py").is_file():
        sys.exit(f"error: the shared benchmark harness is not at {SHARED}")
    out = run(args)
    print(f"results in {out}\n")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
