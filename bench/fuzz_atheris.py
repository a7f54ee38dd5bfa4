"""The long fuzz run: atheris (libFuzzer, coverage-guided) over the Centrifugo protocol.

    pip install atheris            # not a dev dependency: a wheel for CPython on Linux x86-64
    python -m bench.fuzz_atheris [--fast] [--seconds 180] [libFuzzer options...]

A tidings server runs in a thread of this process (stock uvicorn, or ``--fast``: `tidings
serve`'s own protocols) with tidings instrumented for coverage. Each input becomes one or two
WebSocket frames on a new ``/connection/websocket`` connection (a connect first, mostly), then
a sentinel command; the exchange must end with the sentinel's reply or a documented close
(``tests/fuzzutil.py``: never error 100, close 1011, or a connection dropped without a close
frame) and log no error or traceback. Any other outcome is a crash: libFuzzer stops and saves
the input. Every 500 inputs, and at the end, the frames tried and the outcomes by code are
written to ``bench/results/fuzz_atheris[_fast].json`` and stderr; bench/RESULTS.md has a
run's figures.

Inputs are read three ways, chosen by the first byte: raw bytes as a text or binary frame;
a known-good command with bytes overwritten; or a command assembled field by field (a method,
an id, keys and values of any JSON type, huge numbers, nested arrays).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["tidings"]):
    from tests.fuzzutil import ThreadServer, exchange, recording

    from tidings.protocol import centrifuge as wire

TEMPLATES = [
    b'{"id":2,"subscribe":{"channel":"news","recover":true,"offset":1,"epoch":"x"}}',
    b'{"id":2,"publish":{"channel":"news","data":{"a":[1,2,3]}}}',
    b'{"id":2,"history":{"channel":"news","limit":10,"since":{"offset":0,"epoch":""}}}',
    b'{"id":2,"presence":{"channel":"news"}}\n{"id":3,"presence_stats":{"channel":"news"}}',
    b'{"id":2,"rpc":{"method":"m","data":null}}\n{"send":{"data":"x"}}',
    b'{"id":2,"unsubscribe":{"channel":"news"}}\n{}',
    b'{"id":2,"refresh":{"token":"a.b.c"}}\n{"id":3,"sub_refresh":{"channel":"c","token":""}}',
]
KEYS = ["channel", "data", "offset", "epoch", "recover", "limit", "since", "reverse", "method",
        "token", "recoverable", "positioned", "join_leave", "subs"]  # fmt: skip
METHODS = [*wire.METHODS, "nope"]

OUTCOMES: Counter[str] = Counter()
STATS = {"inputs": 0, "frames": 0, "started": time.time()}
SUMMARY = [Path(__file__).parent / "results" / "fuzz_atheris.json"]
PORT = 0


def _value(fdp: Any, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 8)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
    if kind == 3:
        return fdp.ConsumeRegularFloat()
    if kind in (4, 5):
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    if kind == 6 and depth < 8:
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 7 and depth < 8:
        return {fdp.PickValueInList(KEYS): _value(fdp, depth + 1) for _ in range(3)}
    return "[" * fdp.ConsumeIntInRange(0, 120)


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 15)
    out: list[tuple[int, bytes]] = []
    if fdp.ConsumeIntInRange(0, 9):
        out.append((0x1, b'{"id":1,"connect":{}}'))
    if mode < 4:
        opcode = 0x2 if mode == 0 else 0x1
        out.append((opcode, fdp.ConsumeBytes(fdp.remaining_bytes())))
    elif mode < 9:
        body = bytearray(fdp.PickValueInList(TEMPLATES))
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            body[fdp.ConsumeIntInRange(0, len(body) - 1)] = fdp.ConsumeInt(1) & 0xFF
        out.append((0x1, bytes(body)))
    else:
        commands = []
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            request = {fdp.PickValueInList(KEYS): _value(fdp) for _ in range(3)}
            command: dict[str, Any] = {fdp.PickValueInList(METHODS): request}
            if fdp.ConsumeIntInRange(0, 9):
                command["id"] = fdp.ConsumeIntInRange(-5, 2**63 - 1)
            commands.append(json.dumps(command).encode())
        out.append((0x1, b"\n".join(commands)))
    return out


def report() -> None:
    elapsed = time.time() - STATS["started"]
    summary = {**STATS, "seconds": round(elapsed), "outcomes": dict(OUTCOMES.most_common())}
    summary.pop("started")
    SUMMARY[0].parent.mkdir(exist_ok=True)
    SUMMARY[0].write_text(json.dumps(summary, indent=1) + "\n")
    print(f"fuzz: {summary}", file=sys.stderr)


def one_input(data: bytes) -> None:
    sent = frames_of(data)
    with recording() as log:
        OUTCOMES[exchange(PORT, sent)] += 1
    if log.bad:
        raise AssertionError([r.getMessage() for r in log.bad])
    STATS["inputs"] += 1
    STATS["frames"] += len(sent) + 1  # and the sentinel
    if STATS["inputs"] % 500 == 0:
        report()


def main() -> None:
    global PORT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="tidings serve's own protocols")
    parser.add_argument("--seconds", type=int, default=180)
    args, rest = parser.parse_known_args()
    if args.fast:
        SUMMARY[0] = SUMMARY[0].with_name("fuzz_atheris_fast.json")
    server = ThreadServer(args.fast, max_message_size=2_000_000, max_commands_per_second=0)
    with server:
        PORT = server.port
        argv = [sys.argv[0], f"-max_total_time={args.seconds}", "-timeout=30", *rest]
        atheris.Setup(argv, one_input)
        try:
            atheris.Fuzz()
        finally:
            report()


if __name__ == "__main__":
    main()
