"""The HTTP API's answers: Centrifugo's server API at ``POST /api/<method>`` and the seed-style
publish endpoints, framework-free. The API methods themselves live in :mod:`tidings.server_api`.

Errors follow Centrifugo's server API: a request that was understood but cannot be done answers
HTTP 200 with ``{"error": {"code": N, "message": "..."}}``; a missing or wrong API key is HTTP
401; a body that is not the documented JSON is HTTP 400 (413 if too large), an unknown method
HTTP 404, each with the same error shape.

The publishing endpoints are answered by :class:`HttpApi`, which knows no web framework: it takes
the headers and a way to read the body and returns the status and JSON body. The FastAPI routes
(:mod:`tidings.router`) call it, and so does `tidings serve`'s own HTTP protocol
(:mod:`tidings.serve.http`), which answers them without an ASGI request cycle: both paths send
the same bytes because they run the same code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .auth import check_api_key, cross_site_refused
from .errors import BadRequest, MethodNotFound, PermissionDenied, TidingsError, Unauthorized
from .protocol.depth import MAX_DEPTH, too_deep
from .server_api import Malformed, ServerApi

if TYPE_CHECKING:
    from .config import Settings
    from .hub import Hub

#: an answer: HTTP status and JSON body
Reply = tuple[int, bytes]
#: request headers with lower-case names
Headers = Mapping[str, str]
#: ``await read(limit)``: the request body, or None if it is larger than ``limit`` bytes
ReadBody = Callable[[int], Awaitable[bytes | None]]

#: HTTP statuses of API errors in Centrifugo's transport error mode (the rest are 500)
TRANSPORT_STATUS = {102: 404, 104: 404, 107: 400, 108: 400, 112: 416, 113: 409}


def json_reply(body: Any, status: int = 200) -> Reply:
    return status, orjson.dumps(body)


def error_reply(exc: TidingsError, status: int = 200) -> Reply:
    return json_reply({"error": exc.as_dict()}, status)


def too_big(limit: int) -> BadRequest:
    return BadRequest(f"request body larger than {limit} bytes")


# -- the guards' answers: one body on both paths ------------------------------------------------
# `tidings serve`'s HTTP protocol (serve/guard.py) and the mounted routes (router.py) refuse
# slow and oversized requests with these statuses and bodies, so a client or a proxy's log sees
# the same answer whichever way tidings is served. Error code 107 (bad request), Centrifugo's
# shape; the connection is closed after each (the rest of the request is not read).


def too_many_headers(limit: int) -> Reply:
    """431 (RFC 6585 section 5): more than ``limit`` header fields."""
    return error_reply(BadRequest(f"more than {limit} header fields"), 431)


def headers_too_large(limit: int) -> Reply:
    """431 (RFC 6585 section 5): more than ``limit`` bytes of request headers."""
    return error_reply(BadRequest(f"request headers larger than {limit} bytes"), 431)


def target_too_long(limit: int) -> Reply:
    """414 (RFC 9110 section 15.5.15): a request target (path and query) over ``limit`` bytes."""
    return error_reply(BadRequest(f"request target longer than {limit} bytes"), 414)


def head_timed_out(seconds: float) -> Reply:
    """408 (RFC 9110 section 15.5.9): the request's head was not complete within ``seconds``."""
    return error_reply(BadRequest(f"request head not received within {seconds:g} s"), 408)


def body_timed_out(seconds: float) -> Reply:
    """408 (RFC 9110 section 15.5.9): the request's body was not complete within ``seconds``."""
    return error_reply(BadRequest(f"request body not received within {seconds:g} s"), 408)


