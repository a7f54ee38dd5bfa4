"""A Centrifugo connection's subscriptions: permission, recovery, rollback, presence.

A subscription starts *buffered* in the hub: its reply (with any recovered publications) is
queued first, then, when the frame's replies are flushed, whatever arrived meanwhile that the
client has not seen (by offset), then live publications: no gap, no duplicate. A client that
asks to recover from ``{offset, epoch}`` is sent what history kept after it and told
``recovered: true``, or told ``recovered: false`` when history cannot make it whole (another
epoch, trimmed, or more than ``recovery_max_publications``), as Centrifugo does.

A subscription that fails half-way (a broker error while reading the position, adding
presence, ...) is undone: the hub, presence and the join event are rolled back before the error
reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .auth import can_subscribe, check_user_limited
from .brokers.base import ClientInfo, HistoryResult, JoinLeave, StreamPosition, compact
from .channels import PRIVATE_PREFIX, USER_SEPARATOR, Channel
from .errors import AlreadySubscribed, LimitExceeded, PermissionDenied, UnrecoverablePosition
from .protocol import centrifuge as wire
from .protocol import deflate
from .session import Session

if TYPE_CHECKING:
    from .config import Settings
    from .credentials import ConnectionCredentials
    from .hub import Hub

log = logging.getLogger("tidings.connection")

#: the subscribe request's ``flag`` bit asking for error 112 instead of ``recovered: false``
#: (``subscriptionFlagRejectUnrecovered`` in centrifuge/client.go; ``SubscribeRequest.flag``
#: in centrifugal/protocol's client.proto; bit 0 is channel compaction, not supported here)
REJECT_UNRECOVERED = 2

#: the unsubscribe push's body when the server unsubscribes a client (Centrifugo's code 2000)
SERVER_UNSUBSCRIBE = {"code": 2000, "reason": "server unsubscribe"}
#: the unsubscribe push when the channel's stream cannot be continued (a new epoch, a gap
#: history no longer holds): SDKs resubscribe and recover, or learn ``recovered: false``.
#: Centrifugo's code 2500 (centrifuge's UnsubscribeCodeInsufficient).
INSUFFICIENT_UNSUBSCRIBE = {"code": 2500, "reason": "insufficient state"}


@dataclass(slots=True, eq=False)
class Subscription:
    """One channel a connection is subscribed to."""

    channel: Channel
    info: ClientInfo  # the client as presence and join/leave show it in this channel
    presence: bool
    encoder: wire.CentrifugeJson  # with join/leave pushes or not, str or pre-built frames
    closes_at: float | None = None  # loop time: closed 3006 then unless refreshed
    server_side: bool = False  # made by the server (connect, subscribe_user), not the client


def is_recovered(history: HistoryResult, since: StreamPosition) -> bool:
    """Whether ``history`` (read after ``since``) makes a client at ``since`` whole: same epoch
    and nothing trimmed between ``since`` and the oldest publication kept."""
    position = history.position
    # an empty epoch (what SDKs send before they know one) matches any epoch, as in
    # Centrifugo's isStreamRecovered (centrifuge/client.go)
    if (since.epoch and since.epoch != position.epoch) or since.offset > position.offset:
        return False
    pubs = history.publications
    if not pubs:
        return since.offset == position.offset
    return pubs[0].offset == since.offset + 1


def _flag(request: dict[str, Any]) -> int:
    flag = request.get("flag")
    return flag if isinstance(flag, int) and not isinstance(flag, bool) else 0


class Subscriptions:
    """The subscriptions of one Centrifugo connection, by channel name (``by_name``).

    ``activations`` (channel -> offset), passed through the commands of one frame, collects
    the subscriptions made by them; :meth:`activate` ends their buffering once the replies are
    queued."""

    __slots__ = ("_presence_task", "by_name", "creds", "hub", "session", "settings")

    def __init__(
        self, hub: Hub, settings: Settings, session: Session, creds: ConnectionCredentials
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.session = session
        self.creds = creds
        self.by_name: dict[str, Subscription] = creds.subs
        self._presence_task: asyncio.Task[None] | None = None

    @property
    def format(self) -> wire.CentrifugeJson:
        """The session's wire format: str pushes, or pre-built frames on a direct transport."""
        fmt = self.session.format
        assert isinstance(fmt, wire.CentrifugeJson)
        return fmt

    # -- permission ------------------------------------------------------------------------------

    def check_readable(self, ch: Channel) -> None:
        """What a client needs to see a channel without a subscription token; PermissionDenied
        (103) if it may not."""
        if ch.name.startswith(PRIVATE_PREFIX):
            raise PermissionDenied("private channel: a subscription token is required")
        if USER_SEPARATOR in ch.name:
            check_user_limited(ch.name, self.creds.who.user)
        can_subscribe(self.settings, ch, self.creds.who, token=False)

    def readable(self, request: dict[str, Any]) -> Channel:
        """The request's channel, if the client may read it (subscribed, or allowed to)."""
        ch = self.hub.channel(wire.channel_name(request))
        if ch.name not in self.by_name:
            self.check_readable(ch)
        return ch

    # -- subscribing -----------------------------------------------------------------------------

    async def subscribe(
        self, request: dict[str, Any], activations: dict[str, int]
    ) -> dict[str, Any]:
        """The ``subscribe`` command: with a subscription token, or as the channel's rules
        allow; the reply's result."""
        name = wire.channel_name(request)
        if name in self.by_name:
            raise AlreadySubscribed()
        ch = self.hub.channel(name)
        token = request.get("token")
        claims: dict[str, Any] | None = None
        if token:
            claims = await self.creds.subscription_claims(str(token), name)
        else:
            self.check_readable(ch)
        return await self.add(ch, request, claims, activations)

    async def add(
        self,
        ch: Channel,
        request: dict[str, Any],
        claims: dict[str, Any] | None,
        activations: dict[str, int],
        *,
        server_side: bool = False,
    ) -> dict[str, Any]:
        """Subscribe buffered, read the position (and recover); ``activations`` gets the offset
        after which buffered publications are still news to the client. Undone on any error.

        ``claims``: a verified subscription token's (its ``info`` and ``exp``), or None;
        ``server_side``: the server subscribes the client (it cannot resubscribe itself)."""
        if len(self.by_name) >= self.settings.max_channels_per_connection:
            raise LimitExceeded("too many channels on this connection")
        opts = ch.options
        name = ch.name
        who = self.creds.who
        chan_info = claims.get("info") if claims else None
        info = ClientInfo(
            self.session.client_id,
            who.user,
            who.info,
            compact(orjson.dumps(chan_info)) if chan_info is not None else None,
        )
        join_leave = opts.force_push_join_leave or bool(
            opts.join_leave and request.get("join_leave")
        )
        compress = deflate.compressed(self.settings, opts)
        sub = Subscription(
            ch,
            info,
            opts.presence,
            self.format.encoder(join_leave, compress),
            server_side=server_side,
        )
        keeps = opts.history_size > 0 and opts.history_ttl > 0
        recoverable = keeps and bool(request.get("recoverable") or opts.force_recovery)
        positioned = keeps and bool(request.get("positioned") or recoverable)
        self.by_name[name] = sub
        result: dict[str, Any] = {}
        after = 0
        try:
            await self.hub.subscribe(self.session, name, sub.encoder, buffer=True)
            if positioned:
                history = await self._position(name, request, recoverable, result)
                after = history.position.offset
                result.update(
                    recoverable=recoverable,
                    positioned=positioned,
                    epoch=history.position.epoch,
                    offset=history.position.offset,
                )
            if opts.presence:
                await self.hub.broker.add_presence(name, info, opts.presence_ttl)
                self._ensure_presence_refresh()
            if opts.join_leave:
                await self.hub.broker.publish_join_leave(JoinLeave(name, info, True))
            ttl = self.creds.sub_expiry(sub, claims.get("exp") if claims else None)
        except BaseException:
            await self.drop(name, sub)
            raise
        if ttl is not None:
            result.update(expires=True, ttl=ttl)
        activations[name] = after
        return wire.compact(result)

    async def _position(
        self, name: str, request: dict[str, Any], recoverable: bool, result: dict[str, Any]
    ) -> HistoryResult:
        """The stream position (and, when recovering, the publications missed) into ``result``."""
        if recoverable and request.get("recover"):
            since = StreamPosition(
                wire.non_negative(request.get("offset"), "offset"), str(request.get("epoch") or "")
            )
            cap = self.settings.recovery_max_publications
            history = await self.hub.history(name, since=since, limit=cap + 1)
            # Past the cap the client is better off reloading its state than replaying.
            recovered = len(history.publications) <= cap and is_recovered(history, since)
            if not recovered and _flag(request) & REJECT_UNRECOVERED:
                raise UnrecoverablePosition()  # add() undoes the subscription
            result["was_recovering"] = True
            result["recovered"] = recovered
            if recovered:
                result["publications"] = [wire.publication(p) for p in history.publications]
            else:
                log.info("client %s could not recover %r", self.session.client_id, name)
            return history
        return await self.hub.history(name, limit=0)

    def activate(self, activations: dict[str, int]) -> None:
        """End the buffering of the subscriptions just made (their replies are queued): queue
        what each got meanwhile past the offset its reply brought the client to."""
        session = self.session
        for name, after in activations.items():
            sub = self.by_name.get(name)
            if sub is None:
                continue
            encoder = sub.encoder
            for pub in self.hub.activate(session, name, encoder, after):
                if pub.offset > after or not pub.offset:
                    session.enqueue(encoder.push(pub))

    # -- unsubscribing ---------------------------------------------------------------------------

    async def unsubscribe(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``unsubscribe`` command (not subscribed: nothing to do, no error)."""
        name = wire.channel_name(request)
        sub = self.by_name.get(name)
        if sub is not None:
            await self.drop(name, sub)
        return {}

    async def drop(self, name: str, sub: Subscription) -> None:
        """Forget one subscription: hub, presence, leave event (its deadline goes with it)."""
        if self.by_name.get(name) is sub:
            del self.by_name[name]
        await self.hub.unsubscribe(self.session, name)
        opts = sub.channel.options
        with contextlib.suppress(Exception):
            if sub.presence:
                await self.hub.broker.remove_presence(name, sub.info.client)
            if opts.join_leave:
                await self.hub.broker.publish_join_leave(JoinLeave(name, sub.info, False))

    async def close(self) -> None:
        """The connection ended: drop every subscription."""
        if self._presence_task is not None:
            self._presence_task.cancel()
        for name, sub in list(self.by_name.items()):
            await self.drop(name, sub)

    # -- presence --------------------------------------------------------------------------------

    def _ensure_presence_refresh(self) -> None:
        if self._presence_task is None:
            loop = asyncio.get_running_loop()
            self._presence_task = loop.create_task(self._refresh_presence())

    async def _refresh_presence(self) -> None:
        """Keep presence entries alive while subscribed (a third of their ttl)."""
        while True:
            subs = [s for s in self.by_name.values() if s.presence]
            ttl = min((s.channel.options.presence_ttl for s in subs), default=60.0)
            await asyncio.sleep(ttl / 3)
            for sub in [s for s in self.by_name.values() if s.presence]:
                opts = sub.channel.options
                try:
                    await self.hub.broker.add_presence(
                        sub.channel.name, sub.info, opts.presence_ttl
                    )
                except Exception:
                    log.exception("refreshing presence in %r failed", sub.channel.name)
