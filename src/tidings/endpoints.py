"""WebSocket endpoints as plain ASGI apps (no per-message framework overhead)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from .admission import admitted, check_user_limit
from .auth import ANONYMOUS, Credentials, can_subscribe, scope_origin_allowed
from .brokers.base import ClientInfo, Publication, StreamPosition
from .control import ControlMessage, UnsubscribeUser
from .delivery import takes_frames
from .errors import (
    INSUFFICIENT_STATE,
    UNAVAILABLE,
    BadRequest,
    CloseReason,
    Disconnect,
    TidingsError,
    Unavailable,
)
from .frames import Frame
from .protocol import deflate
from .protocol.deflate import Compressor
from .protocol.raw import RawDeflate, RawText, raw_format
from .session import Session
from .transport import negotiated_deflate, open_transport

if TYPE_CHECKING:
    from .app import Tidings
    from .hub import Hub

log = logging.getLogger("tidings.endpoints")

POLICY = 1008
UNSUPPORTED = 1003
#: policy close: the server unsubscribed this user (clients should not simply resubscribe)
UNSUBSCRIBED = CloseReason(POLICY, "unsubscribed by the server")


def close_reason(message: str) -> str:
    """A close reason must fit in 123 bytes."""
    raw = message.encode()[:123]
    return raw.decode(errors="ignore")


def _replay_from(query: dict[str, list[str]]) -> tuple[int, str] | None:
    """``?since=OFFSET&epoch=EPOCH``: where a reconnecting raw client left off (``since=0``,
    everything kept, needs no epoch); BadRequest otherwise."""
    if "since" not in query:
        return None
    try:
        offset = int(query["since"][0])
    except ValueError:
        raise BadRequest("since must be an integer offset") from None
    epoch = query.get("epoch", [""])[0]
    if offset > 0 and not epoch:
        # without the epoch an offset of a lost stream would be taken for one of the
        # current stream, and the publications before it skipped silently
        raise BadRequest("since=OFFSET needs the stream's epoch: &epoch=EPOCH")
    return max(offset, 0), epoch


def continues(top: StreamPosition, after: list[Publication], offset: int, epoch: str) -> bool:
    """Whether a client that has everything up to ``offset`` of ``epoch`` is made whole by
    ``after``, the publications history keeps past ``offset``, in a stream now at ``top``:
    same epoch, ``offset`` not past the top, and nothing trimmed."""
    if epoch != top.epoch or offset > top.offset:
        return False
    return after[0].offset == offset + 1 if after else offset == top.offset


def log_refused(path: str, code: int, reason: str, logger: logging.Logger = log) -> None:
    """The one log line of a refused connection: where, the close code and why.
    ``path`` has no query string (tokens travel there)."""
    logger.info(
        "refused %s: %d %s",
        path,
        code,
        reason,
        extra={"event": "refused", "path": path, "code": code, "reason": reason},
    )


def log_connected(path: str, session: Session, logger: logging.Logger = log) -> None:
    """The one log line of an accepted connection (``path`` without its query string)."""
    user = session.user or "anonymous"
    logger.info(
        "connected %s client=%s user=%s",
        path,
        session.client_id,
        user,
        extra={"event": "connected", "path": path, "client": session.client_id, "user": user},
    )


def log_closed(path: str, session: Session, logger: logging.Logger = log) -> None:
    """The one log line of a connection's end: the close code and reason."""
    reason = session.closed_with
    code, why = (reason.code, reason.reason) if reason is not None else (1006, "")
    logger.info(
        "closed %s client=%s: %d %s",
        path,
        session.client_id,
        code,
        why,
        extra={
            "event": "closed",
            "path": path,
            "client": session.client_id,
            "code": code,
            "reason": why,
        },
    )


async def refuse_origin(path: str, receive: Receive, send: Send) -> None:
    """Refuse a WebSocket handshake from a browser origin :func:`~.auth.origin_allowed` does
    not allow: closing before accepting is HTTP 403, on uvicorn and on `tidings serve`."""
    log_refused(path, 403, "origin not allowed")
    await receive()  # websocket.connect
    await send({"type": "websocket.close", "code": POLICY, "reason": ""})


async def admit(session: Session) -> bool:
    """Count a new session in; past ``max_connections`` close it (1013) and return False."""
    try:
        session.hub.connect(session)
    except Disconnect as reason:
        # the code and reason, not the exception: a handler that keeps records would keep its
        # traceback, and through it the refused session
        log.warning("refusing a connection: %d %s", reason.code, reason.reason)
        await session.transport.close(reason.code, reason.reason)
        return False
    return True


class _ClientPublish:
    """Handles what a raw client sends: text is published to its channel, if allowed."""

    __slots__ = ("allowed", "channel", "hub", "info")

    def __init__(self, hub: Hub, channel: str, allowed: bool, session: Session) -> None:
        self.hub = hub
        self.channel = channel
        self.allowed = allowed
        self.info = ClientInfo(session.client_id, session.user)

    async def __call__(self, session: Session, message: Frame) -> None:
        if isinstance(message, bytes):
            raise Disconnect(UNSUPPORTED, "binary frames are not accepted here")
        if not self.allowed:
            raise Disconnect(POLICY, "clients may not publish in this channel")
        await self.hub.publish_json(self.channel, orjson.dumps(message), info=self.info)


