"""JWT leeway, the per-user connection limit (3504) and the per-address connection rate
(HTTP 403 before the upgrade), on both server paths."""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tidings import Settings
from tidings.admission import MAX_ADDRESSES, ConnectionRate

from .cfutil import SECRET, Raw, token
from .conftest import Serve


async def test_token_leeway_accepts_a_token_expired_within_it(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, token_leeway=60)
    late = token(ttl=-5)  # expired 5 s ago: a client whose clock runs behind
    c = await Raw.open(srv.ws)
    connected = await c.connect(token=late)
    assert connected["client"]
    assert connected["expires"] is True
    await c.close()
    early = token(ttl=3600, nbf=int(time.time()) + 20)  # valid from 20 s on
    c = await Raw.open(srv.ws)
    assert (await c.connect(token=early))["client"]
    await c.close()


async def test_without_leeway_an_expired_token_is_error_109(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET)
    c = await Raw.open(srv.ws)
    answer = await c.call("connect", token=token(ttl=-5))
    assert answer["error"]["code"] == 109
    await c.close()


async def test_token_leeway_is_bounded_beyond_the_leeway(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, token_leeway=10)
    c = await Raw.open(srv.ws)
    answer = await c.call("connect", token=token(ttl=-60))
    assert answer["error"]["code"] == 109
    await c.close()


async def test_user_connection_limit_closes_3504_on_both_endpoints(serve: Serve) -> None:
    srv = await serve(token_hmac_secret=SECRET, user_connection_limit=2)
    first, second = await Raw.open(srv.ws), await Raw.open(srv.ws)
    await first.connect(token=token("bob"))
    await second.connect(token=token("bob"))
    third = await Raw.open(srv.ws)
    await third.send({"connect": {"token": token("bob")}})
    assert await third.closed() == (3504, "connection limit")
    # another user is not counted against bob
    carol = await Raw.open(srv.ws)
    await carol.connect(token=token("carol"))
    # the raw endpoint counts the same connections
    async with websockets.connect(f"{srv.ws}/ws/news?token={token('bob')}") as raw:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(raw.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3504
    # one of bob's connections goes: bob may connect again
    await first.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(srv.hub.users.get("bob", ())) > 1:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    again = await Raw.open(srv.ws)
    assert (await again.connect(token=token("bob")))["client"]
    for c in (second, carol, again):
        await c.close()


async def test_connection_rate_per_ip_refuses_the_handshake_with_403(serve: Serve) -> None:
    # 1 connection per 1000 s: after the burst of 3, the next ones are refused
    srv = await serve(connection_rate_per_ip=0.001, connection_burst_per_ip=3)
    opened = [await websockets.connect(f"{srv.ws}/ws/news") for _ in range(2)]
    opened.append(await websockets.connect(f"{srv.ws}/connection/websocket"))
    for path in ("/ws/news", "/connection/websocket"):
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{srv.ws}{path}")
        assert refused.value.response.status_code == 403
    assert srv.tidings.admission is not None and srv.tidings.admission.refused == 2
    for ws in opened:  # the admitted ones are unaffected
        await ws.close()


def test_connection_rate_refills_and_tracks_bounded_addresses() -> None:
    now = [0.0]
    rate = ConnectionRate(2.0, 2, clock=lambda: now[0])
    scope = {"client": ("10.0.0.1", 1234)}
    assert rate.allow(scope) and rate.allow(scope)
    assert not rate.allow(scope)
    now[0] = 0.5  # one token back at 2 per second
    assert rate.allow(scope)
    assert not rate.allow(scope)
    assert rate.allow({"client": None})  # no address: not counted
    for i in range(MAX_ADDRESSES + 10):
        rate.allow({"client": (f"a{i}", 1)})
    assert len(rate.buckets) == MAX_ADDRESSES


def test_settings_names_and_defaults() -> None:
    s = Settings()
    assert (s.token_leeway, s.user_connection_limit, s.connection_rate_per_ip) == (0, 0, 0)
    assert s.connection_burst_per_ip == 20
