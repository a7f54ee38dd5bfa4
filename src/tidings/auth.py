"""Who may do what: the HTTP API key, client JWTs (PyJWT) and channel subscribe rules.

Tokens are never logged: errors name the problem, not the token.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson

from .brokers.base import compact
from .channels import USER_SEPARATOR, Channel
from .config import Settings
from .errors import PermissionDenied, TokenExpired, Unauthorized

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    *("ES256", "ES384", "ES512", "EdDSA"),
)


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


def check_api_key(settings: Settings, headers: Mapping[str, str]) -> bool:
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


# -- origins -------------------------------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the ``Host`` the request went to;
    ports left out count as the scheme's default."""
    try:
        parts = urlsplit(origin)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        given = urlsplit(f"//{host}")
        host_port = given.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is not a number, brackets unbalanced: not the same origin
        return False
    return bool(parts.hostname) and (parts.hostname, port) == (given.hostname, host_port)


def origin_allowed(
    settings: Settings, origin: str | None, host: str | None, *, dev_open: bool = True
) -> bool:
    """Whether a browser at ``origin`` (the ``Origin`` header) may reach this server at
    ``host`` (the ``Host`` header): the protection against cross-site WebSocket hijacking.

    * no ``Origin`` (a non-browser client: SDKs, curl, services): allowed;
    * ``allowed_origins`` set: ``origin`` must match one of its glob patterns, compared
      lowercased, as Centrifugo's ``allowed_origins`` (``*`` any run of characters, so
      ``https://*.example.com`` and ``*`` for any origin);
    * else in dev mode (when ``dev_open``): allowed;
    * else only the same origin: the origin's host and port are the ``Host`` header's (the
      default port of the origin's scheme when left out). Behind a proxy that rewrites
      ``Host``, set ``allowed_origins``.

    Every WebSocket and streaming endpoint calls it before accepting (:func:`scope_origin_allowed`);
    a refusal is HTTP 403."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if settings.allowed_origins:
        return any(fnmatchcase(origin, p.strip().lower()) for p in settings.allowed_origins)
    if dev_open and settings.dev_mode:
        return True
    return host is not None and _same_origin(origin, host.strip().lower())


def scope_origin_allowed(settings: Settings, scope: Mapping[str, Any]) -> bool:
    """:func:`origin_allowed` for an ASGI ``websocket`` or ``http`` scope (its headers)."""
    origin = host = None
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"host":
            host = value.decode("latin-1")
    return origin_allowed(settings, origin, host)


#: content types a browser sends cross-site without a CORS preflight (the Fetch standard's
#: CORS-safelisted request header values)
_SIMPLE_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "")


def cross_site_refused(settings: Settings, headers: Mapping[str, str]) -> bool:
    """Whether an HTTP publishing request is a cross-site browser request that no CORS
    preflight approved, which must be refused (403), dev mode included: a page on another
    site could otherwise publish through a visitor's browser (a ``text/plain`` form post).

    Preflighted requests pass: one carrying ``X-API-Key`` or ``Authorization``, or a content
    type other than the three a form can send (``application/json``), is only sent by a
    browser after the server allowed it by CORS. Of the others, a request whose ``Origin`` is
    not allowed (:func:`origin_allowed`, same-origin unless ``allowed_origins`` say more; not
    opened by dev mode) or, without ``Origin``, whose ``Sec-Fetch-Site`` is ``cross-site`` or
    ``same-site``, is refused. Requests from non-browser clients carry neither header."""
    if headers.get("x-api-key") or headers.get("authorization"):
        return False
    content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type not in _SIMPLE_TYPES:
        return False
    origin = headers.get("origin")
    if origin is not None:
        return not origin_allowed(settings, origin, headers.get("host"), dev_open=False)
    return headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site")


class TokenVerifier:
    """Verifies client JWTs with the configured keys: an HMAC secret (HS*), PEM public keys
    (RS*/PS*, ES*, EdDSA) or a JWKS URL; ``aud``/``iss`` are checked when configured.

    The ``a*`` methods are for the event loop: a JWKS fetch runs in a thread there."""

    def __init__(self, settings: Settings) -> None:
        secret = settings.token_hmac_secret
        self._hmac = secret.get_secret_value() if secret is not None else None
        shared = settings.token_public_key
        self._pem: dict[str, str | None] = {
            "RS": settings.token_rsa_public_key or shared,
            "PS": settings.token_rsa_public_key or shared,
            "ES": settings.token_ecdsa_public_key or shared,
            "Ed": shared,
        }
        url = settings.token_jwks_url
        self._jwks = jwt.PyJWKClient(url, cache_keys=True) if url else None
        self._audience = settings.token_audience
        self._issuer = settings.token_issuer
        self._leeway = settings.token_leeway

    @property
    def enabled(self) -> bool:
        return self._hmac is not None or self._jwks is not None or any(self._pem.values())

    def _static_key(self, token: str) -> tuple[Any, str]:
        """The configured key for the token's algorithm (None: ask the JWKS) and the algorithm."""
        try:
            alg = str(jwt.get_unverified_header(token).get("alg", ""))
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        if alg in HMAC_ALGORITHMS:
            if self._hmac is None:
                raise Unauthorized("HMAC tokens are not configured on this server")
            return self._hmac, alg
        if alg not in ASYMMETRIC_ALGORITHMS:
            raise Unauthorized(f"token algorithm {alg!r} is not accepted")
        pem = self._pem[alg[:2]]
        if pem is None and self._jwks is None:
            raise Unauthorized(f"no key configured for {alg} tokens")
        return pem, alg

    def _jwks_key(self, token: str) -> Any:
        assert self._jwks is not None
        try:
            return self._jwks.get_signing_key_from_jwt(token).key
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,  # clock skew, for exp and nbf (RFC 7519 4.1.4-5)
                options={"require": ["sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {type(exc).__name__}") from None
        return claims

    def claims(self, token: str) -> dict[str, Any]:
        """Verified claims; TokenExpired (109) or Unauthorized. May block on a JWKS fetch."""
        key, alg = self._static_key(token)
        return self._decode(token, key if key is not None else self._jwks_key(token), alg)

    async def aclaims(self, token: str) -> dict[str, Any]:
        """:meth:`claims` without blocking the event loop on a JWKS fetch."""
        key, alg = self._static_key(token)
        if key is None:
            key = await asyncio.to_thread(self._jwks_key, token)
        return self._decode(token, key, alg)

    def connection(self, token: str) -> Credentials:
        return connection_credentials(self.claims(token))

    async def aconnection(self, token: str) -> Credentials:
        return connection_credentials(await self.aclaims(token))

    def subscription(self, token: str, channel: str, user: str) -> dict[str, Any]:
        return subscription_claims(self.claims(token), channel, user)

    async def asubscription(self, token: str, channel: str, user: str) -> dict[str, Any]:
        return subscription_claims(await self.aclaims(token), channel, user)


def connection_credentials(claims: dict[str, Any]) -> Credentials:
    info = claims.get("info")
    channels = claims.get("channels") or ()
    if not isinstance(channels, list | tuple) or not all(isinstance(c, str) for c in channels):
        raise Unauthorized("invalid token: channels must be a list of strings")
    return Credentials(
        user=str(claims["sub"]),
        expires=claims.get("exp"),
        info=compact(orjson.dumps(info)) if info is not None else None,
        channels=tuple(channels),
        claims=claims,
    )


def subscription_claims(claims: dict[str, Any], channel: str, user: str) -> dict[str, Any]:
    if claims.get("channel") != channel:
        raise PermissionDenied("subscription token is for another channel")
    if str(claims.get("sub", "")) != user:
        raise PermissionDenied("subscription token is for another user")
    return claims


def check_user_limited(channel: str, user: str) -> None:
    """``chat:dm#alice,bob``: only the users after ``#`` may use the channel."""
    _, sep, users = channel.rpartition(USER_SEPARATOR)
    if sep and (not user or user not in users.split(",")):
        raise PermissionDenied(f"channel {channel!r} is limited to other users")


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
