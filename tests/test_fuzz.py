"""Fuzzing the Centrifugo codec and command handling (hypothesis), on both server paths.

Random and mutated frames, wrong types, huge ids and offsets, nesting, invalid UTF-8, 10,000
commands in one frame: the server answers only with documented replies and close codes, logs
no traceback and no error, and a bystander connection keeps getting its publications. A
bounded run here (a few hundred frames per path); ``bench/fuzz_atheris.py`` is the long run.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.errors import Disconnect
from tidings.protocol import centrifuge as wire

from .fuzzutil import RawSync, ThreadServer, exchange, recording

METHODS = [*wire.METHODS, "nope", ""]
KEYS = [
    "channel", "data", "token", "offset", "epoch", "recover", "recoverable", "positioned",
    "limit", "since", "reverse", "method", "subs", "join_leave", "name", "version", "delta",
    "tags", "idempotency_key", "b64data",
]  # fmt: skip

huge_ints = st.one_of(
    st.integers(-(2**63), 2**64),
    st.sampled_from([0, -1, 2**31, 2**53 + 1, 2**63 - 1, 10**15, -(2**63)]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    huge_ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["news", "chat:x", "$private", "a" * 300, "dm#alice,bob", "", ":"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner, max_size=4),
    ),
    max_leaves=12,
)
# mostly well-formed, so that commands get past decoding and run (wrong types in the fields)
well_formed = st.builds(
    lambda channel, extra: {"channel": channel, **extra},
    st.sampled_from(["news", "c", "chat:x", "feed"]),
    st.dictionaries(st.sampled_from(KEYS[1:]), values, max_size=5),
)
requests = st.one_of(
    *[well_formed] * 6,
    *[st.dictionaries(st.sampled_from(KEYS), values, max_size=6)] * 3,
    values,
)
ids = st.one_of(
    *[st.integers(1, 1000)] * 16, huge_ints, st.text(max_size=4), st.none(), st.floats()
)


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    command: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:  # without an id: only send is valid
        command["id"] = draw(ids)
    method = draw(st.sampled_from([*wire.METHODS * 3, *METHODS]))
    command[method] = draw(requests)
    if draw(st.integers(0, 9)) == 0:  # two methods in one command
        command[draw(st.sampled_from(METHODS))] = draw(requests)
    return command


def encoded(command: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(command)
    except (TypeError, orjson.JSONEncodeError):  # ints past 64 bits: the json module's text
        return json.dumps(command).encode()


@st.composite
def frames(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """A connect (usually), then one fuzzed frame: commands, mutated, random or binary."""
    out: list[tuple[int, bytes]] = []
    if draw(st.integers(0, 9)) > 0:
        out.append((0x1, b'{"id":1,"connect":{}}'))
    kind = draw(st.sampled_from(["commands"] * 6 + ["mutated", "text", "bytes", "binary"]))
    if kind == "commands":
        body = b"\n".join(encoded(c) for c in draw(st.lists(commands(), min_size=1, max_size=4)))
        out.append((0x1, body))
    elif kind == "mutated":
        body = bytearray(encoded(draw(commands())))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(body) - 1))
            body[at] = draw(st.integers(0, 255))
        out.append((0x1, bytes(body)))  # often invalid UTF-8 in a text frame: 1007
    elif kind == "text":
        out.append((0x1, draw(st.text(max_size=200)).encode()))
    elif kind == "bytes":
        out.append((0x1, draw(st.binary(max_size=200))))
    else:
        out.append((0x2, draw(st.binary(max_size=200))))
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["uvicorn", "serve"])
def server(request: pytest.FixtureRequest) -> Iterator[ThreadServer]:
    # 10,000 commands in one frame must fit in a message; commands are not rate-limited here
    # (111 would answer most of them without running them)
    with ThreadServer(request.param, max_message_size=2_000_000, max_commands_per_second=0) as srv:
        yield srv
    print(f"\nfuzz outcomes ({request.node.name}):", dict(OUTCOMES))
    OUTCOMES.clear()


#: outcome -> count over the run (``pytest -s`` prints it at the end of each path's run)
OUTCOMES: Counter[str] = Counter()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=frames())
def test_fuzzed_frames_get_documented_answers(server: ThreadServer, sent: Any) -> None:
    errors: dict[int, int] = {}
    with recording() as log:
        OUTCOMES[exchange(server.port, sent, errors)] += 1
    for code, n in errors.items():
        OUTCOMES[f"error {code}"] += n
    assert not log.bad, [r.getMessage() for r in log.bad]


def test_ten_thousand_commands_in_one_frame(server: ThreadServer) -> None:
    body = b'{"id":1,"connect":{}}\n' + b"\n".join(
        b'{"id":%d,"%s":{"channel":"c%d","data":%d}}'
        % (i, b"publish" if i % 2 else b"subscribe", i % 300, i)
        for i in range(2, 10_002)
    )
    with recording() as log:
        assert exchange(server.port, [(0x1, body)]) == "replied"
    assert not log.bad, [r.getMessage() for r in log.bad]


def test_deeply_nested_data(server: ThreadServer) -> None:
    deep = b"[" * 300 + b"]" * 300
    body = b'{"id":1,"connect":{}}\n{"id":2,"publish":{"channel":"c","data":%s}}' % deep
    with recording() as log:
        exchange(server.port, [(0x1, body)])
    assert not log.bad, [r.getMessage() for r in log.bad]


def test_the_server_and_a_bystander_are_unaffected(server: ThreadServer) -> None:
    """Runs after the fuzzing on the same server: a subscriber gets a publication."""
    client = RawSync(server.port)
    try:
        client.send(0x1, b'{"id":1,"connect":{}}\n{"id":2,"subscribe":{"channel":"after"}}')
        client.send(0x1, b'{"id":3,"publish":{"channel":"after","data":"still here"}}')
        seen = b""
        while b"still here" not in seen or b'"id":3' not in seen:
            got = client.frame()
            assert got is not None and got[0] != 0x8, got
            seen += got[1]
    finally:
        client.close()


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
@settings(max_examples=300, deadline=None)
def test_codec_decodes_or_refuses_with_3501(frame: str | bytes) -> None:
    try:
        decoded = wire.decode(frame)
    except Disconnect as exc:
        assert exc.code in (3501, 1003) or exc.code >= 3000
        return
    for command in decoded:
        assert command is None or (command.method in wire.METHODS and command.id >= 0)
