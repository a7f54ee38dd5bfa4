"""The admin page's logins and tokens (``/admin``; its routes are in :mod:`tidings.admin_routes`).

As in Centrifugo's admin web UI, the page itself holds no power: it trades the password for a
short-lived admin token (``POST /admin/login``) and calls tidings' own server API
(``POST /api/<method>``) with ``Authorization: Bearer <token>``, which the API accepts like the
API key. So everything the page can do, ``cent`` can do too, and nothing more.

Security, in order of the checks:

- off unless ``admin_password`` is set; refused at start in dev mode (no API key, no token
  secret) unless the server binds a loopback address (``Settings.loopback_only``), even with
  ``--insecure``: a password does not make an open API less open;
- in dev mode the page and the login answer only clients on a loopback address (403 for any
  other), whatever address the server was told it binds: a mounted app's real bind address is
  not tidings' to know;
- failed logins are limited per client address (``admin_login_attempts`` per minute; after that
  every attempt from the address, right or wrong, is answered 429 with ``Retry-After``);
  passwords are compared in constant time (``hmac.compare_digest``);
- tokens are HS256 JWTs (PyJWT) with ``aud: "tidings-admin"``, valid ``admin_token_ttl``
  seconds, signed with a key derived from ``admin_secret`` (a random key per process when unset,
  so tokens die with the process and do not work on other nodes);
- the page is served with a Content-Security-Policy allowing only its own files, no framing, no
  caching, and writes everything it shows as text (never as HTML).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping

import jwt

from .config import Settings

#: the ``aud`` of admin tokens: no other token tidings verifies has it
AUDIENCE = "tidings-admin"
#: seconds over which failed logins are counted
WINDOW = 60.0
#: client addresses whose failures are remembered at once (the oldest are forgotten first)
MAX_ADDRESSES = 10_000


class AdminError(Exception):
    """A refused login: ``status`` is the HTTP status (401, 429), ``retry_after`` seconds
    until the address may try again (429 only)."""

    def __init__(self, status: int, message: str, retry_after: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class LoginLimiter:
    """Failed logins per client address in the last :data:`WINDOW` seconds.

    ``attempts``: failures allowed in a window; once reached, the address is refused until its
    oldest counted failure is older than the window. Memory is bounded by :data:`MAX_ADDRESSES`.
    """

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(address, ()) if now - t < WINDOW]
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def retry_after(self, address: str, now: float) -> int:
        """Whole seconds until ``address`` may try again (0: now)."""
        times = self._recent(address, now)
        if len(times) < self.attempts:
            return 0
        return max(1, int(WINDOW - (now - times[0])) + 1)

    def failed(self, address: str, now: float) -> None:
        times = self._recent(address, now)
        times.append(now)
        self._failures[address] = times
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_ADDRESSES:
            self._failures.popitem(last=False)


class AdminAuth:
    """Admin logins and the tokens they give. No web framework: the HTTP API
    (:class:`tidings.api.HttpApi`) checks tokens with :meth:`allows` on both of `tidings
    serve`'s paths.

    Raises ValueError if ``settings.admin_password`` is unset or empty, or if the admin page
    would be served in dev mode on an address other than loopback."""

    def __init__(self, settings: Settings) -> None:
        if settings.admin_password is None or not settings.admin_password.get_secret_value():
            raise ValueError("admin_password must be set (and not empty) to serve /admin")
        if settings.dev_mode and not settings.loopback_only:
            raise ValueError(
                f"refusing to serve the admin page on {settings.host} in dev mode: anyone could "
                "use the open API behind it. Set TIDINGS_API_KEY (or a token secret), or bind "
                "127.0.0.1."
            )
        self.ttl = settings.admin_token_ttl
        self._password = settings.admin_password.get_secret_value().encode()
        secret = (
            settings.admin_secret.get_secret_value().encode()
            if settings.admin_secret is not None
            else secrets.token_bytes(32)
        )
        # a fixed-length key whatever the secret's length (PyJWT warns on short HMAC keys),
        # and not the secret itself, so it signs nothing else
        self._key = hashlib.sha256(b"tidings admin token key\0" + secret).digest()
        self.limiter = LoginLimiter(settings.admin_login_attempts)

    def login(self, password: str, address: str, now: float | None = None) -> str:
        """A fresh admin token for the right ``password``; AdminError 401 for a wrong one, 429
        while ``address`` has used up its failed attempts."""
        now = time.monotonic() if now is None else now
        wait = self.limiter.retry_after(address, now)
        if wait:
            raise AdminError(429, "too many failed logins: try again later", wait)
        if not hmac.compare_digest(password.encode(), self._password):
            self.limiter.failed(address, now)
            raise AdminError(401, "wrong password")
        return self.issue()

    def issue(self) -> str:
        """A token valid for ``admin_token_ttl`` seconds from now."""
        issued = int(time.time())
        claims = {"sub": "admin", "aud": AUDIENCE, "iat": issued, "exp": issued + int(self.ttl)}
        return jwt.encode(claims, self._key, algorithm="HS256")

    def verify(self, token: str) -> bool:
        """Whether ``token`` is an unexpired admin token signed with this node's key."""
        try:
            jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=AUDIENCE,
                options={"require": ["exp", "aud", "sub"]},
            )
        except jwt.PyJWTError:
            return False
        return True

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether request ``headers`` (lower-case names) carry ``Authorization: Bearer`` with
        a valid admin token."""
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(value.strip()) and self.verify(value.strip())
