"""The control plane: its codec (I/O-free), and a node that receives bad control messages."""

from __future__ import annotations

import logging

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings import Hub, Settings, control
from tidings.brokers import create_broker
from tidings.control import (
    ControlError,
    DisconnectUser,
    RefreshUser,
    SubscribeUser,
    UnknownOp,
    UnsubscribeUser,
)

from .cfutil import SECRET, Raw, token
from .conftest import Serve

# -- encoding: the bytes the README documents ----------------------------------------------------


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (
            SubscribeUser(user="u", channel="news"),
            b'{"op":"subscribe","user":"u","client":"","channel":"news"}',
        ),
        (
            UnsubscribeUser(user="u", client="c1", channel="news"),
            b'{"op":"unsubscribe","user":"u","client":"c1","channel":"news"}',
        ),
        (
            RefreshUser(user="u", expire_at=1700000000),
            b'{"op":"refresh","user":"u","client":"","expire_at":1700000000,"expired":false}',
        ),
        (
            RefreshUser(user="u", client="c1", expired=True),
            b'{"op":"refresh","user":"u","client":"c1","expire_at":null,"expired":true}',
        ),
        (
            DisconnectUser(user="u"),
            b'{"op":"disconnect","user":"u","client":"","code":3503,"reason":"force disconnect"}',
        ),
        (
            DisconnectUser(user="u", client="c1", code=4000, reason="bye"),
            b'{"op":"disconnect","user":"u","client":"c1","code":4000,"reason":"bye"}',
        ),
    ],
)
def test_encode_writes_the_documented_bytes_and_decode_reads_them(
    message: control.ControlMessage, wire: bytes
) -> None:
    assert control.encode(message) == wire
    assert control.decode(wire) == message
    assert type(control.decode(wire)) is type(message)


texts = st.text(max_size=20)
channels = st.text(min_size=1, max_size=20)
messages = st.one_of(
    st.builds(SubscribeUser, user=texts, client=texts, channel=channels),
    st.builds(UnsubscribeUser, user=texts, client=texts, channel=channels),
    st.builds(
        RefreshUser,
        user=texts,
        client=texts,
        expire_at=st.none() | st.integers(0, 2**40),
        expired=st.booleans(),
    ),
    st.builds(
        DisconnectUser,
        user=texts,
        client=texts,
        code=st.integers(3000, 4999),
        reason=st.text(max_size=30),
    ),
)


@given(messages)
def test_every_message_survives_the_round_trip(message: control.ControlMessage) -> None:
    assert control.decode(control.encode(message)) == message


# -- decoding: lenient where the documented form is ----------------------------------------------


def test_decode_takes_missing_or_null_optional_fields_and_ignores_unknown_keys() -> None:
    assert control.decode(b'{"op":"subscribe","user":"u","channel":"x"}') == SubscribeUser(
        user="u", channel="x"
    )
    assert control.decode(
        b'{"op":"unsubscribe","user":"u","client":null,"channel":"x","added_later":[1]}'
    ) == UnsubscribeUser(user="u", channel="x")
    assert control.decode(b'{"op":"refresh","user":"u"}') == RefreshUser(user="u")
    assert control.decode(b'{"op":"refresh","user":"u","expire_at":1.5}') == RefreshUser(
        user="u", expire_at=1.5
    )
    # a disconnect without code and reason: 3503 and no reason, as nodes always read it
    assert control.decode(b'{"op":"disconnect","user":"u"}') == DisconnectUser(
        user="u", code=3503, reason=""
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[1,2]",
        b'"subscribe"',
        b"{}",
        b'{"op":1,"user":"u"}',
        b'{"op":"subscribe","channel":"x"}',  # no user
        b'{"op":"subscribe","user":7,"channel":"x"}',
        b'{"op":"subscribe","user":"u"}',  # no channel
        b'{"op":"unsubscribe","user":"u","channel":""}',
        b'{"op":"unsubscribe","user":"u","channel":["x"]}',
        b'{"op":"subscribe","user":"u","client":5,"channel":"x"}',
        b'{"op":"refresh","user":"u","expire_at":"soon"}',
        b'{"op":"refresh","user":"u","expire_at":true}',
        b'{"op":"refresh","user":"u","expired":"yes"}',
        b'{"op":"disconnect","user":"u","code":"3503"}',
        b'{"op":"disconnect","user":"u","code":true}',
        b'{"op":"disconnect","user":"u","code":999}',
        b'{"op":"disconnect","user":"u","code":1006}',
        b'{"op":"disconnect","user":"u","code":5000}',
        b'{"op":"disconnect","user":"u","reason":null}',
        b'{"op":"disconnect","user":"u","reason":"' + b"x" * 124 + b'"}',
    ],
)
def test_decode_refuses_what_is_not_a_valid_message(data: bytes) -> None:
    with pytest.raises(ControlError) as caught:
        control.decode(data)
    assert not isinstance(caught.value, UnknownOp)


