"""The protobuf flavour's codec without I/O, checked against another copy of the protocol: the
message classes centrifuge-python ships (its own generated ``client_pb2``)."""

from __future__ import annotations

import orjson
import pytest
from centrifuge.protocol import client_pb2 as sdk
from hypothesis import given
from hypothesis import strategies as st

from tidings.brokers.base import ClientInfo, JoinLeave, Publication
from tidings.errors import BadRequest, Disconnect, TooManyRequests
from tidings.frames import WsFrame, payload
from tidings.protocol import centrifuge_protobuf as pbwire
from tidings.protocol.centrifuge import CentrifugeEncoders


def delimited(*messages: object) -> bytes:
    return b"".join(pbwire.delimited(m.SerializeToString()) for m in messages)  # type: ignore[attr-defined]


def replies(data: bytes) -> list[sdk.Reply]:
    return [sdk.Reply.FromString(part) for part in pbwire.split(data)]


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip(n: int) -> None:
    body = b"x" * (n % 300)
    (back,) = pbwire.split(pbwire.varint(len(body)) + body)
    assert back == body
    encoded = pbwire.varint(n)
    value = shift = 0
    for byte in encoded:
        value |= (byte & 0x7F) << shift
        shift += 7
    assert value == n and not encoded[-1] & 0x80


def test_commands_decode_to_the_json_flavours_requests() -> None:
    connect = sdk.Command(id=1, connect=sdk.ConnectRequest(token="t", name="py"))
    sub = sdk.Command(
        id=2,
        subscribe=sdk.SubscribeRequest(
            channel="chat:a", recover=True, epoch="", offset=7, flag=2, join_leave=True
        ),
    )
    publish = sdk.Command(id=3, publish=sdk.PublishRequest(channel="chat:a", data=b'{"n":1}'))
    history = sdk.Command(
        id=4,
        history=sdk.HistoryRequest(
            channel="c", limit=10, since=sdk.StreamPosition(offset=3, epoch="e")
        ),
    )
    rpc = sdk.Command(id=5, rpc=sdk.RPCRequest(method="m", data=b"[1,2]"))
    pong = sdk.Command()
    cmds = pbwire.decode(delimited(connect, sub, publish, history, rpc, pong))
    assert [(c.id, c.method) for c in cmds if c] == [
        (1, "connect"),
        (2, "subscribe"),
        (3, "publish"),
        (4, "history"),
        (5, "rpc"),
    ]
    assert cmds[-1] is None  # an empty Command is a pong
    assert cmds[0] and cmds[0].request == {"token": "t", "name": "py"}
    assert cmds[1] and cmds[1].request == {
        "channel": "chat:a",
        "recover": True,
        "offset": 7,
        "flag": 2,
        "join_leave": True,
    }
    assert cmds[2] and orjson.dumps(cmds[2].request["data"]) == b'{"n":1}'  # spliced as is
    assert cmds[3] and cmds[3].request["since"] == {"offset": 3, "epoch": "e"}
    assert cmds[4] and cmds[4].request == {"method": "m", "data": [1, 2]}


def test_connect_subs_map_decodes_to_dicts() -> None:
    cmd = sdk.Command(id=1, connect=sdk.ConnectRequest())
    cmd.connect.subs["news"].recover = True
    cmd.connect.subs["news"].offset = 4
    (decoded,) = pbwire.decode(delimited(cmd))
    assert decoded and decoded.request == {"subs": {"news": {"recover": True, "offset": 4}}}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("{}", "text frame"),
        (b"\x05abc", "truncated message"),
        (b"\xff\xff", "truncated length prefix"),
        (b"\xff" * 11, "malformed length prefix"),
        (b"\x02\xff\xff", "invalid protobuf"),
        (pbwire.delimited(sdk.Command(id=0, ping=sdk.PingRequest()).SerializeToString()), "id"),
        (pbwire.delimited(sdk.Command(id=3).SerializeToString()), "unknown method"),
    ],
)
def test_malformed_input_closes_3501(frame: bytes | str, reason: str) -> None:
    with pytest.raises(Disconnect) as caught:
        pbwire.decode(frame)
    assert caught.value.code == 3501 and reason in caught.value.reason


