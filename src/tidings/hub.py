"""The hub: this node's channels, their local subscribers, and encode-once fan-out.

Publishing goes *through the broker* (which assigns the offset, keeps history and reaches every
node), and comes back to each node's hub as :meth:`Hub.on_publication`. There the publication is
encoded once per wire format in use on the channel and the same frame is queued to every local
subscriber. The hub knows the broker only by its interface and imports no web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from . import control
from .brokers.base import (
    Broker,
    ClientInfo,
    HistoryOptions,
    HistoryResult,
    JoinLeave,
    PresenceStats,
    Publication,
    StreamPosition,
)
from .channels import Channel, ChannelRules
from .config import Settings
from .delivery import Flusher, fan_out
from .errors import (
    INSUFFICIENT_STATE,
    SHUTDOWN,
    TOO_MANY,
    BadRequest,
    CloseReason,
    Disconnect,
    TidingsError,
)
from .frames import Frame
from .nodes import NodeDirectory
from .session import Session
from .wheel import Member, Wheel

log = logging.getLogger("tidings.hub")

#: ``async fn(session, data) -> JSON-able result``: an RPC method the application serves
RpcHandler = Callable[[Session, Any], Awaitable[Any]]
#: ``async fn(session, data)``: an asynchronous message a client sent (no reply)
SendHandler = Callable[[Session, Any], Awaitable[None]]


class Encoder(Protocol):
    """Turns a publication into the frame a wire format pushes; called once per publication."""

    def push(self, publication: Publication) -> Frame: ...

    def join_leave(self, event: JoinLeave) -> Frame | None: ...


@dataclass(slots=True)
class Metrics:
    """Counters exported at /metrics."""

    published: int = 0
    delivered: int = 0
    slow_clients: int = 0
    rejected_connections: int = 0
    connections_total: int = 0
    gaps_healed: int = 0
    gaps_lost: int = 0


@dataclass(slots=True, eq=False)
class _Local:
    """Local subscribers of one channel, grouped by encoder so each frame is built once."""

    #: subscribers by encoder, in subscription order (a dict, not a set: see _deliver)
    groups: dict[Encoder, dict[Session, None]] = field(default_factory=dict)
    #: sessions still recovering: they get publications, not frames, until activated
    buffering: dict[Session, list[Publication]] = field(default_factory=dict)
    #: just-activated sessions that already have every offset up to this one (from history):
    #: a copy of such a publication delivered late by the broker is not sent again
    floor: dict[Session, int] = field(default_factory=dict)
    count: int = 0
    #: publications the broker delivered for this channel since its first local subscriber
    published: int = 0
    subscribed: bool = False  # the broker delivers this channel to us
    op: asyncio.Future[None] | None = None  # a broker (un)subscribe in flight
    #: the stream position this node delivered last, to notice publications the broker lost;
    #: set when the broker subscription is made (the baseline), so a channel that has not
    #: delivered anything yet is healed too. "" before that.
    epoch: str = ""
    last: int = 0
    #: the last offset actually delivered in ``epoch`` (``last`` may be a baseline): a copy
    #: the broker delivers after history already sent it (healing) is not sent again
    sent: int = 0
    #: while a gap is filled from history, newer publications wait here, in order
    healing: list[Publication] | None = None
    #: buffering sessions whose stream was lost meanwhile: told when they are activated
    #: (after their subscribe reply), not before it
    lost: set[Session] = field(default_factory=set)
    #: the baseline could not be read (the broker failed the read): until a delivery gives a
    #: position, nothing tells whether a reconnect lost publications of this channel
    unknown: bool = False


def encode_json(data: Any) -> bytes:
    """JSON bytes of ``data``, once, for every subscriber and node."""
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise BadRequest(f"data is not JSON-serializable: {exc}") from None


def going_away(session: Session) -> Disconnect:
    """How ``session`` is closed when its node stops: its wire format's ``going_away``, else
    3001 shutdown (the Centrifugo protocol's)."""
    reason: CloseReason = getattr(session.format, "going_away", SHUTDOWN)
    return reason()  # a fresh instance each time (see errors.CloseReason)


def wheel_resolution(settings: Settings) -> float:
    """A quarter of the shortest deadline the hub's wheel serves, at most 1 s."""
    shortest = min(settings.ping_interval, settings.pong_timeout, settings.connect_timeout)
    return min(1.0, shortest / 4)


class StreamLossListener(Protocol):
    """What a protocol object (``session.protocol``) implements to hear that a channel's
    stream cannot be continued for its session; without it the session is closed (3010)."""

    def stream_lost(self, channel: str) -> None: ...


class Hub:
    """Node-local routing. Create one per process; ``await start()`` before use.

    Errors, shared by the methods below (:mod:`tidings.errors`, Centrifugo's codes): a channel
    name that is empty, too long or has characters outside the allowed set raises
    :class:`~tidings.errors.BadRequest`; a name whose namespace is not configured,
    :class:`~tidings.errors.UnknownChannel`; a broker that cannot be reached,
    :class:`~tidings.brokers.base.BrokerUnavailable` (an :class:`~tidings.errors.Unavailable`:
    retry later). Design notes: docs/delivery.md, docs/ordering.md."""

    def __init__(self, broker: Broker, settings: Settings | None = None) -> None:
        self.broker = broker
        self.settings = settings or Settings()
        self.rules = ChannelRules(self.settings)
        self.node_id = secrets.token_hex(3)
        self.flusher = Flusher()
        #: every session's pings and pong deadlines, every Centrifugo client's token and
        #: connect deadlines, on one loop timer; late by at most its resolution
        self.wheel: Wheel[Member] = Wheel(wheel_resolution(self.settings))
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        #: forgotten sessions whose socket the server still holds (a close under way, at most
        #: ``close_timeout``): they count under ``max_connections`` until it is gone
        self.lingering = 0
        self.users: dict[str, set[Session]] = {}
        self._local: dict[str, _Local] = {}
        self._kept: dict[int, tuple[object, HistoryOptions]] = {}
        self._control_handlers: list[Callable[[control.ControlMessage], None]] = []
        #: takes the emulation commands other nodes route to this one's sessions
        self.on_emulation: Callable[[control.Emulation], None] | None = None
        self._control_faults: set[str] = set()  # kinds of invalid control message seen
        self._tasks: set[asyncio.Task[None]] = set()
        self.rpc_handlers: dict[str, RpcHandler] = {}
        self.send_handlers: list[SendHandler] = []
        self.started = False
        #: :meth:`drain` has begun: new connections are refused, open ones are being closed
        self.draining = False
        self._emptied: asyncio.Event | None = None  # drain() waits for the last session
        #: every node's figures (this one's and those announced through the broker)
        self.directory = NodeDirectory(self, self.settings.node_info_interval)

    # -- life ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the broker and start announcing this node; idempotent.

        Raises BrokerUnavailable if the broker cannot be reached."""
        if not self.started:
            self.draining = False
            await self.broker.start(self)
            self.started = True
            self.directory.start()

    async def drain(self, period: float | None = None) -> None:
        """Close every session, spread evenly over ``period`` seconds (default: the
        ``shutdown_period`` setting), and return once they are gone.

        From the call on, new connections are refused the same way. Centrifugo-protocol
        clients are closed 3001 "shutdown" (Centrifugo's code: its SDKs reconnect, and recover
        their subscriptions on whichever node they reach); raw clients with their wire format's
        ``going_away`` (1012 service restart). Each close first writes what the client's outbox
        holds. The spread keeps a stopping node's clients from reconnecting to the others all
        in the same instant. Returns after the last close plus at most ``close_timeout`` (a
        client that never answers the close is aborted by its transport meanwhile); the broker
        stays connected, so in-flight publishes still complete. Never raises."""
        if period is None:
            period = self.settings.shutdown_period
        self.draining = True
        loop = asyncio.get_running_loop()
        pending = list(self.sessions)
        count = len(pending)
        start = loop.time()
        closed = 0
        while closed < count:
            # the i-th session (from 0) is closed period * i / count seconds in
            elapsed = loop.time() - start
            due = count if period <= 0 else min(count, int(elapsed * count / period) + 1)
            for session in pending[closed:due]:
                session.close(going_away(session))
            closed = max(closed, due)
            if closed < count:
                await asyncio.sleep(max(0.01, period * closed / count - (loop.time() - start)))
        if self.sessions:  # forget() sets it once the last connection has ended
            self._emptied = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), self.settings.close_timeout + 1.0)
            self._emptied = None

    async def stop(self) -> None:
        """Close every session (close code 3001, shutdown: Centrifugo SDKs reconnect; see
        :meth:`drain` for a spread-out close), then the broker. Never raises for a broker that
        is already gone."""
        self.draining = True
        for session in list(self.sessions):
            session.close(going_away(session))
        if self.sessions:
            await asyncio.sleep(0)
        if self.started:
            self.started = False
            await self.directory.stop()
            await self.broker.close()

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- channels and connections ----------------------------------------------------------------

    def channel(self, name: str) -> Channel:
        """``name`` (``"ns:rest"`` or a name without a namespace) with its namespace's options.

        Raises BadRequest (empty, too long, characters not allowed) or UnknownChannel (no such
        namespace); the rules are Centrifugo's channel names (namespace before ``:``)."""
        return self.rules.resolve(name)

    def history_options(self, channel: Channel) -> HistoryOptions:
        o = channel.options
        kept = self._kept.get(id(o))
        if kept is None or kept[0] is not o:  # made once per namespace, not per publish
            history = HistoryOptions(
                o.history_size,
                o.history_ttl,
                self.settings.history_meta_ttl,
                stream=o.history_size > 0,
            )
            kept = self._kept[id(o)] = (o, history)
        return kept[1]

    def connect(self, session: Session) -> None:
        """Count a new connection in; Disconnect(1013) past ``max_connections`` (connections
        whose socket is still closing count too), and the node's going-away close
        (:meth:`drain`) once it is draining."""
        if self.draining:
            raise going_away(session)
        if len(self.sessions) + self.lingering >= self.settings.max_connections:
            self.metrics.rejected_connections += 1
            raise TOO_MANY()
        self.sessions.add(session)
        self.metrics.connections_total += 1

    def _linger(self, transport: object) -> None:
        """Go on counting a connection whose transport says its socket is still open
        (``socket_open``) until it calls ``on_gone`` (tidings serve's transport does)."""
        if getattr(transport, "socket_open", False) and hasattr(transport, "on_gone"):
            self.lingering += 1

            def gone() -> None:
                self.lingering -= 1

            transport.on_gone = gone

    def set_user(self, session: Session, user: str) -> None:
        session.user = user
        if user:
            self.users.setdefault(user, set()).add(session)

    async def forget(self, session: Session) -> None:
        """Forget a finished session and its subscriptions (its connection has ended)."""
        if session in self.sessions:
            self.sessions.discard(session)
            self._linger(session.transport)
        if not self.sessions and self._emptied is not None:
            self._emptied.set()
        if session.user:
            peers = self.users.get(session.user)
            if peers is not None:
                peers.discard(session)
                if not peers:
                    del self.users[session.user]
        for name in list(session.channels):
            await self.unsubscribe(session, name)

    # -- subscriptions ---------------------------------------------------------------------------

    async def subscribe(
        self, session: Session, channel: str, encoder: Encoder, *, buffer: bool = False
    ) -> None:
        """Deliver ``channel`` to ``session``; returns once the broker delivers it to this node.

        ``encoder`` builds the frames of the session's wire format (one frame per publication
        for all subscribers sharing it). Raises BrokerUnavailable if the broker cannot
        subscribe this node (the session is then not subscribed).

        With ``buffer=True`` publications are kept aside (not sent) until :meth:`activate`, so a
        recovering client can be sent history first and then what arrived meanwhile, without
        gaps or duplicates."""
        local = self._local.get(channel)
        if local is None:
            local = self._local[channel] = _Local()
        if buffer:
            local.buffering[session] = []
        else:
            local.groups.setdefault(encoder, {})[session] = None
        local.count += 1
        session.channels.add(channel)
        try:
            await self._sync(channel, local)
        except BaseException:
            self._remove(session, channel, local)
            with contextlib.suppress(Exception):
                await self._sync(channel, local)
            raise

    def activate(
        self, session: Session, channel: str, encoder: Encoder, after: int = 0
    ) -> list[Publication]:
        """End buffering: the session now gets frames; returns what was buffered meanwhile.

        ``after``: the session was sent everything up to this offset, so live publications up
        to it (a broker may deliver them after the history read that contained them) are
        skipped for this session until a newer one arrives."""
        local = self._local.get(channel)
        if local is None or session not in local.buffering:
            return []
        if session in local.lost:
            self._tell_lost(session, channel, local)
            return []
        held = local.buffering.pop(session)
        local.groups.setdefault(encoder, {})[session] = None
        if after:
            local.floor[session] = after
        return held

    async def unsubscribe(self, session: Session, channel: str) -> None:
        """Stop delivering ``channel`` to ``session`` (nothing if it is not subscribed); the
        node's broker subscription ends with its last local subscriber. Raises
        BrokerUnavailable if the broker cannot be told (the session is unsubscribed anyway)."""
        local = self._local.get(channel)
        if local is None or channel not in session.channels:
            return
        self._remove(session, channel, local)
        await self._sync(channel, local)

    def _remove(self, session: Session, channel: str, local: _Local) -> None:
        if channel not in session.channels:
            return
        session.channels.discard(channel)
        local.count -= 1
        local.floor.pop(session, None)
        local.lost.discard(session)
        if local.buffering.pop(session, None) is None:
            for encoder, members in list(local.groups.items()):
                if session in members:
                    del members[session]
                    if not members:
                        del local.groups[encoder]
                    break

    async def _sync(self, channel: str, local: _Local) -> None:
        """Make the broker subscription match whether anyone here wants the channel.

        Broker calls for one channel run one at a time; whoever finds the state wrong fixes it,
        so concurrent first subscribers and a concurrent last unsubscriber cannot race."""
        while True:
            if local.op is not None:
                await asyncio.shield(local.op)
                continue
            want = local.count > 0
            if want == local.subscribed:
                if not want and self._local.get(channel) is local:
                    del self._local[channel]
                return
            local.op = done = asyncio.get_running_loop().create_future()
            try:
                if want:
                    await self.broker.subscribe(channel)
                    local.subscribed = True
                    await self._baseline(channel, local)
                else:
                    await self.broker.unsubscribe(channel)
                    local.subscribed = False
                    # what follows a resubscription is not a gap
                    local.epoch, local.last, local.sent = "", 0, 0
            finally:
                local.op = None
                done.set_result(None)

    def streamless(self, channel: str) -> bool:
        """Whether the broker keeps no stream for ``channel`` (it keeps no history and the
        engine keeps no offsets for such channels): its publications carry no offset."""
        if self.broker.streams_without_history:
            return False
        try:
            return not self.history_options(self.channel(channel)).stream
        except TidingsError:  # not a channel name of this configuration: treat as kept
            return False

    async def _baseline(self, channel: str, local: _Local) -> None:
        """Read the stream position the broker subscription starts from, so a publication lost
        before the channel's first delivery is noticed too (a gap, or another epoch). None for
        a channel without a stream: the read would create one."""
        if self.streamless(channel):
            return
        try:
            position = (
                await self.broker.history(channel, limit=0, meta_ttl=self.settings.history_meta_ttl)
            ).position
        except Exception as exc:  # the subscription stands: gaps are noticed from the first
            # delivery on; a reconnect before it tells the subscribers (on_resync)
            log.warning("could not read the stream position of %r: %s", channel, exc)
            local.unknown = True
            return
        if not local.epoch:  # a publication delivered meanwhile is a newer baseline
            local.epoch, local.last = position.epoch, position.offset

    def subscribers(self, channel: str) -> int:
        """Sessions on this node subscribed to ``channel`` (other nodes' are not counted)."""
        local = self._local.get(channel)
        return local.count if local is not None else 0

    def channel_publications(self, channel: str) -> int:
        """Publications this node received for ``channel`` since it got its first local
        subscriber (0 without local subscribers; the count starts again when it has some)."""
        local = self._local.get(channel)
        return local.published if local is not None else 0

    @property
    def channels(self) -> Iterable[str]:
        """Channels with at least one subscriber on this node."""
        return self._local.keys()

    # -- publishing ------------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        skip_history: bool = False,
    ) -> StreamPosition:
        """Publish ``data`` to ``channel`` on every node; returns its stream position.

        ``data``: anything orjson serializes (dict, list, str, numbers, dataclasses, ...),
        encoded once here. ``info``: the publishing client, shown to subscribers; ``tags``:
        string pairs sent along with the publication; ``skip_history``: deliver and advance
        the offset but keep nothing in history. Returns ``StreamPosition(offset, epoch)``:
        ``offset`` is this publication's, one more than the channel's previous one.

        Returns once the broker has accepted the publication (memory: delivered to this
        node's subscribers' queues; networked engines: stored and sent to every node); it
        does not wait for sockets. Raises BadRequest (``data`` is not JSON-serializable, or a
        bad channel name), UnknownChannel, BrokerUnavailable, or LimitExceeded where an engine
        caps a publication's size (Kafka: its ``max.message.bytes``)."""
        return await self.publish_json(
            channel, encode_json(data), info=info, tags=tags, skip_history=skip_history
        )

    async def publish_json(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        skip_history: bool = False,
    ) -> StreamPosition:
        """:meth:`publish` for ``data`` that is already JSON (UTF-8 bytes, not checked: the
        caller vouches for it; subscribers get these bytes as they are).

        ``skip_history``: deliver and advance the offset, but keep nothing in history. Same
        answer and errors as :meth:`publish`."""
        ch = self.channel(channel)
        kept = self.history_options(ch)
        if skip_history:
            kept = HistoryOptions(0, 0.0, kept.meta_ttl, kept.stream)
        position = await self.broker.publish(ch.name, data, kept, info=info, tags=tags)
        self.metrics.published += 1
        if self.flusher.crowded:
            # Every loop that publishes (batch, broadcast, publish_many, a client's stream of
            # publishes) lets the writers run here: a broker that does not suspend (memory)
            # would otherwise queue everything before anything is written.
            await asyncio.sleep(0)
        return position

    async def publish_many(self, items: Iterable[tuple[str, Any]]) -> list[StreamPosition]:
        """Publish several ``(channel, data)`` pairs in order; one encode per item. Returns
        their stream positions, in the same order.

        Stops at the first failure with its error (as :meth:`publish`): the items before it
        are published, the rest are not.

        Lets the writers run whenever a loop iteration gets crowded (see :meth:`publish_json`)."""
        return [await self.publish(channel, data) for channel, data in items]

    # -- broker events (EventHandler) ------------------------------------------------------------

    def on_publication(self, publication: Publication) -> None:
        local = self._local.get(publication.channel)
        if local is None:
            return
        local.published += 1
        for held in local.buffering.values():
            held.append(publication)
        if local.healing is not None:
            local.healing.append(publication)
        elif not local.epoch or not publication.offset:  # no baseline, or no offsets kept
            self._deliver(local, publication)
        elif publication.epoch != local.epoch:
            # The stream was lost (broker restarted without persistence): a new epoch.
            self._lose(publication.channel, local, "a new epoch", publication.offset)
            local.epoch, local.last, local.sent = publication.epoch, publication.offset, 0
        elif publication.offset > local.last + 1:
            # The broker skipped offsets (e.g. its connection dropped): fill in from history.
            self._heal(publication.channel, local, [publication])
        elif publication.offset <= local.sent:
            return  # late live copy of what a heal already sent from history
        else:
            self._deliver(local, publication)

    def _deliver(self, local: _Local, publication: Publication) -> None:
        local.epoch, local.last = publication.epoch, publication.offset
        local.sent = publication.offset
        seen = self._seen(local, publication.offset) if local.floor else None
        through = self.flusher.write_through()
        delivered = 0
        for encoder, members in local.groups.items():
            frame = encoder.push(publication)
            if seen is None:  # one call per group: the per-subscriber loops are delivery's
                fan_out(members, frame, through)
            else:
                fan_out([s for s in members if s not in seen], frame, False)
            delivered += len(members)
        self.metrics.delivered += delivered

    def on_resync(self) -> None:
        """The broker may have missed deliveries (it reconnected): catch every channel up.

        A channel without a stream (:meth:`streamless`), or whose baseline could not be read
        and that has delivered nothing since, has no position to tell whether it missed any:
        its subscribers are told they may have (as for a lost stream), never left with a
        silent gap."""
        for channel, local in list(self._local.items()):
            if local.epoch and local.healing is None:
                self._heal(channel, local, [])
            elif local.subscribed and (local.unknown or self.streamless(channel)):
                self._lose(channel, local, "what was published while the broker reconnected")

    def _heal(self, channel: str, local: _Local, held: list[Publication]) -> None:
        local.healing = held
        task = asyncio.get_running_loop().create_task(self._catch_up(channel, local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _catch_up(self, channel: str, local: _Local) -> None:
        """Deliver what history kept after the last offset sent, then what waited, in order.

        Another epoch in history, or offsets history no longer holds, cannot be made whole:
        every subscriber of the channel is told (:meth:`_lose`), never sent a splice."""
        history: HistoryResult | None = None
        try:
            history = await self.broker.history(
                channel,
                since=StreamPosition(local.last, local.epoch),
                meta_ttl=self.settings.history_meta_ttl,
            )
        except Exception as exc:
            log.warning("could not catch up channel %r from history: %s", channel, exc)
        held, local.healing = local.healing or [], None
        if history is not None and history.position.epoch != local.epoch:
            self._lose(channel, local, "a new epoch", history.position.offset)
            local.epoch, local.last = history.position.epoch, history.position.offset
            local.sent = 0
            return
        missed = history.publications if history is not None else []
        before = local.last
        for publication in [*missed, *held]:
            if publication.epoch != local.epoch:
                self._lose(channel, local, "a new epoch", publication.offset)
                local.epoch, local.last, local.sent = publication.epoch, publication.offset, 0
                return
            if publication.offset > local.last + 1:  # not kept by history any more
                lost = f"offsets {local.last + 1}-{publication.offset - 1}"
                self._lose(channel, local, lost, publication.offset - local.last - 1)
                local.last = publication.offset
                return
            if publication.offset == local.last + 1:
                self._deliver(local, publication)
        if local.last > before:
            self.metrics.gaps_healed += 1

    def _lose(self, channel: str, local: _Local, what: str, count: int = 0) -> None:
        """The channel's stream cannot be continued for its subscribers here: tell each (its
        protocol's ``stream_lost``, e.g. Centrifugo's unsubscribe 2500; else a close with
        3010) and stop delivering to them. Logged; counted in ``gaps_lost``.

        ``count``: publications lost, when known (at least one is counted)."""
        sessions = [*local.buffering, *(s for group in local.groups.values() for s in group)]
        self.metrics.gaps_lost += max(count, 1)
        log.warning(
            "channel %r lost %s: %d subscriber(s) told to resubscribe",
            channel,
            what,
            len(sessions),
            extra={"event": "stream_lost", "channel": channel, "subscribers": len(sessions)},
        )
        for session in sessions:
            if session in local.buffering:
                # still subscribing: its reply is not queued yet, and an unsubscribe (or a
                # close) must follow it; what it held is of the lost stream
                local.buffering[session].clear()
                local.lost.add(session)
            else:
                self._tell_lost(session, channel, local)

    def _tell_lost(self, session: Session, channel: str, local: _Local) -> None:
        """Stop delivering ``channel`` to ``session`` and tell it (see :meth:`_lose`).

        A session without a protocol listener that is still being set up (``activate`` of a
        raw replay) gets :data:`~.errors.INSUFFICIENT_STATE` raised instead, to close with."""
        buffering = session in local.buffering
        self._remove(session, channel, local)
        if local.count == 0:  # nobody left: let the broker subscription go
            task = asyncio.get_running_loop().create_task(self._sync(channel, local))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        listener = getattr(session.protocol, "stream_lost", None)
        if listener is not None:
            listener(channel)
        elif buffering:
            raise INSUFFICIENT_STATE()
        else:
            session.close(INSUFFICIENT_STATE())

    @staticmethod
    def _seen(local: _Local, offset: int) -> set[Session]:
        """Sessions that already have ``offset``; the others stop being checked (offsets only
        grow, so once past its floor a session never needs it again)."""
        seen = {s for s, after in local.floor.items() if offset and offset <= after}
        for session in [s for s in local.floor if s not in seen]:
            del local.floor[session]
        return seen

    def on_join_leave(self, event: JoinLeave) -> None:
        local = self._local.get(event.channel)
        if local is None:
            return
        for encoder, members in local.groups.items():
            frame = encoder.join_leave(event)
            if frame is None:
                continue
            for session in members:
                session.enqueue(frame)

    def on_control(self, data: bytes) -> None:
        """A control message from the broker: decoded once, acted on, handed to each receiver.

        One that is not valid (or has an op this node does not know) is logged and ignored:
        it must not stop the broker's receiving task, nor reach the receivers."""
        try:
            message = control.decode(data)
        except control.ControlError as exc:
            self._ignore(exc)
            return
        if isinstance(message, control.NodeInfo):
            self.directory.on_node(message)
            return
        if isinstance(message, control.Emulation):
            if message.node == self.node_id and self.on_emulation is not None:
                self.on_emulation(message)
            return
        if isinstance(message, control.DisconnectUser):
            self._disconnect_local(message)
        for handler in self._control_handlers:
            try:
                handler(message)
            except Exception:  # one bad handler must not stop the broker's receiving task
                log.exception("control handler %r failed", handler)

    def _ignore(self, exc: control.ControlError) -> None:
        """Log an invalid control message: a warning the first time for each kind of fault
        (an unknown op is the same fault on every message a newer node sends), then debug."""
        kind = f"op {exc.op!r}" if isinstance(exc, control.UnknownOp) else str(exc)
        level = logging.DEBUG if kind in self._control_faults else logging.WARNING
        self._control_faults.add(kind)
        log.log(level, "ignoring a control message: %s", exc)

    def on_control_message(self, handler: Callable[[control.ControlMessage], None]) -> None:
        """Register ``handler(message)`` for the control messages every node receives; it gets
        each valid message, typed (:mod:`tidings.control`), and must not block."""
        self._control_handlers.append(handler)

    # -- application handlers for client RPC and send -------------------------------------------

    def rpc(self, method: str) -> Callable[[RpcHandler], RpcHandler]:
        """Decorator: ``@hub.rpc("name")`` serves a client's ``rpc`` command with that method."""

        def register(fn: RpcHandler) -> RpcHandler:
            self.rpc_handlers[method] = fn
            return fn

        return register

    def on_send(self, fn: SendHandler) -> SendHandler:
        """Decorator: ``@hub.on_send`` receives the asynchronous messages clients send."""
        self.send_handlers.append(fn)
        return fn

    # -- users (on every node, through the broker's control messages) ----------------------------

    async def send_control(self, message: control.ControlMessage | control.Emulation) -> None:
        """Send ``message`` to every node (this one too), through the broker."""
        await self.broker.publish_control(control.encode(message))

    async def disconnect(
        self, user: str, code: int = 3503, reason: str = "force disconnect", *, client: str = ""
    ) -> None:
        """Close every connection of ``user`` (only ``client``'s, if given) on every node.

        The default code 3503 tells Centrifugo SDKs not to reconnect. ``code`` 1000-4999 and
        ``reason`` up to 123 bytes, else :class:`~tidings.control.ControlError` (a ValueError)."""
        await self.send_control(
            control.DisconnectUser(user=user, client=client, code=code, reason=reason)
        )

    async def subscribe_user(self, user: str, channel: str, *, client: str = "") -> None:
        """Subscribe ``user``'s connections (``client``'s only, if given) to ``channel``.

        Only protocols with server-side subscriptions act on it (Centrifugo's); raw
        ``/ws/{channel}`` connections have one channel for life and ignore it. BadRequest or
        UnknownChannel if ``channel`` is not allowed."""
        name = self.channel(channel).name
        await self.send_control(control.SubscribeUser(user=user, client=client, channel=name))

    async def unsubscribe_user(self, user: str, channel: str, *, client: str = "") -> None:
        """Unsubscribe ``user``'s connections from ``channel`` on every node (a raw connection
        to that channel is closed with 1008)."""
        name = self.channel(channel).name
        await self.send_control(control.UnsubscribeUser(user=user, client=client, channel=name))

    async def refresh_user(
        self, user: str, *, client: str = "", expire_at: int | None = None, expired: bool = False
    ) -> None:
        """Extend (``expire_at``, unix seconds; None: never) or end (``expired``) connections."""
        await self.send_control(
            control.RefreshUser(user=user, client=client, expire_at=expire_at, expired=expired)
        )

    def local_sessions(self, user: str, client: str = "") -> list[Session]:
        """This node's sessions of ``user``, or only the one with id ``client`` if given."""
        return [s for s in self.users.get(user, ()) if not client or s.client_id == client]

    def _disconnect_local(self, message: control.DisconnectUser) -> None:
        reason = Disconnect(message.code, message.reason)
        for session in self.local_sessions(message.user, message.client):
            session.close(reason)

    # -- history and presence --------------------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> HistoryResult:
        """What ``channel``'s history keeps, and its current stream position.

        ``since``: only publications after ``since.offset`` (compare ``result.position.epoch``
        with ``since.epoch``: if they differ, the stream was reset and ``since`` means
        nothing); ``limit``: at most that many (None: all kept, 0: only the position);
        ``reverse``: newest first. A channel with no stream yet gets one, with a new epoch.
        History keeps ``history_size`` publications for ``history_ttl`` seconds (the
        channel's namespace options). Raises BadRequest, UnknownChannel, BrokerUnavailable.
        Centrifugo's ``history`` API, same rules."""
        ch = self.channel(channel)
        return await self.broker.history(
            ch.name,
            since=since,
            limit=limit,
            reverse=reverse,
            meta_ttl=self.settings.history_meta_ttl,
        )

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Clients subscribed to ``channel`` on every node, by client id (each with its user,
        and connection and channel info), for channels whose namespace has ``presence``
        on (empty otherwise). An entry lasts ``presence_ttl`` seconds unless its connection
        refreshes it. Raises BadRequest, UnknownChannel, BrokerUnavailable."""
        return await self.broker.presence(self.channel(channel).name)

    async def presence_stats(self, channel: str) -> PresenceStats:
        """``PresenceStats(num_clients, num_users)`` of ``channel``: the counts of
        :meth:`presence` without the entries. Raises as :meth:`presence`."""
        return await self.broker.presence_stats(self.channel(channel).name)
