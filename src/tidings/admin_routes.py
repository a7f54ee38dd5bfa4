"""The admin page's routes: ``GET /admin``, its script and style, ``POST /admin/login``.

Included in ``Tidings.router`` only when ``admin_password`` is set; what they check and why is
in :mod:`tidings.admin`.
"""

from __future__ import annotations

import ipaddress
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from .admin import AdminError
from .api import body_timed_out
from .router import BodyTimeout, ClientGone, guarded_route, read_limited
from .router import refused as guard_refusal

if TYPE_CHECKING:
    from .app import Tidings

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


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _static(name: str) -> bytes:
    return resources.files("tidings").joinpath("static", name).read_bytes()


def admin_router(tidings: Tidings) -> APIRouter:
    """``GET /admin`` (the page), its script and style, and ``POST /admin/login``.

    Login: ``{"password": str}`` -> 200 ``{"token": str, "expires_in": seconds}``; 401 wrong
    password; 429 (with ``Retry-After``) too many failures from the address; 400 a body that is
    not that JSON; 403 (page and login) for a client off loopback in dev mode; 413 a body over
    4,096 bytes. Like the API routes, 431 past the header limits and 408 for a body not
    complete within ``body_timeout`` seconds (:mod:`tidings.router`). Errors have Centrifugo's
    shape, ``{"error": {"code", "message"}}``."""
    auth = tidings.admin
    assert auth is not None
    local_only = tidings.settings.dev_mode
    body_timeout = tidings.settings.body_timeout
    # the header limits and body timeout of the API routes (router.GuardedRoute), mounted too
    router = APIRouter(include_in_schema=False, route_class=guarded_route(tidings.settings))

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
        try:
            body = await read_limited(request, MAX_LOGIN_BODY, body_timeout)
        except ClientGone:  # logged; nobody is there to read an answer
            return Response(status_code=400)
        except BodyTimeout:  # logged
            return guard_refusal(body_timed_out(body_timeout))
        if body is None:
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
