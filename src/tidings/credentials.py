"""A Centrifugo connection's credentials and their deadlines.

Who the connection is (its connection token, checked at ``connect`` and replaced by
``refresh``), what its subscription tokens grant (checked at ``subscribe``, extended by
``sub_refresh``), and until when: the connection must send ``connect`` within
``connect_timeout`` seconds (else 3502), and is closed ``expired_close_delay`` seconds after a
token expires unless it refreshes it (3005 for the connection token, 3006 for a subscription
token), as Centrifugo does. Every deadline of one connection is one entry in the hub's
:class:`~tidings.wheel.Wheel`, due at the earliest of them, so an idle connection costs no
timer of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from .admission import check_user_limit
from .auth import ANONYMOUS, Credentials, TokenVerifier
from .errors import INVALID_TOKEN, CloseReason, PermissionDenied, TokenExpired, Unauthorized
from .protocol import centrifuge as wire
from .session import Session

if TYPE_CHECKING:
    from .config import Settings
    from .hub import Hub
    from .subscriptions import Subscription

log = logging.getLogger("tidings.connection")

EXPIRED = CloseReason(3005, "connection expired")
SUB_EXPIRED = CloseReason(3006, "subscription expired")
STALE = CloseReason(3502, "stale")
TOKEN_REQUIRED = CloseReason(3501, "bad request: token required")


class ConnectionCredentials:
    """The credentials of one Centrifugo connection and the deadlines they set.

    ``subs`` is the connection's subscriptions by channel (shared with its
    :class:`~tidings.subscriptions.Subscriptions`): their ``closes_at`` are deadlines too.
    Made on accept: from then on the connection has ``connect_timeout`` seconds to connect."""

    __slots__ = (
        "_closes_at",
        "_due",
        "connected",
        "hub",
        "session",
        "settings",
        "subs",
        "tokens",
        "wheel_bucket",
        "who",
    )

    def __init__(
        self,
        hub: Hub,
        settings: Settings,
        tokens: TokenVerifier,
        session: Session,
        subs: dict[str, Subscription],
    ) -> None:
        self.hub = hub
        self.settings = settings
        self.tokens = tokens
        self.session = session
        self.subs = subs
        self.who: Credentials = ANONYMOUS
        self.connected = False
        self._closes_at: float | None = None  # loop time: closed 3005 then unless refreshed
        self._due = 0.0  # the deadline the wheel calls on_tick for
        self.wheel_bucket: set[Any] | None = None
        hub.wheel.schedule(self, settings.connect_timeout)  # else closed 3502

    async def verify(self, pending: Awaitable[Any]) -> Any:
        """Await a token check: expired -> error 109 (SDKs refresh), invalid -> close 3500."""
        try:
            return await pending
        except TokenExpired:
            raise
        except Unauthorized as exc:
            # the refusal's own line (3500 invalid token) follows; this says why, when debugging
            log.debug("invalid token from %s: %s", self.session.client_id, exc.message)
            raise INVALID_TOKEN() from None

    # -- the connection token --------------------------------------------------------------------

    async def connect(self, token: Any) -> int | None:
        """The ``connect`` command's credentials: ``token`` (a JWT, or empty: anonymous, where
        allowed; else closed 3501). Sets who the connection is, starts its heartbeats and
        returns the ttl it is told (seconds; None: the token never expires)."""
        if token:
            who = await self.verify(self.tokens.aconnection(str(token)))
        elif self.settings.anonymous_allowed:
            who = ANONYMOUS
        else:
            raise TOKEN_REQUIRED()
        check_user_limit(self.hub, self.settings, who.user)
        self.who = who
        self.connected = True
        if who.user:
            self.hub.set_user(self.session, who.user)
        self.session.info = who.info
        self.session.start_heartbeats(self.settings.ping_interval)
        return self.set_expiry(who.expires)

    async def refresh(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``refresh`` command: a new connection token for the same user (else 3500)."""
        token = request.get("token")
        if not token:
            raise TOKEN_REQUIRED()
        who = await self.verify(self.tokens.aconnection(str(token)))
        if who.user != self.who.user:
            raise INVALID_TOKEN()
        self.who = who
        ttl = self.set_expiry(who.expires)
        return wire.compact(
            {
                "client": self.session.client_id,
                "version": wire.VERSION,
                "expires": ttl is not None,
                "ttl": ttl,
            }
        )

    def server_refresh(self, expire_at: float | None, expired: bool) -> None:
        """A server-side refresh (control message): close now (3005), or expire at
        ``expire_at`` (Unix time, seconds; None: never) and tell the client (a refresh push)."""
        if expired:
            self.session.close(EXPIRED())
            return
        ttl = self.set_expiry(float(expire_at) if expire_at is not None else None)
        body = wire.compact({"expires": ttl is not None, "ttl": ttl})
        fmt = self.session.format  # the connection's flavour, JSON or protobuf
        assert isinstance(fmt, wire.CentrifugeJson)
        self.session.enqueue(fmt.push_frame("", "refresh", body))

    # -- subscription tokens ---------------------------------------------------------------------

    async def subscription_claims(self, token: str, channel: str) -> dict[str, Any]:
        """The claims of a subscription token for ``channel`` and this connection's user.

        Raises TokenExpired (109: SDKs fetch a new token) or PermissionDenied (103) for any
        other invalid token (bad signature, another channel or user): as in Centrifugo, a bad
        *subscription* token fails that subscribe and keeps the connection; only a bad
        *connection* token closes it (3500)."""
        try:
            claims: dict[str, Any] = await self.tokens.asubscription(token, channel, self.who.user)
        except TokenExpired:
            raise
        except Unauthorized as exc:
            log.debug("invalid subscription token from %s: %s", self.session.client_id, exc.message)
            raise PermissionDenied("invalid subscription token") from None
        return claims

    async def sub_refresh(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ``sub_refresh`` command: a new token for a channel the client is subscribed to."""
        name = wire.channel_name(request)
        sub = self.subs.get(name)
        if sub is None:
            raise PermissionDenied("not subscribed")
        token = request.get("token")
        if not token:
            raise TOKEN_REQUIRED()
        # a bad token for a channel already subscribed closes the connection (3500)
        claims: dict[str, Any] = await self.verify(
            self.tokens.asubscription(str(token), name, self.who.user)
        )
        ttl = self.sub_expiry(sub, claims.get("exp"))
        return wire.compact({"expires": ttl is not None, "ttl": ttl})

    # -- deadlines -------------------------------------------------------------------------------

    def _closing_time(self, expires: float | None) -> tuple[float | None, int | None]:
        """For a token expiring at ``expires`` (Unix time; None: never): the loop time to close
        the client at unless it refreshes, and the ttl it is told (it refreshes after that)."""
        if expires is None:
            return None, None
        ttl = max(1, int(expires - time.time()))
        return asyncio.get_running_loop().time() + ttl + self.settings.expired_close_delay, ttl

    def set_expiry(self, expires: float | None) -> int | None:
        """The connection token now expires at ``expires`` (Unix time; None: never)."""
        self._closes_at, ttl = self._closing_time(expires)
        self.rearm()
        return ttl

    def sub_expiry(self, sub: Subscription, expires: float | None) -> int | None:
        """``sub``'s token now expires at ``expires`` (Unix time; None: never)."""
        sub.closes_at, ttl = self._closing_time(expires)
        if sub.closes_at is not None or self.wheel_bucket is not None:
            self.rearm()
        return ttl

    def rearm(self) -> None:
        """Put the connection in the hub's wheel for its earliest deadline (out of it: none)."""
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
            session.close(STALE())
            return
        due = self._due  # what the wheel was scheduled for: every deadline up to it passed
        if self._closes_at is not None and self._closes_at <= due:
            session.close(EXPIRED())
            return
        for sub in self.subs.values():
            if sub.closes_at is not None and sub.closes_at <= due:
                session.close(SUB_EXPIRED())
                return
        self.rearm()  # what was due is gone (unsubscribed): on to the next deadline

    def close(self) -> None:
        """The connection ended: no deadline any more."""
        self.hub.wheel.cancel(self)