def parse_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """``raw`` as a JSON object; BadRequest saying what is wrong with ``what`` (also when it
    nests deeper than :data:`~tidings.protocol.depth.MAX_DEPTH`)."""
    if too_deep(raw):
        raise BadRequest(f"{what} is nested more than {MAX_DEPTH} levels deep")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _string(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    return value


class HttpApi:
    """The answers of the publishing endpoints, whichever server read the request.

    ``api``: the server API's methods (its ``hub`` and ``settings`` are used here too)."""

    __slots__ = (
        "api",
        "api_limit",
        "bearer",
        "cross_site",
        "denied",
        "hub",
        "open",
        "settings",
        "text_limit",
    )

    def __init__(self, api: ServerApi) -> None:
        self.settings: Settings = api.settings
        self.hub: Hub = api.hub
        self.api = api
        settings = self.settings
        #: ``/publish/{channel}`` and ``/push`` carry one message (plus a little JSON around it)
        self.text_limit = settings.max_message_size + 1024
        self.api_limit = settings.api_max_body_size
        #: without an API key, whether the API is open (dev mode) is fixed for the process
        self.open = settings.dev_mode if settings.api_key is None else None
        self.denied = error_reply(
            Unauthorized(
                "unauthorized"
                if settings.api_key is not None or settings.dev_mode
                else "unauthorized: the HTTP API needs TIDINGS_API_KEY to be set on the server"
            ),
            401,
        )
        self.cross_site = error_reply(
            PermissionDenied(
                "cross-site request: send JSON or the API key header, or set allowed_origins"
            ),
            403,
        )
        #: ``bearer(headers)``: whether they carry an admin token (``Authorization: Bearer``,
        #: from /admin/login), which opens the API too; set when the admin page is on
        self.bearer: Callable[[Headers], bool] | None = None

    def authorized(self, headers: Headers) -> bool:
        """The API key (``X-API-Key`` or ``Authorization: apikey``), an admin token
        (``Authorization: Bearer``), or dev mode, which needs neither."""
        if self.open:
            return True
        if self.open is None and check_api_key(self.settings, headers):
            return True
        return self.bearer is not None and self.bearer(headers)

    async def _body(
        self, headers: Headers, read: ReadBody, limit: int, status: int
    ) -> bytes | Reply:
        """The request body, or the answer instead: 401 without the API key, ``status`` past
        ``limit`` bytes; 403 for a cross-site browser request no CORS preflight approved
        (:func:`~.auth.cross_site_refused`)."""
        if cross_site_refused(self.settings, headers):
            return self.cross_site
        if not self.authorized(headers):
            return self.denied
        body = await read(limit)
        if body is None:
            return error_reply(too_big(limit), status)
        return body

    async def flushed(self) -> None:
        """Wait until what this loop iteration published has been handed to the subscribers'
        sockets. The ASGI routes answer after it: a publisher that is answered at once runs
        ahead of the fan-out, and under load every outbox fills up (bench/RESULTS.md)."""
        after = self.hub.flusher.after()
        if after is not None:
            await after

    async def _publish(self, channel: str, data: bytes) -> Reply:
        try:
            position = await self.hub.publish_json(channel, data)
        except TidingsError as exc:
            return error_reply(exc)
        return json_reply({"result": {"offset": position.offset, "epoch": position.epoch}})

    async def server_api(self, method: str, headers: Headers, read: ReadBody) -> Reply:
        """Centrifugo's server API: ``publish``, ``broadcast``, ``history``, ``batch``, ..."""
        body = await self._body(headers, read, self.api_limit, 413)
        if isinstance(body, tuple):
            return body
        try:
            params = parse_object(body) if body.strip() else {}
            answer = await self.api.call(method, params)
            error = answer.get("error")
            if (
                error is not None
                and method != "batch"
                and headers.get("x-centrifugo-error-mode", "") == "transport"
            ):  # Centrifugo's opt-in: API errors as HTTP statuses with {"code", "message"}
                return json_reply(error, TRANSPORT_STATUS.get(error["code"], 500))
            return json_reply(answer)
        except MethodNotFound as exc:
            return error_reply(exc, 404)
        except BadRequest as exc:  # not JSON, or Malformed params
            return error_reply(exc, 400)

    async def legacy_api(self, headers: Headers, read: ReadBody) -> Reply:
        """Centrifugo's older single endpoint (cent < 5, gocent < 3): newline-delimited
        ``{"id": n, "method": "publish", "params": {...}}``, one reply line each."""
        body = await self._body(headers, read, self.api_limit, 413)
        if isinstance(body, tuple):
            return body
        replies = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                command = parse_object(line, "a command")
            except BadRequest as exc:
                return error_reply(exc, 400)
            try:
                answer = await self.api.call(
                    str(command.get("method", "")).lower(), command.get("params")
                )
            except (MethodNotFound, Malformed) as exc:
                answer = {"error": exc.as_dict()}
            if command.get("id"):
                answer = {"id": command["id"], **answer}
            replies.append(orjson.dumps(answer))
        if not replies:
            return error_reply(BadRequest("no command in the body"), 400)
        return 200, b"\n".join(replies)

    async def push(self, headers: Headers, read: ReadBody) -> Reply:
        """The FastAPI + broadcaster example's shape: ``{"channel": str, "message": str}``."""
        body = await self._body(headers, read, self.text_limit, 400)
        if isinstance(body, tuple):
            return body
        try:
            payload = parse_object(body)
            channel = _string(payload, "channel")
            message = _string(payload, "message")
        except TidingsError as exc:
            return error_reply(exc, 400)
        return await self._publish(channel, orjson.dumps(message))

    async def publish_text(self, channel: str, headers: Headers, read: ReadBody) -> Reply:
        """The tutorial shape: the request body, as text, is the message."""
        body = await self._body(headers, read, self.text_limit, 400)
        if isinstance(body, tuple):
            return body
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return error_reply(BadRequest("body is not UTF-8 text"), 400)
        return await self._publish(channel, orjson.dumps(text))
