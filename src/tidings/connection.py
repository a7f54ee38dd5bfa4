"""``/connection/websocket``: Centrifugo's client protocol v2, so its SDKs connect as-is.

Both flavours: JSON (text frames) and protobuf (binary frames), chosen per connection by the
``centrifuge-protobuf`` subprotocol or ``?format=protobuf`` (:func:`wants_protobuf`); the
session's wire format is the flavour's encoder, and the commands go through its codec
(:mod:`tidings.protocol.centrifuge`, :mod:`tidings.protocol.centrifuge_protobuf`) to the same
handlers.

:class:`CentrifugeEndpoint` is the ASGI app; each connection gets a :class:`Client`, which runs
the commands of one frame in order, each through the :data:`COMMANDS` table, and queues all
their replies together, so they leave in one WebSocket frame. A client's credentials and
deadlines are its :class:`~tidings.credentials.ConnectionCredentials`; its subscriptions (with
recovery and rollback) its :class:`~tidings.subscriptions.Subscriptions`.

Errors follow Centrifugo: a reply ``error`` (102 unknown channel, 103 permission denied, 105
already subscribed, 106 channel limit, 107 bad channel, 109 token expired, 111 too many
commands) keeps the connection; malformed protocol closes it with 3501, an invalid connection
token with 3500 (an invalid subscription token is error 103), an unrefreshed expired token
with 3005, a missed pong with 3012.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from .admission import admitted
from .auth import scope_origin_allowed
from .brokers.base import ClientInfo, StreamPosition
from .channels import Channel
from .control import ControlMessage, RefreshUser, SubscribeUser, UnsubscribeUser
from .credentials import ConnectionCredentials
from .delivery import takes_frames
from .endpoints import POLICY, admit, log_closed, log_connected, log_refused, refuse_origin
from .errors import (
    BAD_REQUEST,
    INSUFFICIENT_STATE,
    BadRequest,
    CloseReason,
    Disconnect,
    MethodNotFound,
    NotAvailable,
    PermissionDenied,
    TidingsError,
    TooManyRequests,
    UnrecoverablePosition,
)
from .frames import Frame
from .protocol import centrifuge as wire
from .protocol.centrifuge_protobuf import SUBPROTOCOL as PROTOBUF
from .session import Session
from .subscriptions import INSUFFICIENT_UNSUBSCRIBE, SERVER_UNSUBSCRIBE, Subscription, Subscriptions
from .transport import negotiated_deflate, open_transport

if TYPE_CHECKING:
    from .app import Tidings
    from .config import Settings
    from .hub import Hub

log = logging.getLogger("tidings.connection")

#: the endpoint's path, for log lines
PATH = "/connection/websocket"

NO_SEND_HANDLER = CloseReason(3508, "not available")

#: a command's request object
Request = dict[str, Any]
#: the subscriptions the commands of one frame made: channel -> the offset their replies bring
#: the client to (see :meth:`~tidings.subscriptions.Subscriptions.activate`)
Activations = dict[str, int]
#: ``handler(client, request, activations)``: a command's reply result (None: no reply). One
#: signature for every command, so the table dispatches with one call and no wrapper.
Handler = Callable[["Client", Request, Activations], Awaitable[dict[str, Any] | None]]


class Client:
    """One Centrifugo-protocol connection: runs its commands, rate-limits them, queues replies.

    Kept small, as there is one per idle connection: slots, no timer of its own (its deadlines
    are one entry in the hub's wheel, kept by ``creds``) and no task set until it spawns one."""

    __slots__ = (
        "_last",
        "_tasks",
        "_tokens",
        "creds",
        "extra",
        "path",
        "session",
        "subs",
        "tidings",
    )

    def __init__(self, tidings: Tidings, session: Session, path: str = PATH) -> None:
        self.tidings = tidings
        #: the endpoint it came through (without the query string), for log lines
        self.path = path
        self.session = session
        hub, settings = tidings.hub, tidings.settings
        by_name: dict[str, Subscription] = {}
        self.creds = ConnectionCredentials(hub, settings, tidings.tokens, session, by_name)
        self.subs = Subscriptions(hub, settings, session, self.creds)
        # commands allowed: max_commands_per_second, command_burst at once (a token bucket)
        self._tokens = float(settings.command_burst)
        self._last = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] | None = None
        #: fields the transport adds to the connect result (emulation: ``session``, ``node``)
        self.extra: dict[str, Any] | None = None
        session.protocol = self

    @property
    def hub(self) -> Hub:
        return self.tidings.hub

    @property
    def settings(self) -> Settings:
        return self.tidings.settings

    @property
    def connected(self) -> bool:
        return self.creds.connected

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
        replies: list[Frame] = []
        activations: Activations = {}
        codec = self.subs.format  # the connection's flavour: JSON or protobuf
        for command in codec.decode(frame):
            if command is None:  # a pong
                if not self.creds.connected:
                    raise BAD_REQUEST()
                session.pong()
                continue
            if (command.method == "connect") == self.creds.connected:
                raise Disconnect(3501, "bad request: connect must come first, once")
            if not self._take():
                if command.id:
                    replies.append(codec.error_reply(command.id, TooManyRequests()))
                continue
            answer = await self._run(codec, command, activations)
            if answer is not None:
                replies.append(answer)
        self._flush(replies, activations)

    async def _run(
        self, codec: wire.CentrifugeJson, command: wire.Command, activations: Activations
    ) -> Frame | None:
        if command.error is not None:  # refused by the decoder (e.g. protobuf data not JSON)
            return codec.error_reply(command.id, command.error)
        try:
            result = await COMMANDS[command.method](self, command.request, activations)
        except TidingsError as exc:
            return codec.error_reply(command.id, exc)
        return None if result is None else codec.reply(command.id, command.method, result)

    def _flush(self, replies: list[Frame], activations: Activations) -> None:
        """Replies first, then what each new subscription got meanwhile past its offset."""
        session = self.session
        for answer in replies:
            session.enqueue(answer)
        self.subs.activate(activations)

    # -- commands (see COMMANDS) -----------------------------------------------------------------

    async def connect(self, request: Request, activations: Activations) -> dict[str, Any]:
        ttl = await self.creds.connect(request.get("token"))
        log_connected(self.path, self.session, log)
        subs: dict[str, Any] = {}
        given = request.get("subs")
        wanted: dict[str, Any] = given if isinstance(given, dict) else {}
        for name in self.creds.who.channels:  # server-side subscriptions from the token
            try:
                ch = self.hub.channel(name)
                asked = wanted.get(name) if isinstance(wanted.get(name), dict) else {}
                subs[name] = await self.subs.add(
                    ch, asked or {}, None, activations, server_side=True
                )
            except TidingsError as exc:
                log.warning("server-side subscription to %r failed: %s", name, exc.message)
        return wire.compact(
            {
                "client": self.session.client_id,
                "version": wire.VERSION,
                "ping": max(1, round(self.settings.ping_interval)),
                "pong": True,
                "expires": ttl is not None,
                "ttl": ttl,
                "subs": subs,
                "node": self.hub.node_id,
                **(self.extra or {}),
            }
        )

    async def subscribe(self, request: Request, activations: Activations) -> dict[str, Any]:
        return await self.subs.subscribe(request, activations)

    async def unsubscribe(self, request: Request, activations: Activations) -> dict[str, Any]:
        return await self.subs.unsubscribe(request)

    async def refresh(self, request: Request, activations: Activations) -> dict[str, Any]:
        return await self.creds.refresh(request)

    async def sub_refresh(self, request: Request, activations: Activations) -> dict[str, Any]:
        return await self.creds.sub_refresh(request)

    async def ping(self, request: Request, activations: Activations) -> dict[str, Any]:
        return {}

    async def publish(self, request: Request, activations: Activations) -> dict[str, Any]:
        ch = self.hub.channel(wire.channel_name(request))
        if "data" not in request:
            raise BadRequest("data required")
        if not self.settings.allows_client_publish(ch.options):
            raise PermissionDenied("clients may not publish in this channel")
        sub = self.subs.by_name.get(ch.name)
        if sub is None:
            self.subs.check_readable(ch)
            who = self.creds.who
            info = ClientInfo(self.session.client_id, who.user, who.info)
        else:
            info = sub.info
        await self.hub.publish_json(ch.name, orjson.dumps(request["data"]), info=info)
        return {}

    async def history(self, request: Request, activations: Activations) -> dict[str, Any]:
        ch = self.subs.readable(request)
        if not ch.options.allow_history:
            raise PermissionDenied("history is not allowed in this channel")
        if ch.options.history_size <= 0:
            raise NotAvailable("this channel keeps no history")
        limit = wire.limit(request.get("limit"))
        since = None
        given = request.get("since")
        if isinstance(given, dict):
            since = StreamPosition(
                wire.non_negative(given.get("offset"), "since.offset"),
                str(given.get("epoch") or ""),
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

    async def presence(self, request: Request, activations: Activations) -> dict[str, Any]:
        ch = self._presence_channel(request)
        clients = await self.hub.presence(ch.name)
        return {"presence": {cid: wire.client_info(info) for cid, info in clients.items()}}

    async def presence_stats(self, request: Request, activations: Activations) -> dict[str, Any]:
        ch = self._presence_channel(request)
        stats = await self.hub.presence_stats(ch.name)
        return {"num_clients": stats.num_clients, "num_users": stats.num_users}

    def _presence_channel(self, request: Request) -> Channel:
        ch = self.subs.readable(request)
        if not ch.options.allow_presence:
            raise PermissionDenied("presence is not allowed in this channel")
        if not ch.options.presence:
            raise NotAvailable("this channel does not track presence")
        return ch

    async def rpc(self, request: Request, activations: Activations) -> dict[str, Any]:
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

    async def send(self, request: Request, activations: Activations) -> None:
        """An asynchronous message: no reply; without a handler the connection closes (3508)."""
        handlers = self.hub.send_handlers
        if not handlers:
            raise NO_SEND_HANDLER()
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
        if not self.creds.connected or name in self.subs.by_name or self.session.closing:
            return
        activations: Activations = {}
        try:
            result = await self.subs.add(
                self.hub.channel(name), {}, None, activations, server_side=True
            )
        except TidingsError as exc:
            log.warning("server-side subscribe to %r failed: %s", name, exc.message)
            return
        self._flush([self.subs.format.push_frame(name, "subscribe", result)], activations)

    async def server_unsubscribe(self, name: str) -> None:
        sub = self.subs.by_name.get(name)
        if sub is not None:
            await self.subs.drop(name, sub)
            push = self.subs.format.push_frame(name, "unsubscribe", SERVER_UNSUBSCRIBE)
            self.session.enqueue(push)

    def stream_lost(self, name: str) -> None:
        """The hub cannot continue ``name``'s stream for this client (it no longer delivers it
        here): the unsubscribe push 2500 asks the SDK to resubscribe, and its recovery then
        answers ``recovered: false``. A server-side subscription, which the SDK cannot
        resubscribe, closes the connection with 3010 instead: the SDK reconnects and recovers.
        As centrifuge does (client.go, handleInsufficientState)."""
        sub = self.subs.by_name.pop(name, None)
        if sub is None:
            return
        if sub.server_side:
            self.session.close(INSUFFICIENT_STATE())
            return
        push = self.subs.format.push_frame(name, "unsubscribe", INSUFFICIENT_UNSUBSCRIBE)
        self.session.enqueue(push)  # in the connection's flavour, JSON or protobuf
        self.spawn(self.subs.drop(name, sub))  # presence and the leave event

    def server_refresh(self, expire_at: float | None, expired: bool) -> None:
        self.creds.server_refresh(expire_at, expired)

    async def close(self) -> None:
        """After the connection ended: deadlines, tasks, presence, leave events."""
        self.creds.close()
        for task in list(self._tasks or ()):
            task.cancel()
        await self.subs.close()


#: every command a client may send (:data:`tidings.protocol.centrifuge.METHODS`) and its handler
COMMANDS: dict[str, Handler] = {
    "connect": Client.connect,
    "subscribe": Client.subscribe,
    "unsubscribe": Client.unsubscribe,
    "publish": Client.publish,
    "presence": Client.presence,
    "presence_stats": Client.presence_stats,
    "history": Client.history,
    "ping": Client.ping,
    "send": Client.send,
    "rpc": Client.rpc,
    "refresh": Client.refresh,
    "sub_refresh": Client.sub_refresh,
}


def wants_protobuf(scope: Scope) -> tuple[bool, bool]:
    """Whether the client offers the ``centrifuge-protobuf`` subprotocol (it is then named in
    the handshake's answer), and whether it speaks protobuf: offered, or ``?format=protobuf``
    (``?cf_protocol=protobuf``, as centrifuge-js names it on other transports) in the URL, for
    clients that cannot set a subprotocol. Blank entries of the client's list are ignored."""
    offered = PROTOBUF in (p.strip() for p in scope.get("subprotocols") or ())
    if offered:
        return True, True
    query = scope.get("query_string") or b""
    if b"protobuf" not in query:
        return False, False
    asked = parse_qs(query.decode("latin-1"))
    return False, "protobuf" in (*asked.get("format", ()), *asked.get("cf_protocol", ()))


class CentrifugeEndpoint:
    """The ASGI app of ``/connection/websocket``; also receives server-side control ops."""

    def __init__(self, tidings: Tidings) -> None:
        self.tidings = tidings
        #: this hub's encoders: their caches are shared by its clients, by no other hub's
        settings = tidings.settings
        self.encoders = wire.CentrifugeEncoders(
            settings.compression_level, settings.compression_min_size
        )
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
            if client.connected:
                log_closed(PATH, session, log)
            else:  # never got past connect: a refusal, with its reason
                reason = session.closed_with
                if reason is not None:
                    log_refused(PATH, reason.code, reason.reason, log)

    async def _open(self, scope: Scope, receive: Receive, send: Send) -> Session | None:
        hub, settings = self.tidings.hub, self.tidings.settings
        if not scope_origin_allowed(settings, scope):
            await refuse_origin(PATH, receive, send)
            return None
        offered, protobuf = wants_protobuf(scope)
        transport = open_transport(
            scope, receive, send, settings.max_message_size, settings.close_timeout
        )
        if not admitted(self.tidings, scope):
            await transport.close(POLICY, "connection rate")  # before accept: HTTP 403
            return None
        await transport.accept(PROTOBUF if offered else None)
        # Pings start once the client has connected: before that any frame, a pong too, is a
        # protocol error (3501), so a ping would only provoke one.
        # a direct transport writes pre-built frames: pushes are framed once per publication
        # and, if it negotiated permessage-deflate (JSON only), compressed once per publication
        fmt = self.encoders.wire_format(
            takes_frames(transport), protobuf=protobuf, deflate=negotiated_deflate(transport)
        )
        session = Session(hub, transport, fmt, pong_timeout=settings.pong_timeout)
        return session if await admit(session) else None

    def _clients(self, message: ControlMessage) -> list[Client]:
        found = []
        for session in self.tidings.hub.local_sessions(message.user, message.client):
            client = session.protocol
            if isinstance(client, Client):
                found.append(client)
        return found

    def _on_control(self, message: ControlMessage) -> None:
        """Server-side subscribe, unsubscribe and refresh of this node's Centrifugo clients."""
        if isinstance(message, RefreshUser):
            for client in self._clients(message):
                client.server_refresh(message.expire_at, message.expired)
        elif isinstance(message, SubscribeUser):
            for client in self._clients(message):
                client.spawn(client.server_subscribe(message.channel))
        elif isinstance(message, UnsubscribeUser):
            for client in self._clients(message):
                client.spawn(client.server_unsubscribe(message.channel))
