"""The raw `/ws/{channel}` codec without I/O: publications in, the frames subscribers get out."""

from __future__ import annotations

import orjson
import pytest

from tidings.brokers.base import ClientInfo, JoinLeave, Publication
from tidings.frames import WsFrame, payload
from tidings.protocol.raw import RAW_FRAMED, RAW_TEXT, raw_format, text_of


def pub(data: bytes) -> Publication:
    return Publication("ch", data, 1, "e", None)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b'"hello"', "hello"),  # a JSON string arrives as its value
        (b'"caf\\u00e9 \\"quoted\\""', 'café "quoted"'),  # escapes undone
        (b'"\xc3\xa9t\xc3\xa9"', "été"),
        (b'""', ""),
        (b'{"n": 1}', '{"n": 1}'),  # any other JSON value arrives as its bytes are
        (b"[1,2]", "[1,2]"),
        (b"42", "42"),
        (b"null", "null"),
    ],
)
def test_a_subscriber_sees_a_strings_value_and_any_other_json_as_is(data: bytes, text: str) -> None:
    assert text_of(data) == text
    assert RAW_TEXT.push(pub(data)) == text
    framed = RAW_FRAMED.push(pub(data))
    assert isinstance(framed, WsFrame) and payload(framed) == text.encode()


def test_framed_push_is_one_complete_text_frame_of_any_length() -> None:
    for size in (0, 125, 126, 65535, 65536):
        data = orjson.dumps("x" * size)
        frame = RAW_FRAMED.push(pub(data))
        assert frame[0] == 0x81  # FIN + text
        header = 2 if size < 126 else 4 if size < 65536 else 10
        assert len(frame) == header + size and payload(frame) == b"x" * size


def test_raw_has_no_join_leave_no_ping_and_packs_nothing_together() -> None:
    event = JoinLeave("ch", ClientInfo("c1", "ann"), join=True)
    for fmt in (RAW_TEXT, RAW_FRAMED):
        assert fmt.join_leave(event) is None
        assert fmt.ping() is None  # heartbeats are the transport's WebSocket pings
        frames = [fmt.push(pub(b'"a"')), fmt.push(pub(b'"b"'))]
        assert fmt.pack(frames) == frames  # one publication per frame, always


def test_raw_format_matches_the_transport() -> None:
    assert raw_format(True) is RAW_FRAMED
    assert raw_format(False) is RAW_TEXT
    # stateless (no slots, nothing cached): one instance may serve every hub in a process
    assert RAW_TEXT.__slots__ == () and RAW_FRAMED.__slots__ == ()