class RawEndpoint:
    """``/ws/{channel}``: each publication is one text frame; text sent is published.

    ``?since=OFFSET`` first replays what the channel's history keeps after that offset.
    With tokens configured, ``?token=JWT`` authenticates the connection and ``?sub_token=JWT``
    grants a channel whose namespace requires one."""

    def __init__(self, tidings: Tidings) -> None:
        self.tidings = tidings
        settings = tidings.settings
        #: this hub's compressing format (for connections that negotiated permessage-deflate)
        self.deflating = RawDeflate(
            Compressor(settings.compression_level, settings.compression_min_size)
        )
        tidings.hub.on_control_message(self._on_control)

    def _on_control(self, message: ControlMessage) -> None:
        """A server-side ``unsubscribe`` ends a raw connection: it has no other channel."""
        if not isinstance(message, UnsubscribeUser):
            return
        for session in self.tidings.hub.local_sessions(message.user, message.client):
            if isinstance(session.format, RawText) and message.channel in session.channels:
                session.close(UNSUBSCRIBED())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # set up in a helper: this frame stays suspended for the connection's life, keep it small
        opened = await self._open(scope, receive, send)
        del scope, receive, send  # an idle connection keeps nothing of its request
        if opened is not None:
            try:
                await opened[0].serve(opened[1])
            finally:
                log_closed(f"/ws/{opened[1].channel}", opened[0])

    async def _open(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[Session, _ClientPublish] | None:
        tidings = self.tidings
        hub, settings = tidings.hub, tidings.settings
        if not scope_origin_allowed(settings, scope):
            await refuse_origin(scope["path"], receive, send)
            return None
        transport = open_transport(
            scope, receive, send, settings.max_message_size, settings.close_timeout
        )
        wire = raw_format(takes_frames(transport))
        if not admitted(tidings, scope):
            await transport.close(POLICY, "connection rate")  # before accept: HTTP 403
            return None
        session = Session(hub, transport, wire)
        # Subscribe *before* accepting: once the client sees the connection open, every
        # publication reaches it (the raw protocol has no subscribe confirmation to wait for).
        # What arrives meanwhile waits in the outbox: the transport is not writable yet.
        path = scope["path"]
        try:
            hub.connect(session)
        except Disconnect as reason:
            log_refused(path, reason.code, reason.reason)
            await transport.accept()
            await transport.close(reason.code, reason.reason)
            return None
        try:
            name = scope["path_params"]["channel"]
            channel = hub.channel(name)
            if negotiated_deflate(transport) and deflate.compressed(settings, channel.options):
                wire = session.format = self.deflating
            query = parse_qs(scope.get("query_string", b"").decode())
            who = await self._credentials(query)
            check_user_limit(hub, settings, who.user)
            if who.user:
                hub.set_user(session, who.user)
            sub_token = query.get("sub_token", [""])[0]
            if sub_token:
                await tidings.tokens.asubscription(sub_token, channel.name, who.user)
            can_subscribe(settings, channel, who, token=bool(sub_token))
            since = _replay_from(query)
            if since is None:
                await hub.subscribe(session, channel.name, wire)
            else:
                await self._replay(session, channel.name, *since)
        except Disconnect as reason:  # user_connection_limit, or ?since= names a position
            # the stream cannot continue
            await hub.forget(session)
            await transport.accept()
            log_refused(path, reason.code, reason.reason)
            await transport.close(reason.code, reason.reason)
            return None
        except TidingsError as exc:
            await hub.forget(session)
            await transport.accept()
            # A broker outage is worth retrying (1013); anything else is the client's doing.
            code = UNAVAILABLE.code if isinstance(exc, Unavailable) else POLICY
            why = close_reason(f"{exc.code}: {exc.message}")
            log_refused(path, code, why)
            await transport.close(code, why)
            return None
        except BaseException:
            await hub.forget(session)
            raise
        await transport.accept()
        log_connected(f"/ws/{channel.name}", session)
        session.open()  # writes anything published while the handshake was pending
        allowed = settings.allows_client_publish(channel.options)
        return session, _ClientPublish(hub, channel.name, allowed, session)

    async def _replay(self, session: Session, channel: str, offset: int, epoch: str) -> None:
        """Subscribe, then send what history holds after ``offset`` before anything live.

        Live publications arriving meanwhile are held by the hub and sent after the history,
        skipping offsets already sent. A position the stream cannot continue from (another
        epoch, an offset past its top, or publications after it that history no longer
        keeps) raises :data:`~.errors.INSUFFICIENT_STATE` (closed 3010: reload), never a
        replay with a hole. ``offset`` 0 asks for everything kept."""
        hub, wire = self.tidings.hub, session.format
        assert isinstance(wire, RawText)
        if hub.streamless(channel):
            # no stream to read (a read would create one: broker keys for a channel that keeps
            # none) and no offsets: only "everything kept", which is nothing, can be honoured
            if offset:
                raise INSUFFICIENT_STATE()
            await hub.subscribe(session, channel, wire)
            return
        await hub.subscribe(session, channel, wire, buffer=True)
        try:
            history = await hub.history(channel)
        except BaseException:
            hub.activate(session, channel, wire)
            raise
        replay = [p for p in history.publications if p.offset > offset]
        if offset and not continues(history.position, replay, offset, epoch):
            hub.activate(session, channel, wire)
            raise INSUFFICIENT_STATE()
        last = max(offset, replay[-1].offset if replay else 0)
        # A networked broker may still deliver a publication the history read already returned.
        held = hub.activate(session, channel, wire, after=last)
        for publication in [*replay, *(p for p in held if p.offset > last)]:
            session.enqueue(wire.push(publication))

    async def _credentials(self, query: dict[str, list[str]]) -> Credentials:
        token = query.get("token", [""])[0]
        return await self.tidings.tokens.aconnection(token) if token else ANONYMOUS
