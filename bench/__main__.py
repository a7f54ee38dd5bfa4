"""``python -m bench``: tidings (fast path and ASGI path) next to the shared peers, in ONE run.

Reuses the shared harness in ``../shared/bench`` (fanout.py runs every measurement, its
run_matrix.py knows the peers and scenarios, summarize.py prints the table); nothing of it is
copied here. See bench/README.md for the exact commands.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import ROOT, shared_dir

SHARED = shared_dir()
PY = sys.executable


def _shared() -> Any:
    """The shared harness's run_matrix module (peers, scenarios, URL templates)."""
    if not (SHARED / "fanout.py").is_file():
        sys.exit(
            f"error: the shared benchmark harness is not at {SHARED} (expected "
            f"fanout.py, run_matrix.py, summarize.py and peers/ there, next to the repo root)"
        )
    sys.path.insert(0, str(SHARED))
    import run_matrix

    return run_matrix


RM = _shared()

TIDINGS = f"{PY} -m tidings.cli serve --host 127.0.0.1 --port {{port}} --log-level warning"
TIDINGS_ASGI = (
    f"{PY} -m uvicorn --factory tidings:create_app --host 127.0.0.1 --port {{port}} "
    "--loop uvloop --http httptools --ws websockets-sansio --log-level warning"
)
#: the README's mounted app (bench/readme_app.py) under `tidings run`, and under plain uvicorn
#: with the flags the shared peers run with (seed1_naive: run_matrix.UVICORN)
TIDINGS_RUN = (
    f"{PY} -m tidings.cli run bench.readme_app:app --app-dir {ROOT} --host 127.0.0.1 "
    "--port {port} --log-level warning"
)
TIDINGS_MOUNTED = (
    f"{PY} -m uvicorn bench.readme_app:app --app-dir {ROOT} --host 127.0.0.1 --port {{port}} "
    "--loop uvloop --http httptools --workers 1 --log-level warning"
)
CF_SUB = RM.CF_SUB
CF_PUB = RM.CF_PUB
TIDINGS_ENV = ["TIDINGS_MAX_CONNECTIONS=100000", "TIDINGS_DEMO=false"]

SERVERS: dict[str, dict[str, Any]] = {
    # tidings as `tidings serve` runs it: FastWebSocket, uvloop, httptools
    "tidings_fast": {"cmd": TIDINGS, "sub": RM.RAW_SUB, "flavor": "raw", "env": TIDINGS_ENV},
    # tidings through uvicorn's own WebSocket protocol: the path of an app mounted elsewhere
    "tidings_asgi": {"cmd": TIDINGS_ASGI, "sub": RM.RAW_SUB, "flavor": "raw", "env": TIDINGS_ENV},
    # the README's mounted app: under `tidings run`, and under plain uvicorn
    "tidings_run": {"cmd": TIDINGS_RUN, "sub": RM.RAW_SUB, "flavor": "raw", "env": TIDINGS_ENV},
    "tidings_mounted": {
        "cmd": TIDINGS_MOUNTED,
        "sub": RM.RAW_SUB,
        "flavor": "raw",
        "env": TIDINGS_ENV,
    },
    **RM.PEERS,
}
CENTRIFUGE = {
    "tidings_fast": {"cmd": TIDINGS, "sub": CF_SUB, "pub": CF_PUB, "flavor": "centrifuge",
                     "env": TIDINGS_ENV, "args": ["--pub-json"]},
    "tidings_asgi": {"cmd": TIDINGS_ASGI, "sub": CF_SUB, "pub": CF_PUB, "flavor": "centrifuge",
                     "env": TIDINGS_ENV, "args": ["--pub-json"]},
}  # fmt: skip
SCENARIOS: dict[str, list[str]] = {
    **RM.SCENARIOS,
    # memory: as many idle-ish connections as the fd limit allows (20,000 by default)
    "mem20k": ["-n", "20000", "-m", "5", "--procs", "2", "--connect-concurrency", "200"],
    # latency of the path itself: few subscribers, so the fan-out does not dominate
    "n10_rate10": ["-n", "10", "-m", "200", "--rate", "10"],
}
#: TIDINGS_BENCH_BASE=DIR (another checkout's ``src``, e.g. of the commit before a change)
#: adds ``tidings_fast_base`` and ``tidings_asgi_base``: the same servers importing tidings from
#: DIR, so a change and its parent are measured in one run, interleaved
BASE = os.environ.get("TIDINGS_BENCH_BASE", "")
for _table in (SERVERS, CENTRIFUGE):
    for _name in ("tidings_fast", "tidings_asgi"):
        _table[f"{_name}_base"] = {
            **_table[_name],
            "env": [*_table[_name]["env"], f"PYTHONPATH={BASE}"],
        }