def test_decode_names_an_unknown_op() -> None:
    with pytest.raises(UnknownOp) as caught:
        control.decode(b'{"op":"kick","user":"u"}')
    assert caught.value.op == "kick"


def test_messages_refuse_bad_fields_when_built_too() -> None:
    with pytest.raises(ControlError):
        DisconnectUser(user="u", code=70000)
    with pytest.raises(ControlError):
        SubscribeUser(user="u", channel="")
    with pytest.raises(ValueError):  # ControlError is a ValueError
        DisconnectUser(user="u", reason="é" * 62)


# -- a hub receiving control messages -------------------------------------------------------------


async def test_hub_ignores_bad_messages_logging_each_kind_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = Hub(create_broker("memory://"), Settings())
    seen: list[control.ControlMessage] = []

    def broken(message: control.ControlMessage) -> None:
        raise RuntimeError("a receiver's bug")

    hub.on_control_message(broken)
    hub.on_control_message(seen.append)
    caplog.set_level(logging.DEBUG, logger="tidings.hub")
    for data in [b"junk", b'{"op":"kick","user":"u"}', b"junk", b'{"op":"kick","user":"v"}']:
        hub.on_control(data)
    assert seen == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "ignoring a control message: not JSON",
        "ignoring a control message: unknown control op 'kick'",
    ]
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2
    hub.on_control(b'{"op":"subscribe","user":"u","channel":"x"}')
    # the broken receiver is logged, and the next one still gets the message
    assert seen == [SubscribeUser(user="u", channel="x")]
    assert any("control handler" in r.getMessage() for r in caplog.records)


async def test_node_survives_bad_control_messages_and_acts_on_the_next_good_one(
    serve: Serve,
) -> None:
    srv = await serve(token_hmac_secret=SECRET, namespaces={"srv": {}})
    broker = srv.hub.broker
    c = await Raw.open(srv.ws)
    client_id = (await c.connect(token=token("alice")))["client"]
    for junk in [
        b"\xff\xfe",
        b"null",
        b'{"op":"subscribe","user":"alice"}',
        b'{"op":"subscribe","user":"alice","channel":"srv:x","client":{"id":1}}',
        b'{"op":"refresh","user":"alice","expire_at":"tomorrow"}',
        b'{"op":"disconnect","user":"alice","code":1005}',
        b'{"op":"shutdown","user":"alice"}',
    ]:
        await broker.publish_control(junk)
    message = SubscribeUser(user="alice", client=client_id, channel="srv:x")
    await broker.publish_control(control.encode(message))
    while not c.pushes:
        await c.read_frame()
    # nothing the bad messages asked for happened: the first push is the good subscribe's
    assert c.pushes == [{"push": {"channel": "srv:x", "subscribe": {}}}]
    await srv.hub.publish("srv:x", "still served")
    assert [p["data"] for p in await c.publications("srv:x", 1)] == ["still served"]
    await srv.hub.disconnect("alice", 4001, "bye")
    assert await c.closed() == (4001, "bye")


def test_bytes_are_json_a_node_of_another_language_can_read() -> None:
    data = control.encode(RefreshUser(user="ü", expire_at=1))
    assert orjson.loads(data)["user"] == "ü"
