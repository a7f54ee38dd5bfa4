"""The Centrifugo JSON codec without I/O: frames in, commands out; results in, reply bytes out.

Modelled on python-websockets' ``tests/test_protocol.py``: nothing here opens a socket, so each
rule of the protocol is pinned to the exact text it reads or writes.
"""

from __future__ import annotations

import orjson
import pytest

from tidings import Tidings
from tidings.brokers.base import ClientInfo, JoinLeave, Publication
from tidings.connection import COMMANDS
from tidings.errors import (
    BadRequest,
    Disconnect,
    PermissionDenied,
    TidingsError,
    TooManyRequests,
)
from tidings.frames import WsFrame, payload
from tidings.protocol import centrifuge as cf

from .cfutil import Raw
from .conftest import Serve

INFO = ClientInfo("c1", "ann", b'{"n":"Ann"}', b'{"role":"x"}')


def pub(offset: int, data: bytes = b'{"n":1}', channel: str = "ch") -> Publication:
    return Publication(channel, data, offset, "e", None)


# -- frames in: commands out -----------------------------------------------------------------------


def test_one_frame_holds_several_commands_and_pongs_in_order() -> None:
    frame = '{"id":1,"connect":{"token":"t"}}\n{}\n\n  \n{"id":2,"subscribe":{"channel":"a"}}'
    assert cf.decode(frame) == [
        cf.Command(1, "connect", {"token": "t"}),
        None,  # a pong
        cf.Command(2, "subscribe", {"channel": "a"}),
    ]


def test_send_needs_no_id_and_every_other_method_does() -> None:
    assert cf.decode('{"send":{"data":{"x":1}}}') == [cf.Command(0, "send", {"data": {"x": 1}})]
    for method in cf.METHODS:
        if method != "send":
            with pytest.raises(Disconnect) as caught:
                cf.decode(orjson.dumps({method: {}}).decode())
            assert (caught.value.code, caught.value.reason) == (
                3501,
                "bad request: command id required",
            )
            assert cf.decode(orjson.dumps({"id": 9, method: {}}).decode()) == [
                cf.Command(9, method, {})
            ]


def test_the_first_known_method_field_names_the_command() -> None:
    # a command has one method field; unknown fields beside it are ignored, as Centrifugo does
    (command,) = cf.decode('{"id":3,"extra":1,"publish":{"channel":"c","data":[1]}}')
    assert command == cf.Command(3, "publish", {"channel": "c", "data": [1]})


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b'{"id":1,"connect":{}}', "bad request: binary frame on a JSON connection"),
        ("{not json", "bad request: invalid JSON"),
        ('{"id":1,"connect":{}}\n[1]', "bad request: a command must be a JSON object"),
        ('"connect"', "bad request: a command must be a JSON object"),
        ('{"id":1,"nope":{}}', "bad request: unknown method"),
        ('{"id":1,"connect":[]}', "bad request: connect must be an object"),
        ('{"id":1,"history":"x"}', "bad request: history must be an object"),
        ('{"id":-1,"connect":{}}', "bad request"),
        ('{"id":"1","connect":{}}', "bad request"),
    ],
)
def test_what_is_not_protocol_closes_with_3501(frame: str | bytes, reason: str) -> None:
    with pytest.raises(Disconnect) as caught:
        cf.decode(frame)
    assert (caught.value.code, caught.value.reason) == (3501, reason)


def test_request_fields() -> None:
    assert cf.channel_name({"channel": "news"}) == "news"
    for request in ({}, {"channel": ""}, {"channel": 5}):
        with pytest.raises(Disconnect) as caught:
            cf.channel_name(request)
        assert caught.value.code == 3501
    assert cf.non_negative(None, "offset") == 0
    assert cf.non_negative(7, "offset") == 7
    for value in (-1, True, "3", 1.5, cf.MAX_INTEGER + 1):
        with pytest.raises(BadRequest, match="offset must be a non-negative integer"):
            cf.non_negative(value, "offset")


# -- results in: reply bytes out ------------------------------------------------------------------


def test_replies_echo_the_id_under_the_method_name() -> None:
    assert cf.reply(4, "publish", {}) == '{"id":4,"publish":{}}'
    assert cf.reply(5, "rpc", {"data": orjson.Fragment(b'{"a":[1,2]}')}) == (
        '{"id":5,"rpc":{"data":{"a":[1,2]}}}'
    )


def test_error_replies_mark_temporary_errors() -> None:
    assert cf.error_reply(6, PermissionDenied()) == (
        '{"id":6,"error":{"code":103,"message":"permission denied"}}'
    )
    assert cf.error_reply(7, TooManyRequests()) == (
        '{"id":7,"error":{"code":111,"message":"too many requests","temporary":true}}'
    )
    assert cf.error_reply(8, TidingsError()) == (
        '{"id":8,"error":{"code":100,"message":"internal server error","temporary":true}}'
    )


def test_compact_drops_empty_fields_as_the_protobuf_json_form_does() -> None:
    assert cf.compact({"a": 0, "b": "", "c": None, "d": [], "e": {}, "f": False, "g": 1}) == {
        "g": 1
    }


