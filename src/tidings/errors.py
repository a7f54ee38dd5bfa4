"""Errors a client or API caller can be told about, with Centrifugo's numeric codes.

The codes are the ones Centrifugo's protocol and server API use, so SDKs react to them as they
would to Centrifugo (e.g. 109 makes them refresh a token).
"""

from __future__ import annotations

from typing import NamedTuple


class TidingsError(Exception):
    """An error with a stable code and a message meant for the caller."""

    code = 100
    message = "internal server error"

    def __init__(self, message: str | None = None, *, code: int | None = None) -> None:
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class Unavailable(TidingsError):
    """A dependency (the broker) cannot be reached right now: retry later (code 100, which
    Centrifugo SDKs treat as temporary)."""

    code, message = 100, "temporarily unavailable"


class Unauthorized(TidingsError):
    code, message = 101, "unauthorized"


class UnknownChannel(TidingsError):
    code, message = 102, "unknown channel"


class PermissionDenied(TidingsError):
    code, message = 103, "permission denied"


class MethodNotFound(TidingsError):
    code, message = 104, "method not found"


class AlreadySubscribed(TidingsError):
    code, message = 105, "already subscribed"


class LimitExceeded(TidingsError):
    code, message = 106, "limit exceeded"


class BadRequest(TidingsError):
    code, message = 107, "bad request"


class NotAvailable(TidingsError):
    code, message = 108, "not available"


class TokenExpired(TidingsError):
    code, message = 109, "token expired"


class TooManyRequests(TidingsError):
    code, message = 111, "too many requests"


class UnrecoverablePosition(TidingsError):
    code, message = 112, "unrecoverable position"


class Disconnect(Exception):
    """Why the server closes a connection: a WebSocket close code and a short reason.

    Codes 3000-3499 tell Centrifugo SDKs to reconnect, 3500-3999 not to; 1000-1015 are the
    standard ones (1009 too big, 1013 try again later)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class CloseReason(NamedTuple):
    """A close code and reason, as data: call it for a fresh :class:`Disconnect` to raise.

    Never a shared exception instance: every ``raise`` extends the raised instance's
    ``__traceback__``, so one module-level instance raised for each refused connection would
    keep every such connection's frames (session, transport, message) alive for good. Compare
    a received :class:`Disconnect` with ``reason.code == SLOW.code``, never ``is``."""

    code: int
    reason: str

    def __call__(self) -> Disconnect:
        return Disconnect(self.code, self.reason)


SHUTDOWN = CloseReason(3001, "shutdown")
#: a raw client's close when the node stops: RFC 6455's registry, "Service Restart"
SERVICE_RESTART = CloseReason(1012, "service restart")
SLOW = CloseReason(3008, "slow")
#: the channel's stream cannot be continued for this client (a broker restart started a new
#: epoch, or a gap history no longer holds): reload the state. Centrifugo's 3010.
INSUFFICIENT_STATE = CloseReason(3010, "insufficient state")
NO_PONG = CloseReason(3012, "no pong")
TOO_BIG = CloseReason(1009, "message too big")
TOO_MANY = CloseReason(1013, "too many connections")
BAD_REQUEST = CloseReason(3501, "bad request")
INVALID_TOKEN = CloseReason(3500, "invalid token")
UNAVAILABLE = CloseReason(1013, "try again later")
