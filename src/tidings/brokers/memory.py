"""The embedded default broker: everything in this process's memory.

``memory://`` gives each broker a private store (one node). ``memory://NAME`` shares one store
among every broker in the process with that name, so tests can run several hubs as if they were
several nodes and check the same contract as the networked engines.

Either way nothing leaves the process, so several worker processes behind one port would be
several hubs that do not see each other's publications. :meth:`MemoryBroker.start` refuses to
start in a worker of a pre-fork server (``uvicorn --workers N``, gunicorn with uvicorn workers:
see :mod:`tidings.processes`), and a worker that only sees its siblings later (they started after
it) fails ``ping()``, hence ``/health``, and logs an error.

Streams are bounded: a channel's stream (offset, epoch, kept publications) lives
``history_meta_ttl`` seconds after its last use, and at most :attr:`MemoryBroker.max_streams`
streams are kept (setting ``history_max_streams``). Past the cap, creating a stream first
forgets the least recently used stream that no node of the store has subscribers for; that
channel starts again from offset 0 with a new epoch, so a client recovering from its old
position is told ``recovered: false`` (never handed a wrong continuation). Each such eviction
is counted (:attr:`MemoryBroker.streams_evicted`, metric ``tidings_streams_evicted``). Streams
with subscribers are never evicted: they are bounded by the subscriptions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .base import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_META_TTL,
    Broker,
    BrokerUnavailable,
    ClientInfo,
    EventHandler,
    HistoryOptions,
    HistoryResult,
    JoinLeave,
    Publication,
    StreamPosition,
    compact,
    new_epoch,
)

SWEEP_INTERVAL = 30.0
#: seconds between checks for sibling workers: often at first (a pre-fork server starts its
#: workers together), then rarely
WATCH_INTERVALS = (1.0,) * 10 + (5.0,) * 10
WATCH_INTERVAL_LATER = 60.0

log = logging.getLogger("tidings.brokers.memory")


class SeveralWorkers(RuntimeError):
    """``memory://`` in one of several worker processes serving one socket: refused."""


def several_workers_message(pids: list[int]) -> str:
    others = ", ".join(str(p) for p in pids)
    return (
        f"memory:// keeps channels inside one process, but this process ({os.getpid()}) is one "
        f"of several workers serving the same socket (also pid {others}): each would be a "
        "separate hub and a publication would reach only the subscribers of the worker that "
        "took it. Run one worker, or join the workers through a broker: "
        "TIDINGS_BROKER_URL=redis://127.0.0.1:6379 (or postgresql://, nats://, kafka://)"
    )


#: a kept publication: (expires, offset, data, time, info, tags). A plain tuple, not a
#: Publication: once it survives a collection the garbage collector stops tracking a tuple of
#: strings and numbers, while kept objects stay tracked and make every full collection scan
#: them all: pauses every delivery waits out (bench/RESULTS.md, "Figures behind the code").
_Kept = tuple[float, int, bytes, float, ClientInfo | None, dict[str, str] | None]


@dataclass(slots=True)
class _Stream:
    epoch: str = field(default_factory=new_epoch)
    offset: int = 0
    items: deque[_Kept] = field(default_factory=deque)
    size: int = 0
    expires: float = 0.0  # monotonic time the whole stream (offset, epoch) is forgotten


@dataclass(slots=True)
class _Store:
    #: least recently used first: a stream is moved to the end each time it is used
    streams: dict[str, _Stream] = field(default_factory=dict)
    presence: dict[str, dict[str, tuple[float, ClientInfo]]] = field(default_factory=dict)
    nodes: set[MemoryBroker] = field(default_factory=set)


_shared: dict[str, _Store] = {}


