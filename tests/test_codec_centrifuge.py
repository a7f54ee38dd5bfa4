"""The Centrifugo JSON codec without I/O: frames in, commands out; results in, reply bytes out.

Modelled on python-websockets' ``tests/test_protocol.py``: nothing here opens a socket, so each
rule of the protocol is pinned to the exact text it reads or writes.
"""

from __future__ import annotations

import orjson

from tidings import Tidings
from tidings.brokers.base import ClientInfo, Publication
from tidings.connection import COMMANDS
from tidings.protocol import centrifuge as cf
from tidings.transport.frames import payload

from .cfutil import Raw
from .conftest import Serve

INFO = ClientInfo("c1", "ann", b'{"n":"Ann"}', b'{"role":"x"}')


def pub(offset: int, data: bytes = b'{"n":1}', channel: str = "ch") -> Publication:
    return Publication(channel, data, offset, "e", None)


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