def test_publication_splices_its_json_data_without_decoding_it() -> None:
    plain = Publication("ch", b'{"big": 1e400}', 0, "e", None)  # not even valid for a decoder
    assert orjson.dumps(cf.publication(plain)) == b'{"data":{"big": 1e400}}'
    full = Publication("ch", b'"hi"', 3, "e", INFO, {"k": "v"})
    assert orjson.dumps(cf.publication(full)) == (
        b'{"data":"hi","offset":3,"info":{"user":"ann","client":"c1",'
        b'"conn_info":{"n":"Ann"},"chan_info":{"role":"x"}},"tags":{"k":"v"}}'
    )


def test_pushes_name_their_channel_unless_they_have_none() -> None:
    body = {"code": 2000, "reason": "server unsubscribe"}
    assert cf.push("ch", "unsubscribe", body) == (
        '{"push":{"channel":"ch","unsubscribe":{"code":2000,"reason":"server unsubscribe"}}}'
    )
    assert cf.push("", "refresh", {"expires": True, "ttl": 60}) == (
        '{"push":{"refresh":{"expires":true,"ttl":60}}}'
    )


def test_text_encoder_pushes_publications_and_join_leave_events() -> None:
    plain = cf.CentrifugeEncoders().text
    assert plain.push(pub(1)) == '{"push":{"channel":"ch","pub":{"data":{"n":1},"offset":1}}}'
    event = JoinLeave("ch", INFO, join=True)
    assert plain.join_leave(event) is None  # subscribed without join/leave
    assert plain.encoder(True).join_leave(event) == (
        '{"push":{"channel":"ch","join":{"info":{"user":"ann","client":"c1",'
        '"conn_info":{"n":"Ann"},"chan_info":{"role":"x"}}}}}'
    )
    assert plain.encoder(True).join_leave(JoinLeave("ch", ClientInfo("c2", ""), join=False)) == (
        '{"push":{"channel":"ch","leave":{"info":{"client":"c2"}}}}'
    )
    assert plain.ping() == "{}"


def test_text_encoder_packs_queued_frames_into_one_newline_separated_frame() -> None:
    plain = cf.CentrifugeEncoders().text
    one = [cf.reply(1, "ping", {})]
    assert plain.pack(one) == one
    pushes = [plain.push(pub(1)), plain.push(pub(2))]
    (packed,) = plain.pack([one[0], *pushes])
    assert packed.split("\n") == [one[0], *pushes]
    assert [orjson.loads(line) for line in packed.split("\n")] == [
        {"id": 1, "ping": {}},
        {"push": {"channel": "ch", "pub": {"data": {"n": 1}, "offset": 1}}},
        {"push": {"channel": "ch", "pub": {"data": {"n": 1}, "offset": 2}}},
    ]


def test_framed_encoder_builds_each_push_as_one_complete_text_frame() -> None:
    encoders = cf.CentrifugeEncoders()
    built = encoders.framed.push(pub(1))
    assert isinstance(built, WsFrame) and built[:2] == bytes((0x81, len(built) - 2))
    assert payload(built).decode() == encoders.text.push(pub(1))
    assert encoders.framed.push(pub(1)) is not built  # another publication object: encoded anew
    reply = cf.reply(2, "ping", {})
    (packed,) = encoders.framed.pack([reply, built])
    assert payload(packed) == f"{reply}\n{encoders.text.push(pub(1))}".encode()


# -- encoders per hub -----------------------------------------------------------------------------


def test_two_hubs_encoders_share_no_state() -> None:
    """Each hub's encoders keep their own last push and last packed batch: what one hub encodes
    neither evicts nor replaces what the other cached."""
    one, two = cf.CentrifugeEncoders(), cf.CentrifugeEncoders()
    for a, b in [(one.text, two.text), (one.framed, two.framed)]:
        assert a is not b and a.encoder(True) is not b.encoder(True)
        assert a.encoder(False) is a and a.encoder(True).encoder(False) is a
        first, second = pub(1), pub(2)
        mine = a.push(first)
        theirs = b.push(second)
        assert b.push(second) is theirs
        assert a.push(first) is mine  # still cached: the other hub's push did not evict it
        assert a.encoder(True).push(first) is mine  # shared within one hub's pair
        assert orjson.loads(payload(mine) if isinstance(mine, bytes) else mine)["push"] == {
            "channel": "ch",
            "pub": {"data": {"n": 1}, "offset": 1},
        }
    reply = cf.reply(1, "ping", {})
    batch = [one.framed.push(pub(3)), reply]
    (packed,) = one.framed.pack(batch)
    (other,) = two.framed.pack([two.framed.push(pub(4)), reply])
    assert one.framed.pack(list(batch))[0] is packed  # not replaced by the other hub's batch
    assert other is not packed


async def test_every_tidings_has_its_own_encoders_and_its_clients_use_them(serve: Serve) -> None:
    a, b = await serve(), await serve()
    formats = []
    for srv in (a, b):
        c = await Raw.open(srv.ws)
        await c.connect()
        (session,) = srv.hub.sessions
        encoders = srv.tidings.centrifuge_endpoint.encoders
        assert session.format is encoders.wire_format(srv.fast)
        formats.append(session.format)
        await c.close()
    assert formats[0] is not formats[1]
    assert Tidings().centrifuge_endpoint.encoders is not Tidings().centrifuge_endpoint.encoders


def test_every_method_the_codec_accepts_has_a_command_handler() -> None:
    assert list(COMMANDS) == list(cf.METHODS)
