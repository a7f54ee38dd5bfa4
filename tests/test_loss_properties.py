"""Properties of every place a position is compared with the stream's (issue 10, section 1):
a position the stream does not have never makes tidings skip publications silently."""

from __future__ import annotations

import asyncio
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings import Settings
from tidings.brokers.base import HistoryResult, Publication, StreamPosition
from tidings.endpoints import continues
from tidings.hub import Hub
from tidings.session import Session
from tidings.subscriptions import is_recovered

from .test_hub import CountingEncoder, Recorder, _ignore
from .test_loss import node

EPOCHS = st.sampled_from(["", "e1", "e2"])


def kept(top: int, size: int, epoch: str, after: int) -> list[Publication]:
    """What a history of ``size`` keeps of a stream at ``top``, past offset ``after``."""
    low = max(after, top - size) + 1
    return [Publication("c", b"", o, epoch) for o in range(low, top + 1)]


@given(
    top=st.integers(0, 12),
    size=st.integers(0, 12),
    offset=st.integers(1, 20),
    epoch=EPOCHS,
)
def test_a_raw_replay_continues_only_a_position_history_makes_whole(
    top: int, size: int, offset: int, epoch: str
) -> None:
    after = kept(top, size, "e1", offset)
    whole = epoch == "e1" and offset <= top and offset >= top - size
    assert continues(StreamPosition(top, "e1"), after, offset, epoch) == whole
    if whole:  # and then what it replays is exactly the offsets it misses
        assert [p.offset for p in after] == list(range(offset + 1, top + 1))


@given(
    top=st.integers(0, 12),
    size=st.integers(0, 12),
    offset=st.integers(0, 20),
    epoch=EPOCHS,
)
def test_centrifugo_recovery_is_true_only_when_nothing_is_missed(
    top: int, size: int, offset: int, epoch: str
) -> None:
    history = HistoryResult(kept(top, size, "e1", offset), StreamPosition(top, "e1"))
    # an empty epoch is "any epoch", as SDKs send before they know one (Centrifugo's rule)
    whole = epoch in ("e1", "") and offset <= top and offset >= top - size
    assert is_recovered(history, StreamPosition(offset, epoch)) == whole


EVENTS = st.lists(
    st.sampled_from(["publish", "publish", "publish", "drop", "restore", "reset", "resync"]),
    max_size=40,
)
_names = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=EVENTS)
def test_a_subscriber_gets_every_publication_in_order_or_is_told(events: list[str]) -> None:
    """Any interleaving of publications, link drops, stream resets and resyncs: what the
    subscriber got is offsets 1, 2, 3... of the stream it subscribed to with none skipped, and
    either all of them or it was closed 3010."""
    asyncio.run(_run(events, f"prop-{next(_names)}"))


async def _run(events: list[str], name: str) -> None:
    short = Settings(namespaces={"s": {"history_size": 3, "history_ttl": 60}})
    async with node(name, short) as n:
        hub: Hub = n.hub
        encoder, rec = CountingEncoder(), Recorder()
        session = Session(hub, rec, encoder)
        task = asyncio.create_task(session.serve(_ignore))
        await hub.subscribe(session, "s:c", encoder)
        first_epoch = (await hub.history("s:c", limit=0)).position.epoch
        published: list[bytes] = []  # of the stream the subscriber subscribed to
        reset = False
        for event in events:
            if event == "publish":
                position = await n.other.publish(
                    "s:c", b"%d" % (len(published) + 1), hub.history_options(hub.channel("s:c"))
                )
                if position.epoch == first_epoch:
                    published.append(b"%d" % position.offset)
            elif event == "drop":
                n.drop("s:c")
            elif event == "restore":
                n.restore("s:c")
            elif event == "reset" and "s:c" in n.broker._store.streams:
                n.reset_stream("s:c")
                reset = True
            elif event == "resync":
                hub.on_resync()
            await asyncio.sleep(0)
        n.restore("s:c")
        hub.on_resync()
        async with asyncio.timeout(10):
            while not (rec.closed is not None or (not reset and rec.frames == published)):
                await asyncio.sleep(0.001)
        assert rec.frames == published[: len(rec.frames)]  # in order, none skipped
        if rec.closed is not None:
            assert rec.closed == (3010, "insufficient state")
        rec.gone.set()
        await task
