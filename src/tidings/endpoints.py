"""WebSocket endpoints as plain ASGI apps (no per-message framework overhead)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Scope, Send

from .auth import ANONYMOUS, Credentials, can_subscribe
from .brokers.base import ClientInfo
from .errors import Disconnect, TidingsError
from .protocol.raw import raw_format
from .session import Frame, Session
from .transport import open_transport

if TYPE_CHECKING:
    from .app import Tidings
    from .hub import Hub

log = logging.getLogger("tidings.endpoints")

POLICY = 1008
UNSUPPORTED = 1003


def close_reason(message: str) -> str:
    """A close reason must fit in 123 bytes."""
    raw = message.encode()[:123]
    return raw.decode(errors="ignore")


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

    With tokens configured, ``?token=JWT`` authenticates the connection and ``?sub_token=JWT``
    grants a channel whose namespace requires one."""

    def __init__(self, tidings: Tidings) -> None:
        self.tidings = tidings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # set up in a helper: this frame stays suspended for the connection's life, keep it small
        opened = await self._open(scope, receive, send)
        del scope, receive, send  # an idle connection keeps nothing of its request (~1.8 KiB)
        if opened is not None:
            await opened[0].serve(opened[1])

    async def _open(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[Session, _ClientPublish] | None:
        tidings = self.tidings
        hub, settings = tidings.hub, tidings.settings
        transport = open_transport(scope, receive, send, settings.max_message_size)
        await transport.accept()
        wire = raw_format(transport.framed)
        session = Session(hub, transport, wire)
        try:
            hub.connect(session)
        except Disconnect as reason:
            log.warning("refusing a connection: %s", reason)
            await transport.close(reason.code, reason.reason)
            return None
        try:
            name = scope["path_params"]["channel"]
            channel = hub.channel(name)
            query = parse_qs(scope.get("query_string", b"").decode())
            who = self._credentials(query)
            if who.user:
                hub.set_user(session, who.user)
            sub_token = query.get("sub_token", [""])[0]
            if sub_token:
                tidings.tokens.subscription(sub_token, channel.name, who.user)
            can_subscribe(settings, channel, who, token=bool(sub_token))
            await hub.subscribe(session, channel.name, wire)
        except TidingsError as exc:
            await hub.disconnect(session)
            await transport.close(POLICY, close_reason(f"{exc.code}: {exc.message}"))
            return None
        except BaseException:
            await hub.disconnect(session)
            raise
        allowed = settings.allows_client_publish(channel.options)
        return session, _ClientPublish(hub, channel.name, allowed, session)

    def _credentials(self, query: dict[str, list[str]]) -> Credentials:
        token = query.get("token", [""])[0]
        return self.tidings.tokens.connection(token) if token else ANONYMOUS
