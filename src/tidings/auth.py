"""Who may do what: the HTTP API key, client JWTs (PyJWT) and channel subscribe rules.

Tokens are never logged: errors name the problem, not the token.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

import jwt
import orjson

from .channels import Channel
from .config import Settings
from .errors import PermissionDenied, TokenExpired, Unauthorized

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A verified connection: the user id ('' for anonymous) and what the token carried."""

    user: str = ""
    expires: float | None = None
    info: bytes | None = None
    channels: tuple[str, ...] = ()
    claims: dict[str, Any] = field(default_factory=dict)

    @property
    def anonymous(self) -> bool:
        return self.user == ""


ANONYMOUS = Credentials()


def check_api_key(settings: Settings, headers: dict[str, str]) -> bool:
    """True when the request carries the API key (constant-time compare).

    Without a key the API is open in dev mode only: a server with a token secret but no API key
    refuses API calls, as Centrifugo does, rather than letting anyone publish."""
    if settings.api_key is None:
        return settings.dev_mode
    expected = settings.api_key.get_secret_value().encode()
    given = headers.get("x-api-key", "")
    if not given:
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "apikey":
            given = value.strip()
    return bool(given) and hmac.compare_digest(given.encode(), expected)


class TokenVerifier:
    """Verifies client JWTs with the configured keys."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.token_hmac_secret
        self._key = secret.get_secret_value() if secret is not None else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _decode(self, token: str) -> dict[str, Any]:
        if self._key is None:
            raise Unauthorized("tokens are not configured on this server")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=HMAC_ALGORITHMS,
                options={"require": ["sub"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        return claims

    def connection(self, token: str) -> Credentials:
        claims = self._decode(token)
        info = claims.get("info")
        return Credentials(
            user=str(claims["sub"]),
            expires=claims.get("exp"),
            info=orjson.dumps(info) if info is not None else None,
            channels=tuple(claims.get("channels") or ()),
            claims=claims,
        )

    def subscription(self, token: str, channel: str, user: str) -> dict[str, Any]:
        claims = self._decode(token)
        if claims.get("channel") != channel:
            raise PermissionDenied("subscription token is for another channel")
        if str(claims.get("sub", "")) != user:
            raise PermissionDenied("subscription token is for another user")
        return claims


def can_subscribe(settings: Settings, channel: Channel, who: Credentials, *, token: bool) -> None:
    """Raise PermissionDenied unless ``who`` may subscribe; ``token``: a valid sub token given."""
    if token:
        return
    rule = settings.subscribe_rule(channel.options)
    if rule == "anonymous":
        return
    if rule == "authenticated" and not who.anonymous:
        return
    raise PermissionDenied(f"subscribing to {channel.name!r} needs {_needs(rule)}")


def _needs(rule: str) -> str:
    return "a subscription token" if rule == "token" else "an authenticated connection"