def test_publish_data_must_be_json() -> None:
    cmd = sdk.Command(id=1, publish=sdk.PublishRequest(channel="c", data=b"\x00binary"))
    (refused,) = pbwire.decode(delimited(cmd))  # refused by its reply (107), not a close
    assert refused and isinstance(refused.error, BadRequest) and refused.error.code == 107
    raw_rpc = sdk.Command(id=2, rpc=sdk.RPCRequest(method="m", data=b"\x00binary"))
    (decoded,) = pbwire.decode(delimited(raw_rpc))
    assert decoded and decoded.request["data"] == b"\x00binary"  # an rpc handler gets bytes


def test_replies_decode_with_the_sdks_messages() -> None:
    pub = {"data": orjson.Fragment(b'{"a":1}'), "offset": 2, "info": {"user": "u", "client": "c"}}
    result = {
        "client": "abc",
        "version": "1",
        "ping": 25,
        "pong": True,
        "subs": {"news": {"recoverable": True, "epoch": "e", "offset": 2, "publications": [pub]}},
    }
    data = pbwire.reply(7, "connect", result)
    (reply,) = replies(data)
    assert reply.id == 7 and reply.connect.client == "abc" and reply.connect.ping == 25
    assert reply.connect.pong
    news = reply.connect.subs["news"]
    assert news.recoverable and news.epoch == "e" and news.offset == 2
    assert news.publications[0].data == b'{"a":1}' and news.publications[0].info.user == "u"
    (empty,) = replies(pbwire.reply(8, "ping", {}))
    assert empty.id == 8 and empty.HasField("ping")
    presence = {
        "presence": {"c1": {"user": "u", "client": "c1", "conn_info": orjson.Fragment(b"1")}}
    }
    (pres,) = replies(pbwire.reply(9, "presence", presence))
    assert pres.presence.presence["c1"].conn_info == b"1"
    (err,) = replies(pbwire.error_reply(10, TooManyRequests()))
    assert (err.id, err.error.code, err.error.temporary) == (10, 111, True)


def test_pushes_are_encoded_once_per_publication_per_variant() -> None:
    encoders = CentrifugeEncoders()
    pub = Publication("chat:a", b'{"x":1}', 3, "ep", ClientInfo("c", "u", b'{"n":"N"}'), {"k": "v"})
    plain, joined = encoders.protobuf, encoders.protobuf.encoder(True)
    first = plain.push(pub)
    assert joined.push(pub) is first  # one encoding for every protobuf subscriber
    assert isinstance(first, bytes) and not isinstance(first, WsFrame)
    (reply,) = replies(first)
    assert reply.push.channel == "chat:a"
    assert reply.push.pub.data == b'{"x":1}' and reply.push.pub.offset == 3
    assert reply.push.pub.info.conn_info == b'{"n":"N"}' and dict(reply.push.pub.tags) == {"k": "v"}
    framed = encoders.protobuf_framed.push(pub)
    assert isinstance(framed, WsFrame) and framed[0] == 0x82  # a complete binary frame
    assert payload(framed) == first
    # JSON subscribers have their own encoding, made once too
    assert encoders.text.push(pub) != first
    event = JoinLeave("chat:a", ClientInfo("c", "u"), True)
    assert plain.join_leave(event) is None
    (join,) = replies(joined.join_leave(event))  # type: ignore[arg-type]
    assert join.push.join.info.client == "c"


def test_pack_and_ping() -> None:
    encoders = CentrifugeEncoders()
    a, b = pbwire.reply(1, "ping", {}), pbwire.reply(2, "ping", {})
    (packed,) = encoders.protobuf.pack([a, b])
    assert [r.id for r in replies(packed)] == [1, 2]  # type: ignore[arg-type]
    pub = Publication("c", b"1", 1, "e")
    pushed = encoders.protobuf_framed.push(pub)
    batch = [a, pushed]
    (frame,) = encoders.protobuf_framed.pack(batch)
    assert isinstance(frame, WsFrame) and frame[0] == 0x82
    assert [r.id for r in replies(payload(frame))] == [1, 0]
    assert encoders.protobuf_framed.pack(list(batch))[0] is frame  # same batch: packed once
    assert encoders.protobuf.ping() == b"\x00"
    assert replies(b"\x00") == [sdk.Reply()]
