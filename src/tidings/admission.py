"""Who may open a connection: a per-address connection rate and a per-user connection limit.

* ``connection_rate_per_ip`` (connections per second, sustained; 0: off) with
  ``connection_burst_per_ip`` (connections at once): a token bucket per client address,
  checked before the WebSocket handshake is answered. Over it, the handshake is refused:
  HTTP 403 (an ASGI app that closes a WebSocket before accepting it gets no other status), and
  one WARNING line. The address is the TCP peer's: behind a proxy, every client has the
  proxy's address unless the server is told to trust forwarded headers (README "Production").
  At most :data:`MAX_ADDRESSES` addresses are tracked; the least recently seen are forgotten
  first, so a flood of spoofed or many addresses costs bounded memory (a forgotten address
  starts again with a full bucket).
* ``user_connection_limit`` (connections per user on this node; 0: off), Centrifugo's option
  of that name: a ``connect`` (or a raw ``/ws/{channel}?token=``) for a user who already has
  that many connections is closed ``3504 connection limit`` (centrifuge's
  ``DisconnectConnectionLimit``; SDKs do not reconnect). Anonymous connections are not counted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .errors import Disconnect

if TYPE_CHECKING:
    from .config import Settings
    from .hub import Hub

log = logging.getLogger("tidings")

#: addresses whose buckets are kept (least recently seen dropped first)
MAX_ADDRESSES = 65_536

#: centrifuge's DisconnectConnectionLimit
CONNECTION_LIMIT = 3504


def connection_limit() -> Disconnect:
    """A new 3504 disconnect each time (an exception instance is never shared: its traceback
    would pin every connection it was raised in)."""
    return Disconnect(CONNECTION_LIMIT, "connection limit")


def check_user_limit(hub: Hub, settings: Settings, user: str) -> None:
    """Raise :func:`connection_limit` if ``user`` already has ``user_connection_limit``
    connections on this node (0: no limit; an empty user: anonymous, not counted)."""
    limit = settings.user_connection_limit
    if limit and user and len(hub.users.get(user, ())) >= limit:
        raise connection_limit()


def admitted(tidings: Any, scope: Any) -> bool:
    """Whether ``tidings``' ``connection_rate_per_ip`` lets ``scope``'s client connect now."""
    rate: ConnectionRate | None = tidings.admission
    return rate is None or rate.allow(scope)


class ConnectionRate:
    """Token buckets per client address (see the module docstring); ``allow(scope)``."""

    def __init__(self, rate: float, burst: int, clock: Any = time.monotonic) -> None:
        self.rate = rate  # tokens per second
        self.burst = float(burst)
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self.refused = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionRate | None:
        if not settings.connection_rate_per_ip:
            return None
        return cls(settings.connection_rate_per_ip, settings.connection_burst_per_ip)

    def allow(self, scope: Any) -> bool:
        """Take one token from the bucket of ``scope``'s client address; False if empty."""
        client = scope.get("client")
        if not client:
            return True  # a unix socket or a test client: no address to count
        address = str(client[0])
        now = self.clock()
        buckets = self.buckets
        found = buckets.pop(address, None)
        if found is None:
            tokens = self.burst
            if len(buckets) >= MAX_ADDRESSES:
                buckets.popitem(last=False)
        else:
            tokens = min(self.burst, found[0] + (now - found[1]) * self.rate)
        if tokens < 1.0:
            buckets[address] = (tokens, now)
            self.refused += 1
            log.warning("refusing a connection: connection_rate_per_ip exceeded by %s", address)
            return False
        buckets[address] = (tokens - 1.0, now)
        return True


__all__ = [
    "CONNECTION_LIMIT",
    "ConnectionRate",
    "admitted",
    "check_user_limit",
    "connection_limit",
]