DEFAULT_SERVERS = ["tidings_fast", "tidings_asgi", "raw_ceiling", "seed1_naive"]
DEFAULT_SCENARIOS = ["n1000", "n5000", "n1000_rate10", "topics1000"]


def _fd_limit() -> int:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _scenario_args(name: str) -> list[str]:
    args = list(SCENARIOS[name])
    if name == "mem20k":
        # server and clients each need one descriptor per connection, plus a few of their own
        # (`tidings serve` idles with 16: stdio, the listening socket, the event loop's)
        n = min(20000, _fd_limit() - 24)
        if n < 20000:
            print(
                f"note: mem20k runs {n} connections: the open-files limit is {_fd_limit()} "
                f"(`ulimit -n`), and the server needs one descriptor per connection plus its own",
                file=sys.stderr,
            )
        args[1] = str(n)
    return args


def _has_ws_route(cmd: str, env: list[str], path: str) -> bool:
    """Start ``cmd`` briefly and see whether a WebSocket handshake on ``path`` succeeds (the
    Centrifugo endpoint is on another branch until it is merged; a missing WebSocket route
    answers the handshake with 403 or 404)."""
    sys.path.insert(0, str(SHARED))
    import fanout
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = fanout.free_port()
    environ = {**os.environ, **dict(e.split("=", 1) for e in env)}
    proc = subprocess.Popen(
        shlex.split(cmd.format(port=port)),
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        fanout.wait_port("127.0.0.1", port, proc, 30)
        try:
            connect(f"ws://127.0.0.1:{port}{path}", open_timeout=5).close()
        except InvalidStatus:
            return False
        return True
    finally:
        proc.terminate()
        proc.wait(15)


REDIS_URL = os.environ.get("TIDINGS_BENCH_REDIS", "redis://127.0.0.1:6379/9")


def _redis_plan() -> list[tuple[str, dict[str, Any], str]]:
    """n1000_rate10 on one node with the Redis broker, and on two nodes (publish on A,
    subscribers on B): the difference in p50 is what crossing the broker adds."""
    import importlib.util
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(REDIS_URL)
    try:
        socket.create_connection((url.hostname, url.port or 6379), timeout=1).close()
    except OSError:
        print(f"skip redis: nothing answers at {REDIS_URL}", file=sys.stderr)
        return []
    if importlib.util.find_spec("tidings.brokers.redis") is None:
        print(
            "skip redis: the multi-node scenario needs tidings' Redis broker "
            "(tidings/brokers/redis.py), which is not in this build",
            file=sys.stderr,
        )
        return []
    sys.path.insert(0, str(SHARED))
    import fanout

    pub_port = fanout.free_port()
    env = [*TIDINGS_ENV, f"TIDINGS_BROKER_URL={REDIS_URL}"]
    one = {"cmd": TIDINGS, "sub": RM.RAW_SUB, "flavor": "raw", "env": env}
    two = {
        "cmd": f"{PY} {ROOT / 'bench' / 'two_nodes.py'} --port {{port}} "
        f"--pub-port {pub_port} --broker {REDIS_URL}",
        "sub": RM.RAW_SUB,
        "pub": f"http://127.0.0.1:{pub_port}/publish/{{topic}}",
        "flavor": "raw",
        "env": TIDINGS_ENV,
    }
    return [
        (name, spec, scenario)
        for scenario in ("n10_rate10", "n1000_rate10")
        for name, spec in (
            ("tidings_memory_1node", SERVERS["tidings_fast"]),
            ("tidings_redis_1node", one),
            ("tidings_redis_2nodes", two),
        )
    ]


def fanout_cmd(name: str, spec: dict[str, Any], scenario: str, out: Path, rep: int) -> list[str]:
    label = f"{name}__{scenario}"
    cmd = [
        PY, str(SHARED / "fanout.py"), "--label", label,
        "--server-cmd", spec["cmd"], "--sub-url", spec["sub"],
        "--pub-url", spec.get("pub", RM.PUB), "--flavor", spec["flavor"],
        *spec.get("args", []), *_scenario_args(scenario),
        "--json-out", str(out / f"{label}.jsonl"),
        "--server-log", str(out / f"{label}.rep{rep}.server.log"),
    ]  # fmt: skip
    for e in spec.get("env", []):
        cmd += ["--env", e]
    return cmd


WRK_BODY = "#1:1:" + "x" * 123
#: publications per request of the batch target
BATCH = 100
HTTP_TARGETS = {
    # (path, body, content type); /publish/{topic} is the shape every raw peer serves
    "publish": ("/publish/t0", WRK_BODY, "text/plain"),
    "api": ("/api/publish", json.dumps({"channel": "t0", "data": WRK_BODY}), "application/json"),
    # Centrifugo's batch: BATCH publishes in one request, answered in order
    "batch": (
        "/api/batch",
        json.dumps({"commands": [{"publish": {"channel": "t0", "data": WRK_BODY}}] * BATCH}),
        "application/json",
    ),
}


def http_publish(name: str, spec: dict[str, Any], out: Path, seconds: int) -> list[dict[str, Any]]:
    """Requests/s of the HTTP publish endpoints under wrk (1 thread, 8 keep-alive connections),
    with one WebSocket subscriber on the channel; server CPU µs per request from /proc."""
    import shutil
    import threading

    import fanout
    from websockets.sync.client import connect

    if shutil.which("wrk") is None:
        sys.exit("error: the http scenario needs wrk (apt-get install -y wrk)")
    port = fanout.free_port()
    environ = {**os.environ, **dict(e.split("=", 1) for e in spec.get("env", []))}
    log_path = out / f"{name}__http.server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            shlex.split(spec["cmd"].format(port=port)), env=environ, cwd=SHARED,
            stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    rows = []
    try:
        fanout.wait_port("127.0.0.1", port, proc, 30)
        ws = connect(f"ws://127.0.0.1:{port}/ws/t0", max_size=None)
        received = [0]

        def drain() -> None:
            try:
                for _ in ws:
                    received[0] += 1
            except Exception:
                pass

        threading.Thread(target=drain, daemon=True).start()
        for target, (path, body, ctype) in HTTP_TARGETS.items():
            if name in ("raw_ceiling", "seed1_naive") and target != "publish":
                continue  # these peers only have /publish/{topic}
            script = out / f"wrk_{target}.lua"
            script.write_text(
                f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                f'wrk.headers["Content-Type"] = "{ctype}"\n'
            )
            cpu0 = fanout.tree_cpu_s(proc.pid)
            res = subprocess.run(
                ["wrk", "-t1", "-c8", f"-d{int(seconds)}s", "-s", str(script),
                 f"http://127.0.0.1:{port}{path}"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            cpu = fanout.tree_cpu_s(proc.pid) - cpu0
            text = res.stdout
            rps = float(text.split("Requests/sec:")[1].split()[0])
            total = int(text.split(" requests in ")[0].split()[-1])
            bad = text.split("Non-2xx or 3xx responses:")
            non2xx = int(bad[1].split()[0]) if len(bad) > 1 else 0
            per = BATCH if target == "batch" else 1  # publications per request
            rows.append({"server": name, "target": f"POST {path}", "requests_per_s": rps,
                         "publishes_per_s": round(rps * per),
                         "server_cpu_us_per_request": round(cpu * 1e6 / max(total, 1), 1),
                         "server_cpu_us_per_publish": round(cpu * 1e6 / max(total * per, 1), 2),
                         "non_2xx": non2xx})  # fmt: skip
        ws.close()
        rows = [{**r, "subscriber_received": received[0]} for r in rows]
    finally:
        proc.terminate()
        proc.wait(15)
    return rows


def run(args: argparse.Namespace) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    out = Path(args.out or ROOT / "bench" / "results" / stamp).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, dict[str, Any], str]] = []
    for scenario in args.scenarios:
        if scenario == "http":
            sys.path.insert(0, str(SHARED))
            with open(out / "http.jsonl", "a") as f:
                for rep in range(args.repeats):
                    for name in args.servers:
                        if name in SERVERS and SERVERS[name]["flavor"] == "raw":
                            for row in http_publish(name, SERVERS[name], out, args.wrk_seconds):
                                f.write(json.dumps({**row, "rep": rep + 1}) + "\n")
                                print(row, file=sys.stderr, flush=True)
            continue
        if scenario == "inproc":
            import asyncio

            from bench.inproc import measure

            with open(out / "inproc.jsonl", "a") as f:
                for subs in (0, 1, 1000):
                    row = {"subscribers": subs, **asyncio.run(measure(subs=subs))}
                    f.write(json.dumps(row) + "\n")
                    print(row, file=sys.stderr, flush=True)
            continue
        if scenario == "redis":
            plan += _redis_plan()
            continue
        if scenario == "brokers":
            # bench/brokers.py for TIDINGS_BENCH_BROKERS (space-separated URLs; default: the
            # Redis URL): tidings and broadcaster, two nodes each, latency and throughput
            from bench import brokers

            for url in os.environ.get("TIDINGS_BENCH_BROKERS", REDIS_URL).split():
                options = brokers.parser().parse_args(["--broker", url, "--out", str(out)])
                options.repeats = args.repeats
                brokers.run(options)
                print(brokers.table(out), file=sys.stderr, flush=True)
            continue
        if scenario == "centrifuge":
            for name in args.servers:
                spec = CENTRIFUGE.get(name) or (
                    RM.PEERS.get(name) if name == "cf_fastapi" else None
                )
                if spec is None:
                    continue
                if name.startswith("tidings") and not _has_ws_route(
                    spec["cmd"], spec.get("env", []), "/connection/websocket"
                ):
                    print(
                        f"skip centrifuge/{name}: no WebSocket at /connection/websocket (the "
                        "Centrifugo endpoint is not in this build)",
                        file=sys.stderr,
                    )
                    continue
                for sc in ("n1000", "n5000"):
                    plan.append((name, spec, sc))
            continue
        for name in args.servers:
            if scenario == "mem20k" and name not in ("tidings_fast", "tidings_asgi", "raw_ceiling"):
                continue
            plan.append((name, SERVERS[name], scenario))
    for rep in range(1, args.repeats + 1):
        for name, spec, scenario in plan:
            cmd = fanout_cmd(name, spec, scenario, out, rep) + args.extra
            print(f"=== rep {rep} {name} {scenario}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            rc = subprocess.call(cmd, cwd=SHARED, stdout=subprocess.DEVNULL)
            print(f"=== rc={rc} {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)
            time.sleep(args.pause)
    return out


def table(out: Path) -> None:
    for extra in ("http.jsonl", "inproc.jsonl"):
        if (out / extra).is_file():
            print(f"\n{extra}:")
            print((out / extra).read_text())
    files = sorted(str(p) for p in out.glob("*__*.jsonl"))
    if not files:
        print("no results", file=sys.stderr)
        return
    subprocess.call([PY, str(SHARED / "summarize.py"), *files])
    client = {}
    for path in files:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            client.setdefault(r["label"], []).append(max(r["client_cpu_util"]))
    saturated = sorted(k for k, v in client.items() if max(v) >= 0.9)
    if saturated:
        print(f"\nclient >= 0.9 of a core (machine-bound) in: {', '.join(saturated)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--servers",
        nargs="+",
        default=DEFAULT_SERVERS,
        choices=sorted({*SERVERS, *CENTRIFUGE}),
        help=f"default: {' '.join(DEFAULT_SERVERS)}",
    )
    ap.add_argument(
        "--scenarios",
        nargs="+",
        default=DEFAULT_SCENARIOS,
        choices=[*SCENARIOS, "http", "inproc", "centrifuge", "redis", "brokers"],
        help=f"default: {' '.join(DEFAULT_SCENARIOS)}",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--wrk-seconds", type=int, default=5, help="http scenario: per target")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    ap.add_argument("--out", help="results directory (default bench/results/<UTC time>)")
    ap.add_argument("--table", metavar="DIR", help="only print the table of an earlier run")
    ap.add_argument("extra", nargs="*", help="extra fanout.py options, after --")
    args = ap.parse_args(argv)
    if not BASE and any(name.endswith("_base") for name in args.servers):
        ap.error("the *_base servers need TIDINGS_BENCH_BASE=DIR (the src/ of another checkout)")
    if args.table:
        table(Path(args.table))
        return 0
    out = run(args)
    print(f"results: {out}", file=sys.stderr)
    table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
