"""One centrifuge-python scenario, run as a script so that any release of the SDK can run it
(``PYTHONPATH`` picks the release; tests/test_sdk_flavours.py runs it):

    python -m tests.sdk_scenario WS_URL HTTP_URL json|protobuf

connect (with a token about to expire), subscribe, publish, presence, history, recover after a
reconnect, token refresh. Prints ``ok <sdk version>`` and exits 0, or fails with a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import centrifuge
import httpx
import orjson
from centrifuge import (
    Client,
    ClientEventHandler,
    PublicationContext,
    SubscribedContext,
    SubscriptionEventHandler,
)

from .cfutil import token

WAIT = 10.0


class Events(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: asyncio.Queue[PublicationContext] = asyncio.Queue()
        self.subscribed: asyncio.Queue[SubscribedContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.pubs.put(ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        await self.subscribed.put(ctx)


def value(data: Any) -> Any:
    """A publication's data: the protobuf flavour hands over bytes, JSON a decoded value."""
    return orjson.loads(data) if isinstance(data, bytes) else data


async def main(ws: str, http_url: str, flavour: str) -> str:
    protobuf = flavour == "protobuf"
    refreshed = asyncio.Event()

    async def get_token() -> str:
        refreshed.set()
        return token("alice", ttl=3600)

    client = Client(
        f"{ws}/connection/websocket",
        events=ClientEventHandler(),
        token=token("alice", ttl=2, info={"name": "Alice"}),  # refreshed before it expires
        get_token=get_token,
        use_protobuf=protobuf,
        proxy=None,
    )

    async def publish(channel: str, data: Any) -> None:
        async with httpx.AsyncClient(base_url=http_url, headers={"X-API-Key": "key"}) as http:
            r = await http.post("/api/publish", json={"channel": channel, "data": data})
            assert r.status_code == 200 and "result" in r.json(), r.text

    async def next_pub(events: Events) -> Any:
        return (await asyncio.wait_for(events.pubs.get(), WAIT)).pub

    await client.connect()
    await asyncio.wait_for(client.ready(), WAIT)
    events = Events()
    sub = client.new_subscription("chat:lobby", events)
    await sub.subscribe()
    await asyncio.wait_for(sub.ready(), WAIT)
    first = await asyncio.wait_for(events.subscribed.get(), WAIT)
    assert first.recoverable and not first.was_recovering

    # publish: from the API and from the client itself
    await publish("chat:lobby", {"n": 1})
    assert value((await next_pub(events)).data) == {"n": 1}
    await sub.publish(orjson.dumps({"n": 2}) if protobuf else {"n": 2})
    got = await next_pub(events)
    assert value(got.data) == {"n": 2} and got.offset == 2, got
    assert got.info is not None and got.info.user == "alice"

    # presence and history
    presence = await sub.presence()
    assert [c.user for c in presence.clients.values()] == ["alice"], presence
    stats = await sub.presence_stats()
    assert (stats.num_clients, stats.num_users) == (1, 1), stats
    history = await sub.history(limit=-1)
    assert [value(p.data) for p in history.publications] == [{"n": 1}, {"n": 2}], history
    assert history.offset == 2

    # token refresh: the connection token expires in 2 s; the SDK asks get_token and refreshes
    await asyncio.wait_for(refreshed.wait(), WAIT)

    # recover after a reconnect: exactly the missed publications, once, in order
    await client.disconnect()
    for i in range(3):
        await publish("chat:lobby", f"missed {i}")
    await client.connect()
    again = await asyncio.wait_for(events.subscribed.get(), WAIT)
    assert again.was_recovering and again.recovered, again
    recovered = [await next_pub(events) for _ in range(3)]
    assert [value(p.data) for p in recovered] == ["missed 0", "missed 1", "missed 2"]
    assert [p.offset for p in recovered] == [3, 4, 5]
    await publish("chat:lobby", "live")
    assert value((await next_pub(events)).data) == "live"
    assert events.pubs.empty()
    await client.disconnect()
    return getattr(centrifuge, "__version__", "?")


if __name__ == "__main__":
    version = asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    print("ok", version, centrifuge.__file__)
