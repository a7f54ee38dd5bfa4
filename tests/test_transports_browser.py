"""The fallback transports in a real Chromium: centrifuge-js (its browser bundle, from
``tests/js/node_modules``) over ``http_stream`` and ``sse`` goes offline, misses 5 publications
and gets exactly those back, once, in order, ``recovered: true``; an ``EventSource`` on
``uni_sse`` receives publications."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from .cfutil import SECRET, token
from .conftest import Serve, chromium
from .engines import WAIT
from .test_centrifuge_js import JS, node  # noqa: F401 (the fixture: npm install on first use)

BUNDLE = JS / "node_modules" / "centrifuge" / "dist" / "centrifuge.js"
API = {"x-api-key": "key"}
TIMEOUT_MS = WAIT * 1000


#: the SDK is installed in tests/js/node_modules first (npm install on first use)
pytestmark = pytest.mark.usefixtures("node")


@pytest.fixture
async def context() -> AsyncIterator[Any]:
    """A fresh browser context in Chromium: its own network switch (``set_offline``)."""
    async with chromium() as browser:
        yield await browser.new_context()


CLIENT = """
({base, transport, token, channel}) => {
  window.pubs = [];
  window.subscribed = [];
  const client = new Centrifuge(
    [{transport, endpoint: (transport === 'websocket' ? base.replace(/^http/, 'ws') : base)
      + '/connection/' + transport}],
    {token, emulationEndpoint: base + '/emulation'},
  );
  const sub = client.newSubscription(channel);
  sub.on('publication', (ctx) => window.pubs.push({data: ctx.data, offset: ctx.offset}));
  sub.on('subscribed', (ctx) => window.subscribed.push({
    recovered: ctx.recovered,
    wasRecovering: ctx.wasRecovering,
    transport: client._transport.name(),
  }));
  sub.subscribe();
  client.connect();
  window.client = client;
}
"""


async def publish(http: httpx.AsyncClient, channel: str, data: Any) -> int:
    r = await http.post("/api/publish", json={"channel": channel, "data": data}, headers=API)
    assert r.status_code == 200, r.text
    offset: int = r.json()["result"]["offset"]
    return offset


@pytest.mark.parametrize("transport", ["websocket", "http_stream", "sse"])
async def test_centrifuge_js_recovers_after_going_offline(
    serve: Serve, context: Any, transport: str
) -> None:
    srv = await serve(
        token_hmac_secret=SECRET, api_key="key", namespaces={"chat": {"force_recovery": True}}
    )
    channel = f"chat:{transport}"
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{srv.url}/health")
    await page.add_script_tag(path=str(BUNDLE))
    args = {"base": srv.url, "transport": transport, "token": token("js"), "channel": channel}
    await page.evaluate(CLIENT, args)
    await page.wait_for_function("window.subscribed.length === 1", timeout=TIMEOUT_MS)
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        first = await publish(http, channel, {"n": 0})
        await page.wait_for_function("window.pubs.length === 1", timeout=TIMEOUT_MS)

        await context.set_offline(True)
        await page.wait_for_function("window.client.state !== 'connected'", timeout=TIMEOUT_MS)
        missed = [await publish(http, channel, {"n": i}) for i in range(1, 6)]
        await context.set_offline(False)
        await page.wait_for_function("window.subscribed.length === 2", timeout=TIMEOUT_MS)
        await page.wait_for_function("window.pubs.length >= 6", timeout=TIMEOUT_MS)
        # one more, live: once it is in, anything duplicated before it would be too
        last = await publish(http, channel, {"n": 6})
        await page.wait_for_function("window.pubs.length >= 7", timeout=TIMEOUT_MS)

    offsets = [first, *missed, last]
    assert offsets == list(range(first, first + 7))
    pubs = await page.evaluate("window.pubs")
    assert pubs == [{"data": {"n": i}, "offset": offsets[i]} for i in range(7)]
    subscribed = await page.evaluate("window.subscribed")
    assert subscribed[0] == {"recovered": False, "wasRecovering": False, "transport": transport}
    assert subscribed[1] == {"recovered": True, "wasRecovering": True, "transport": transport}
    assert errors == []
    await page.evaluate("window.client.disconnect()")


async def test_event_source_on_uni_sse(serve: Serve, context: Any) -> None:
    srv = await serve(token_hmac_secret=SECRET, api_key="key")
    page = await context.new_page()
    await page.goto(f"{srv.url}/health")
    request = orjson.dumps({"token": token("es", channels=["news"])}).decode()
    await page.evaluate(
        """(request) => {
          window.messages = [];
          const url = '/connection/uni_sse?cf_connect=' + encodeURIComponent(request);
          const source = new EventSource(url);
          source.onmessage = (e) => {
            for (const line of e.data.split('\\n')) window.messages.push(JSON.parse(line));
          };
          window.source = source;
        }""",
        request,
    )
    await page.wait_for_function("window.messages.length >= 1", timeout=TIMEOUT_MS)
    async with httpx.AsyncClient(base_url=srv.url, timeout=WAIT) as http:
        offsets = [await publish(http, "news", {"n": i}) for i in range(3)]
    await page.wait_for_function(
        "window.messages.filter((m) => m.pub).length >= 3", timeout=TIMEOUT_MS
    )
    messages = await page.evaluate("window.messages")
    await page.evaluate("window.source.close()")
    assert "news" in messages[0]["connect"]["subs"]
    pubs = [m for m in messages if "pub" in m]
    assert pubs == [
        {"channel": "news", "pub": {"data": {"n": i}, "offset": offsets[i]}} for i in range(3)
    ]
