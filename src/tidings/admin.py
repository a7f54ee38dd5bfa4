"""The admin page (``/admin``): log in with the admin password, then drive the server API.

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
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from .config import Settings

if TYPE_CHECKING:
    from .app import Tidings

#: the ``aud`` of admin tokens: no other token tidings verifies has it
AUDIENCE = "tidings-admin"
#: seconds over which failed logins are counted
WINDOW = 60.0
#: client addresses whose failures are remembered at once (the oldest are forgotten first)
MAX_ADDRESSES = 10_000
#: largest login request body, bytes
MAX_LOGIN_BODY = 4096

#: the page's files under tidings/static/, by the name they are served as under /admin/
ASSETS = {"admin.js": "text/javascript", "admin.css": "text/css"}
#: headers of every admin page response
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
    """Admin logins and the tokens they give; no web framework (the HTTP API checks tokens
    with :meth:`allows` on both of `tidings serve`'s paths).

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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _static(name: str) -> bytes:
    return resources.files("tidings").joinpath("static", name).read_bytes()


def build_admin_router(tidings: Tidings) -> APIRouter:
    """``GET /admin`` (the page), its script and style, and ``POST /admin/login``.

    Login: ``{"password": str}`` -> 200 ``{"token": str, "expires_in": seconds}``; 401 wrong
    password; 429 (with ``Retry-After``) too many failures from the address; 400 a body that is
    not that JSON; 403 (page and login) for a client off loopback in dev mode. Errors have
    Centrifugo's shape, ``{"error": {"code", "message"}}``."""
    auth = tidings.admin
    assert auth is not None
    local_only = tidings.settings.dev_mode
    router = APIRouter(include_in_schema=False)

    def refused(request: Request) -> Response | None:
        """403 for a client off loopback in dev mode (the API behind the page is open)."""
        if local_only and not _loopback(request.client.host if request.client else ""):
            return error(403, "in dev mode the admin page answers only loopback clients")
        return None

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        code = {401: 101, 403: 103, 429: 111}.get(status, 107)
        body = orjson.dumps({"error": {"code": code, "message": message}})
        return Response(body, status, headers=headers, media_type="application/json")

    @router.get("/admin")
    async def page(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        return Response(_static("admin.html"), headers=PAGE_HEADERS, media_type="text/html")

    @router.get("/admin/{asset}")
    async def asset(asset: str) -> Response:
        kind = ASSETS.get(asset)
        if kind is None:
            return error(404, "not found")
        return Response(_static(asset), headers=PAGE_HEADERS, media_type=kind)

    @router.post("/admin/login")
    async def login(request: Request) -> Response:
        if (no := refused(request)) is not None:
            return no
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return error(413, "request body too large")
        try:
            payload: Any = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        password = payload.get("password") if isinstance(payload, dict) else None
        if not isinstance(password, str):
            return error(400, 'the body must be {"password": "..."}')
        address = request.client.host if request.client else ""
        try:
            token = auth.login(password, address)
        except AdminError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return error(exc.status, exc.message, headers)
        answer = {"token": token, "expires_in": int(auth.ttl)}
        return Response(
            orjson.dumps(answer),
            headers={"Cache-Control": "no-store"},
            media_type="application/json",
        )

    return router
