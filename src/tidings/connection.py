"""``/connection/websocket``: Centrifugo's client protocol v2 (JSON), so its SDKs connect as-is.

:class:`CentrifugeEndpoint` is the ASGI app; each connection gets a :class:`Client`, which runs
the commands of one frame in order and queues all their replies together, so they leave in one
WebSocket frame. Subscriptions start *buffered* in the hub: the reply (with any recovered
publications) is queued first, then whatever arrived meanwhile that the client has not seen
(by offset), then live publications — no gap, no duplicate.

Errors follow Centrifugo: a reply ``error`` (102 unknown channel, 103 permission denied, 105
already subscribed, 106 channel limit, 107 bad channel, 109 token expired, 111 too many
commands) keeps the connection; malformed protocol closes it with 3501, an invalid token with
3500, an unrefreshed expired token with 3005, a missed pong with 3012.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import orjson
from starlette.types import Receive, Scope, Send

from .auth import ANONYMOUS, Credentials, can_subscribe, check_user_limited
from .brokers.base import ClientInfo, HistoryResult, JoinLeave, StreamPosition, compact
from .channels import PRIVATE_PREFIX, USER_SEPARATOR, Channel
from .delivery import takes_frames
from .endpoints import admit
from .errors import (
    BAD_REQUEST,
    INVALID_TOKEN,
    AlreadySubscribed,
    BadRequest,
    Disconnect,
    LimitExceeded,
    MethodNotFound,
    NotAvailable,
    PermissionDenied,
    TidingsError,
    TokenExpired,
    TooManyRequests,
    Unauthorized,
    UnrecoverablePosition,
)
from .frames import Frame
from .protocol import centrifuge as wire
from .session import Session
from .transport import open_transport

if TYPE_CHECKING:
    from .app import Tidings
    from .config import Settings
    from .hub import Hub

log = logging.getLogger("tidings.connection")

try:
    VERSION = metadata.version("tidings")
except metadata.PackageNotFoundError:  # running from a source tree
    VERSION = "0"

EXPIRED = Disconnect(3005, "connection expired")
SUB_EXPIRED = Disconnect(3006, "subscription expired")
STALE = Disconnect(3502, "stale")
NO_SEND_HANDLER = Disconnect(3508, "not available")
SERVER_UNSUBSCRIBE = {"code": 2000, "reason": "server unsubscribe"}


@dataclass(slots=True, eq=False)
class _Sub:
    channel: Channel
    info: ClientInfo
    presence: bool
    encoder: wire.CentrifugeJson  # with join/leave pushes or not, str or pre-built frames
    closes_at: float | None = None  # loop time: closed 3006 then unless refreshed


def _channel_name(request: dict[str, Any]) -> str:
    name = request.get("channel")
    if not isinstance(name, str) or not name:
        raise Disconnect(3501, "bad request: channel required")
    return name


def _positive_int(value: Any, name: str) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"{name} must be a non-negative integer")
    return value


def is_recovered(history: HistoryResult, since: StreamPosition) -> bool:
    """Whether ``history`` (read after ``since``) makes a client at ``since`` whole: same epoch
    and nothing trimmed between ``since`` and the oldest publication kept."""
    position = history.position
    if since.epoch != position.epoch or since.offset > position.offset:
        return False
    pubs = history.publications
    if not pubs:
        return since.offset == position.offset
    return pubs[0].offset == since.offset + 1


class Client:
    """One Centrifugo-protocol connection: its credentials, subscriptions and deadlines.

    Kept small, as there is one per idle connection: slots, no timer of its own (its deadlines
    -- ``connect`` within ``connect_timeout``, token and subscription expiry -- are one entry
    in the hub's wheel, due at the earliest of them) and no task set until it spawns one."""

    __slots__ = (
        "_closes_at",
        "_due",
        "_last",
        "_presence_task",
        "_tasks",
        "_tokens",
        "connected",
        "session",
        "subs",
        "tidings",
        "wheel_bucket",
        "who",
    )

    def __init__(self, tidings: Tidings, session: Session) -> None:
        self.tidings = tidings
        self.session = session
        self.who: Credentials = ANONYMOUS
        self.connected = False
        self.subs: dict[str, _Sub] = {}
        # commands allowed: max_commands_per_second, command_burst at once (a token bucket)
        self._tokens = float(tidings.settings.command_burst)
        self._last = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._closes_at: float | None = None  # loop time: closed 3005 then unless refreshed
        self._due = 0.0  # the deadline the wheel calls on_tick for
        self.wheel_bucket: set[Any] | None = None
        tidings.hub.wheel.schedule(self, tidings.settings.connect_timeout)  # else closed 3502
        session.protocol = self

    @property
    def hub(self) -> Hub:
        return self.tidings.hub

    @property
    def settings(self) -> Settings:
        return self.tidings.settings

    @property
    def format(self) -> wire.CentrifugeJson:
        """The session's wire format: str pushes, or pre-built frames on a direct transport."""
        fmt = self.session.format
        assert isinstance(fmt, wire.CentrifugeJson)
        return fmt

    def _take(self) -> bool:
        """One command's token from the bucket; False: too many commands (error 111)."""
        rate = self.settings.max_commands_per_second
        if not rate:
            return True
        now = time.monotonic()
        burst = float(self.settings.command_burst)
        tokens = min(burst, self._tokens + (now - self._last) * rate)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    # -- frames ----------------------------------------------------------------------------------

    async def handle(self, session: Session, frame: Frame) -> None:
        """Run every command of one frame, then queue their replies together."""
        replies: list[str] = []
        activations: dict[str, int] = {}
        for command in wire.decode(frame):
            if command is None:  # a pong
                if not self.connected:
                    raise BAD_REQUEST
                session.pong()
                continue
            if (command.method == "connect") == self.connected:
                raise Disconnect(3501, "bad request: connect must come first, once")
            if not self._take():
                if command.id:
                    replies.append(wire.error_reply(command.id, TooManyRequests()))
                continue
            answer = await self._run(command, activations)
            if answer is not None:
                replies.append(answer)
        self._flush(replies, activations)

    async def _run(self, command: wire.Command, activations: dict[str, int]) -> str | None:
        request = command.request
        try:
            if command.method == "send":
                await self.send(request)
                return None
            if command.method == "ping":
                result: dict[str, Any] = {}
            elif command.method in ("subscribe", "connect"):
                result = await getattr(self, command.method)(request, activations)
            else:
                result = await getattr(self, command.method)(request)
        except TidingsError as exc:
            return wire.error_reply(command.id, exc)
        return wire.reply(command.id, command.method, result)

    def _flush(self, replies: list[str], activations: dict[str, int]) -> None:
        """Replies first, then what each new subscription got meanwhile past its offset."""
        session = self.session
        for answer in replies:
            session.enqueue(answer)
        for name, after in activations.items():
            sub = self.subs.get(name)
            if sub is None:
                continue
            encoder = sub.encoder
            for pub in self.hub.activate(session, name, encoder, after):
                if pub.offset > after or not pub.offset:
                    session.enqueue(encoder.push(pub))

    # -- connect and tokens ----------------------------------------------------------------------

    async def connect(self, request: dict[str, Any], activations: dict[str, int]) -> dict[str, Any]:
        token = request.get("token")
        if token:
            who = await self._verify(self.tidings.tokens.aconnection(str(token)))
        elif self.settings.anonymous_allowed:
            who = ANONYMOUS
        else:
            log.info("refusing a connection without a token (anonymous not allowed)")
            raise Disconnect(3501, "bad request: token required")
        self.who = who
        self.connected = True
        if who.user:
            self.hub.set_user(self.session, who.user)
        self.session.info = who.info
        self.session.start_heartbeats(self.settings.ping_interval)
        ttl = self._set_expiry(who.expires)
        subs: dict[str, Any] = {}
        given = request.get("subs")
        wanted: dict[str, Any] = given if isinstance(given, dict) else {}
        for name in who.channels:  # server-side subscriptions from the token
            try:
                ch = self.hub.channel(name)
                asked = wanted.get(name) if isinstance(wanted.get(name), dict) else {}
                subs[name] = await self._subscribe(ch, asked or {}, None, activations)
            except TidingsError as exc:
                log.warning("server-side subscription to %r failed: %s", name, exc.message)
        return wire.compact(
            {
                "client": self.session.client_id,
                "version": VERSION,
                "ping": max(1, round(self.settings.ping_interval)),
                "pong": True,
                "expires": ttl is not None,
                "ttl": ttl,
                "subs": subs,
                "node": self.hub.node_id,
            }
        )

    async def _verify(self, pending: Any) -> Any:
        """Await a token check: expired -> error 109 (SDKs refresh), invalid -> close 3500."""
        try:
            return await pending
        except TokenExpired:
            raise
        except Unauthorized as exc:
            log.info("closing %s: %s", self.session.client_id, exc.message)
            raise INVALID_TOKEN from None

    def _closing_time(self, expires: float | None) -> tuple[float | None, int | None]:
        """For a token expiring at ``expires`` (Unix time; None: never): the loop time to close
        the client at unless it refreshes, and the ttl it is told (it refreshes after that)."""
        if expires is None:
            return None, None
        ttl = max(1, int(expires - time.time()))
        return asyncio.get_running_loop().time() + ttl + self.settings.expired_close_delay, ttl

    def _set_expiry(self, expires: float | None) -> int | None:
        self._closes_at, ttl = self._closing_time(expires)
        self._rearm()
        return ttl

    def _rearm(self) -> None:
        """Put the client in the hub's wheel for its earliest deadline (out of it: none)."""
        due = self._closes_at
        for sub in self.subs.values():
            if sub.closes_at is not None and (due is None or sub.closes_at < due):
                due = sub.closes_at
        if due is None:
            self.hub.wheel.cancel(self)
            return
        self._due = due
        self.hub.wheel.schedule(self, due - asyncio.get_running_loop().time())

    def on_tick(self) -> None:
        """The hub's wheel: ``connect`` never came, or a token (or several) expired."""
        session = self.session
        if not self.connected:
            session.close(STALE)
            return
        due = self._due  # what the wheel was scheduled for: every deadline up to it passed
        if self._closes_at is not None and self._closes_at <= due:
            session.close(EXPIRED)
            return
        for sub in self.subs.values():
            if sub.closes_at is not None and sub.closes_at <= due:
                session.close(SUB_EXPIRED)
                return
        self._rearm()  # what was due is gone (unsubscribed): on to the next deadline

    async def refresh(self, request: dict[str, Any]) -> dict[str, Any]:
        token = request.get("token")
        if not token:
            raise Disconnect(3501, "bad request: token required")
        who = await self._verify(self.tidings.tokens.aconnection(str(token)))
        if who.user != self.who.user:
            raise INVALID_TOKEN
        self.who = who
        ttl = self._set_expiry(who.expires)
        return wire.compact(
            {
                "client": self.session.client_id,
                "version": VERSION,
                "expires": ttl is not None,
                "ttl": ttl,
            }
        )

    async def sub_refresh(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _channel_name(request)
        sub = self.subs.get(name)
        if sub is None:
            raise PermissionDenied("not subscribed")
        token = request.get("token")
        if not token:
            raise Disconnect(3501, "bad request: token required")
        claims = await self._verify(
            self.tidings.tokens.asubscription(str(token), name, self.who.user)
        )
        ttl = self._sub_expiry(sub, claims.get("exp"))
        return wire.compact({"expires": ttl is not None, "ttl": ttl})

    def _sub_expiry(self, sub: _Sub, expires: float | None) -> int | None:
        sub.closes_at, ttl = self._closing_time(expires)
        if sub.closes_at is not None or self.wheel_bucket is not None:
            self._rearm()
        return ttl

    # -- subscriptions ---------------------------------------------------------------------------

    async def subscribe(
        self, request: dict[str, Any], activations: dict[str, int]
    ) -> dict[str, Any]:
        name = _channel_name(request)
        if name in self.subs:
            raise AlreadySubscribed()
        ch = self.hub.channel(name)
        token = request.get("token")
        claims: dict[str, Any] | None = None
        if token:
            claims = await self._verify(
                self.tidings.tokens.asubscription(str(token), name, self.who.user)
            )
        else:
            self._check_readable(ch)
        return await self._subscribe(ch, request, claims, activations)

    def _check_readable(self, ch: Channel) -> None:
        """What a client needs to see a channel without a subscription token."""
        if ch.name.startswith(PRIVATE_PREFIX):
            raise PermissionDenied("private channel: a subscription token is required")
        if USER_SEPARATOR in ch.name:
            check_user_limited(ch.name, self.who.user)
        can_subscribe(self.settings, ch, self.who, token=False)

    async def _subscribe(
        self,
        ch: Channel,
        request: dict[str, Any],
        claims: dict[str, Any] | None,
        activations: dict[str, int],
    ) -> dict[str, Any]:
        """Subscribe buffered, read the position (and recover); ``activations`` gets the offset
        after which buffered publications are still news to the client."""
        if len(self.subs) >= self.settings.max_channels_per_connection:
            raise LimitExceeded("too many channels on this connection")
        opts = ch.options
        name = ch.name
        chan_info = claims.get("info") if claims else None
        info = ClientInfo(
            self.session.client_id,
            self.who.user,
            self.who.info,
            compact(orjson.dumps(chan_info)) if chan_info is not None else None,
        )
        join_leave = opts.force_push_join_leave or bool(
            opts.join_leave and request.get("join_leave")
        )
        sub = _Sub(ch, info, opts.presence, self.format.encoder(join_leave))
        keeps = opts.history_size > 0 and opts.history_ttl > 0
        recoverable = keeps and bool(request.get("recoverable") or opts.force_recovery)
        positioned = keeps and bool(request.get("positioned") or recoverable)
        self.subs[name] = sub
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
            ttl = self._sub_expiry(sub, claims.get("exp") if claims else None)
        except BaseException:
            await self._drop(name, sub)
            raise
        if ttl is not None:
            result.update(expires=True, ttl=ttl)
        activations[name] = after
        return wire.compact(result)

    async def _position(
        self, name: str, request: dict[str, Any], recoverable: bool, result: dict[str, Any]
    ) -> HistoryResult:
        if recoverable and request.get("recover"):
            since = StreamPosition(
                _positive_int(request.get("offset"), "offset"), str(request.get("epoch") or "")
            )
            cap = self.settings.recovery_max_publications
            history = await self.hub.history(name, since=since, limit=cap + 1)
            # Past the cap the client is better off reloading its state than replaying.
            recovered = len(history.publications) <= cap and is_recovered(history, since)
            result["was_recovering"] = True
            result["recovered"] = recovered
            if recovered:
                result["publications"] = [wire.publication(p) for p in history.publications]
            else:
                log.info("client %s could not recover %r", self.session.client_id, name)
            return history
        return await self.hub.history(name, limit=0)

    async def unsubscribe(self, request: dict[str, Any]) -> dict[str, Any]:
        name = _channel_name(request)
        sub = self.subs.get(name)
        if sub is not None:
            await self._drop(name, sub)
        return {}

    async def _drop(self, name: str, sub: _Sub) -> None:
        """Forget one subscription: hub, presence, leave event, timers."""
        if self.subs.get(name) is sub:
            del self.subs[name]
        await self.hub.unsubscribe(self.session, name)
        opts = sub.channel.options
        with contextlib.suppress(Exception):
            if sub.presence:
                await self.hub.broker.remove_presence(name, sub.info.client)
            if opts.join_leave:
                await self.hub.broker.publish_join_leave(JoinLeave(name, sub.info, False))

    def _ensure_presence_refresh(self) -> None:
        if self._presence_task is None:
            self._presence_task = self.spawn(self._refresh_presence())

    async def _refresh_presence(self) -> None:
        """Keep presence entries alive while subscribed (a third of their ttl)."""
        while True:
            subs = [s for s in self.subs.values() if s.presence]
            ttl = min((s.channel.options.presence_ttl for s in subs), default=60.0)
            await asyncio.sleep(ttl / 3)
            for sub in [s for s in self.subs.values() if s.presence]:
                opts = sub.channel.options
                try:
                    await self.hub.broker.add_presence(
                        sub.channel.name, sub.info, opts.presence_ttl
                    )
                except Exception:
                    log.exception("refreshing presence in %r failed", sub.channel.name)

    # -- channel reads and writes ----------------------------------------------------------------

    def _readable(self, request: dict[str, Any]) -> Channel:
        ch = self.hub.channel(_channel_name(request))
        if ch.name not in self.subs:
            self._check_readable(ch)
        return ch

    async def publish(self, request: dict[str, Any]) -> dict[str, Any]:
        ch = self.hub.channel(_channel_name(request))
        if "data" not in request:
            raise BadRequest("data required")
        if not self.settings.allows_client_publish(ch.options):
            raise PermissionDenied("clients may not publish in this channel")
        sub = self.subs.get(ch.name)
        if sub is None:
            self._check_readable(ch)
            info = ClientInfo(self.session.client_id, self.who.user, self.who.info)
        else:
            info = sub.info
        await self.hub.publish_json(ch.name, orjson.dumps(request["data"]), info=info)
        return {}

    async def history(self, request: dict[str, Any]) -> dict[str, Any]:
        ch = self._readable(request)
        if not ch.options.allow_history:
            raise PermissionDenied("history is not allowed in this channel")
        if ch.options.history_size <= 0:
            raise NotAvailable("this channel keeps no history")
        limit_value = request.get("limit", 0)
        if not isinstance(limit_value, int):
            raise BadRequest("limit must be an integer")
        limit = None if limit_value < 0 else limit_value
        since = None
        given = request.get("since")
        if isinstance(given, dict):
            since = StreamPosition(
                _positive_int(given.get("offset"), "since.offset"), str(given.get("epoch") or "")
            )
        reverse = bool(request.get("reverse"))
        result = await self.hub.history(ch.name, since=since, limit=limit, reverse=reverse)
        if since is not None and since.epoch != result.position.epoch:
            raise UnrecoverablePosition()
        return wire.compact(
            {
                "publications": [wire.publication(p) for p in result.publications],
                "epoch": result.position.epoch,
                "offset": result.position.offset,
            }
        )

    async def presence(self, request: dict[str, Any]) -> dict[str, Any]:
        ch = self._presence_channel(request)
        clients = await self.hub.presence(ch.name)
        return {"presence": {cid: wire.client_info(info) for cid, info in clients.items()}}

    async def presence_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        ch = self._presence_channel(request)
        stats = await self.hub.presence_stats(ch.name)
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    def _presence_channel(self, request: dict[str, Any]) -> Channel:
        ch = self._readable(request)
        if not ch.options.allow_presence:
            raise PermissionDenied("presence is not allowed in this channel")
        if not ch.options.presence:
            raise NotAvailable("this channel does not track presence")
        return ch

    # -- application handlers --------------------------------------------------------------------

    async def rpc(self, request: dict[str, Any]) -> dict[str, Any]:
        method = request.get("method") or ""
        handler = self.hub.rpc_handlers.get(str(method))
        if handler is None:
            raise MethodNotFound()
        try:
            result = await handler(self.session, request.get("data"))
            data = orjson.dumps(result) if result is not None else None
        except TidingsError:
            raise
        except Exception:
            log.exception("rpc %r failed", method)
            raise TidingsError() from None  # 100, temporary
        return {"data": orjson.Fragment(data)} if data is not None else {}

    async def send(self, request: dict[str, Any]) -> None:
        handlers = self.hub.send_handlers
        if not handlers:
            raise NO_SEND_HANDLER
        for handler in handlers:
            try:
                await handler(self.session, request.get("data"))
            except Exception:
                log.exception("send handler failed")

    # -- server-side control ---------------------------------------------------------------------

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def server_subscribe(self, name: str) -> None:
        if not self.connected or name in self.subs or self.session.closing:
            return
        activations: dict[str, int] = {}
        try:
            result = await self._subscribe(self.hub.channel(name), {}, None, activations)
        except TidingsError as exc:
            log.warning("server-side subscribe to %r failed: %s", name, exc.message)
            return
        self._flush([wire.push(name, "subscribe", result)], activations)

    async def server_unsubscribe(self, name: str) -> None:
        sub = self.subs.get(name)
        if sub is not None:
            await self._drop(name, sub)
            self.session.enqueue(wire.push(name, "unsubscribe", SERVER_UNSUBSCRIBE))

    def server_refresh(self, expire_at: Any, expired: bool) -> None:
        if expired:
            self.session.close(EXPIRED)
            return
        ttl = self._set_expiry(float(expire_at) if expire_at is not None else None)
        self.session.enqueue(
            wire.push("", "refresh", wire.compact({"expires": ttl is not None, "ttl": ttl}))
        )

    async def close(self) -> None:
        """After the connection ended: presence, leave events, deadlines, tasks."""
        self.hub.wheel.cancel(self)
        for task in list(self._tasks or ()):
            task.cancel()
        for name, sub in list(self.subs.items()):
            await self._drop(name, sub)


class CentrifugeEndpoint:
    """The ASGI app of ``/connection/websocket``; also receives server-side control ops."""

    def __init__(self, tidings: Tidings) -> None:
        self.tidings = tidings
        tidings.hub.on_control_message(self._on_control)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # set up in a helper: this frame stays suspended for the connection's life, keep it small
        session = await self._open(scope, receive, send)
        del scope, receive, send  # an idle connection keeps nothing of its request
        if session is None:
            return
        client = Client(self.tidings, session)
        try:
            await session.serve(client.handle)
        finally:
            await client.close()

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> Session | None:
        hub, settings = self.tidings.hub, self.tidings.settings
        transport = open_transport(scope, receive, send, settings.max_message_size)
        await transport.accept()
        # Pings start once the client has connected: before that any frame, a pong too, is a
        # protocol error (3501), so a ping would only provoke one.
        # a direct transport writes pre-built frames: pushes are framed once per publication
        fmt = wire.wire_format(takes_frames(transport))
        session = Session(hub, transport, fmt, pong_timeout=settings.pong_timeout)
        return session if await admit(session) else None

    def _clients(self, message: dict[str, Any]) -> list[Client]:
        user = str(message.get("user", ""))
        only = message.get("client")
        found = []
        for session in self.tidings.hub.users.get(user, ()):
            client = session.protocol
            if isinstance(client, Client) and (not only or session.client_id == only):
                found.append(client)
        return found

    def _on_control(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op not in ("subscribe", "unsubscribe", "refresh"):
            return
        for client in self._clients(message):
            if op == "refresh":
                client.server_refresh(message.get("expire_at"), bool(message.get("expired")))
                continue
            channel = message.get("channel")
            if not isinstance(channel, str) or not channel:
                log.warning("ignoring a %s control message without a channel", op)
                return
            if op == "subscribe":
                client.spawn(client.server_subscribe(channel))
            else:
                client.spawn(client.server_unsubscribe(channel))