class MemoryBroker(Broker):
    schemes = ("memory",)
    synchronous = True

    def __init__(self, url: str = "memory://") -> None:
        super().__init__(url)
        name = urlsplit(url).netloc
        self._store = _shared.setdefault(name, _Store()) if name else _Store()
        self._channels: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: why this node is not a whole deployment (sibling workers seen), for ping()
        self.split: str | None = None
        #: streams kept at most (see the module docstring); 0: no cap
        self.max_streams = DEFAULT_MAX_STREAMS
        #: idle streams forgotten to stay under ``max_streams`` (each restarts with a new epoch)
        self.streams_evicted = 0

    async def start(self, handler: EventHandler) -> None:
        """Start; :class:`SeveralWorkers` if this process is one of several workers serving
        the same listening socket (a pre-fork server: see :mod:`tidings.processes`)."""
        from .. import processes

        pids = processes.sharing_siblings()
        if pids:
            message = several_workers_message(pids)
            log.error("refusing to start: %s", message)
            raise SeveralWorkers(message)
        await super().start(handler)
        self._store.nodes.add(self)
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_forever())
        self._watcher = loop.create_task(self._watch_siblings())

    async def close(self) -> None:
        self._store.nodes.discard(self)
        self._channels.clear()
        for task in (self._sweeper, self._watcher):
            if task is not None:
                task.cancel()
        self._sweeper = self._watcher = None

    async def ping(self) -> None:
        """Raise :class:`BrokerUnavailable` once sibling workers were seen (see start)."""
        if self.split is not None:
            raise BrokerUnavailable(self.split)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    # -- streams -------------------------------------------------------------------------------

    def _stream(self, channel: str, now: float, meta_ttl: float) -> _Stream:
        streams = self._store.streams
        stream = streams.pop(channel, None)  # re-inserted last: most recently used
        if stream is None or stream.expires <= now:
            if self.max_streams and len(streams) >= self.max_streams:
                self._evict(streams, now)
            stream = _Stream()
        streams[channel] = stream
        stream.expires = now + meta_ttl
        return stream

    def _evict(self, streams: dict[str, _Stream], now: float) -> None:
        """Forget the least recently used stream nobody is subscribed to (expired ones go
        first, uncounted). Subscribed streams met on the way move to the end: each is passed
        over once per round, so the scan is amortized O(1)."""
        nodes = tuple(self._store.nodes)
        for _ in range(len(streams)):
            name = next(iter(streams))
            stream = streams.pop(name)
            if stream.expires <= now:
                return
            if not any(name in node._channels for node in nodes):
                self.streams_evicted += 1
                return
            streams[name] = stream
        # every stream has subscribers: the cap gives way (bounded by the subscriptions)

    @staticmethod
    def _trim(stream: _Stream, now: float) -> None:
        items = stream.items
        while items and (items[0][0] <= now or len(items) > stream.size):
            items.popleft()

    async def publish(
        self,
        channel: str,
        data: bytes,
        history: HistoryOptions,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        now = time.monotonic()
        stream = self._stream(channel, now, history.meta_ttl)
        stream.offset += 1
        offset, at = stream.offset, time.time()
        pub = Publication(channel, data, offset, stream.epoch, info, tags, at)
        if history.size > 0:
            stream.size = history.size
            expires = now + history.ttl if history.ttl > 0 else float("inf")
            stream.items.append((expires, offset, compact(data), at, info, tags))
            self._trim(stream, now)
        for node in tuple(self._store.nodes):
            if channel in node._channels:
                node.handler.on_publication(pub)
        return StreamPosition(stream.offset, stream.epoch)

    async def publish_join_leave(self, event: JoinLeave) -> None:
        for node in tuple(self._store.nodes):
            if event.channel in node._channels:
                node.handler.on_join_leave(event)

    async def publish_control(self, data: bytes) -> None:
        for node in tuple(self._store.nodes):
            node.handler.on_control(data)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
        meta_ttl: float = DEFAULT_META_TTL,
    ) -> HistoryResult:
        now = time.monotonic()
        stream = self._stream(channel, now, meta_ttl)
        self._trim(stream, now)
        position = StreamPosition(stream.offset, stream.epoch)
        if limit == 0:
            return HistoryResult([], position)
        after = since.offset if since is not None else 0
        epoch = stream.epoch
        pubs = [
            Publication(channel, data, offset, epoch, info, tags, at)
            for _, offset, data, at, info, tags in stream.items
            if offset > after
        ]
        if reverse:
            pubs.reverse()
        if limit is not None and limit > 0:
            pubs = pubs[:limit]
        return HistoryResult(pubs, position)

    async def remove_history(self, channel: str) -> None:
        stream = self._store.streams.get(channel)
        if stream is not None:
            stream.items.clear()

    # -- presence ------------------------------------------------------------------------------

    async def add_presence(self, channel: str, info: ClientInfo, ttl: float) -> None:
        self._store.presence.setdefault(channel, {})[info.client] = (time.monotonic() + ttl, info)

    async def remove_presence(self, channel: str, client: str) -> None:
        entries = self._store.presence.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._store.presence[channel]

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        now = time.monotonic()
        entries = self._store.presence.get(channel, {})
        return {cid: info for cid, (expires, info) in entries.items() if expires > now}

    # -- housekeeping --------------------------------------------------------------------------

    def sweep(self) -> None:
        """Forget expired streams, history items and presence entries."""
        now = time.monotonic()
        streams = self._store.streams
        for name in [n for n, s in streams.items() if s.expires <= now]:
            del streams[name]
        for stream in streams.values():
            self._trim(stream, now)
        for channel, entries in list(self._store.presence.items()):
            for cid in [c for c, (exp, _) in entries.items() if exp <= now]:
                del entries[cid]
            if not entries:
                del self._store.presence[channel]

    async def _watch_siblings(self) -> None:
        """Look again for sibling workers: those started after this one are not seen by
        start(). The first sighting fails ping() for good and is logged as an error."""
        from .. import processes

        inodes: set[int] = set()
        intervals = iter(WATCH_INTERVALS)
        while self.split is None:
            await asyncio.sleep(next(intervals, WATCH_INTERVAL_LATER))
            if not inodes:  # found once, kept: the listening socket does not change
                inodes = await asyncio.to_thread(processes.listening_sockets)
            pids = await asyncio.to_thread(processes.sharing_siblings, inodes)
            if pids:
                self.split = several_workers_message(pids)
                log.error("%s; /health fails from now on", self.split)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()
