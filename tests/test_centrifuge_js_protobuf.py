"""centrifuge-js's protobuf build (``dist/centrifuge.protobuf.js`` of the npm ``centrifuge``
package, installed in tests/js) in a real Chromium, over ``websocket``: subscribe, receive, go
offline (``context.set_offline``), five publications meanwhile, back online: exactly those five,
once, in order, ``recovered: true``. On both server paths (the ``serve`` fixture's default and
``TIDINGS_TEST_FAST=1``)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .cfutil import SECRET, token
from .conftest import Running, Serve, npm_once
from .test_centrifuge_js import JS

BUNDLE = JS / "node_modules" / "centrifuge" / "dist" / "centrifuge.protobuf.js"
WAIT = 20_000  # ms, Playwright's unit: generous for a loaded machine, never a timing claim

SETUP = """
([url, token]) => {
  const seen = {pubs: [], subscribed: [], states: [], errors: [], subprotocol: null};
  window.seen = seen;
  const client = new Centrifuge(url, {token, protocol: 'protobuf'});
  client.on('connected', () => seen.states.push('connected'));
  client.on('connecting', () => seen.states.push('connecting'));
  client.on('error', ctx => seen.errors.push(String(ctx.error && ctx.error.message)));
  const sub = client.newSubscription('chat:pb', {recoverable: true});
  const text = new TextDecoder();
  sub.on('publication', ctx => seen.pubs.push({
    data: JSON.parse(text.decode(ctx.data)),  // protobuf: the payload arrives as bytes
    offset: ctx.offset,
    binary: ctx.data instanceof Uint8Array,
  }));
  sub.on('subscribed', ctx => seen.subscribed.push(
    {wasRecovering: ctx.wasRecovering, recovered: ctx.recovered}));
  sub.subscribe();
  client.connect();
  window.client = client;
}
"""


@pytest.fixture(scope="session")
def bundle() -> None:
    """The SDK's protobuf build in tests/js/node_modules (npm install on first use)."""
    npm_once(JS, BUNDLE)


@pytest.fixture
def browser(bundle: None, browser: Any) -> Any:
    """The shared Chromium (tests/conftest.py), with the SDK's protobuf build in place."""
    return browser


async def publish(srv: Running, data: Any) -> None:
    async with httpx.AsyncClient(base_url=srv.url, headers={"X-API-Key": "key"}) as http:
        r = await http.post("/api/publish", json={"channel": "chat:pb", "data": data})
        assert r.status_code == 200 and "result" in r.json(), r.text


async def test_protobuf_build_recovers_exactly_the_missed_publications(
    serve: Serve, browser: Any
) -> None:
    srv = await serve(
        token_hmac_secret=SECRET,
        api_key="key",
        namespaces={"chat": {"force_recovery": True, "allow_subscribe": "authenticated"}},
    )
    context = await browser.new_context()
    try:
        page = await context.new_page()
        page.set_default_timeout(WAIT)
        await page.goto(srv.url + "/health")  # an origin on the server, for the WebSocket
        await page.add_script_tag(path=str(BUNDLE))
        await page.evaluate(SETUP, [f"{srv.ws}/connection/websocket", token("browser")])
        await page.wait_for_function("window.seen.subscribed.length === 1")
        # the protobuf flavour was negotiated: one session, on the protobuf encoders
        (session,) = srv.hub.sessions
        assert session.format.protobuf is True

        await publish(srv, {"n": 0})
        await page.wait_for_function("window.seen.pubs.length === 1")

        await context.set_offline(True)
        await page.wait_for_function("window.seen.states.at(-1) === 'connecting'")
        for n in range(1, 6):
            await publish(srv, {"n": n})
        await context.set_offline(False)
        await page.wait_for_function("window.seen.subscribed.length === 2")
        await page.wait_for_function("window.seen.pubs.length >= 6")
        await publish(srv, {"n": "live"})  # once it is in, anything duplicated would be too
        await page.wait_for_function("window.seen.pubs.some(p => p.data.n === 'live')", polling=100)
        seen = await page.evaluate("window.seen")
    finally:
        await context.close()
    assert seen["subscribed"] == [
        {"wasRecovering": False, "recovered": False},
        {"wasRecovering": True, "recovered": True},
    ]
    assert [(p["data"]["n"], p["offset"]) for p in seen["pubs"]] == [
        *((n, n + 1) for n in range(6)),
        ("live", 7),
    ]
    assert all(p["binary"] for p in seen["pubs"])
