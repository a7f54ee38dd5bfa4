"""The HTTP glue: Centrifugo's server API at ``POST /api/<method>``, the seed-style publish
endpoints, health and metrics. The API methods themselves live in :mod:`tidings.server_api`.

Errors follow Centrifugo's server API: a request that was understood but cannot be done answers
HTTP 200 with ``{"error": {"code": N, "message": "..."}}``; a missing or wrong API key is HTTP
401; a body that is not the documented JSON is HTTP 400 (413 if too large), an unknown method
HTTP 404, each with the same error shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from .auth import check_api_key
from .errors import BadRequest, MethodNotFound, TidingsError, Unauthorized
from .server_api import Malformed

if TYPE_CHECKING:
    from .app import Tidings


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


#: HTTP statuses of API errors in Centrifugo's transport error mode (the rest are 500)
TRANSPORT_STATUS = {102: 404, 104: 404, 107: 400, 108: 400, 112: 416, 113: 409}


def error_response(exc: TidingsError, status: int = 200) -> Response:
    return json_response({"error": exc.as_dict()}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, never buffering more than ``limit`` bytes: BadRequest past it."""
    too_big = BadRequest(f"request body larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(raw: bytes, what: str = "body") -> dict[str, Any]:
    """``raw`` as a JSON object; BadRequest saying what is wrong with ``what``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


async def _json_object(request: Request, limit: int) -> dict[str, Any]:
    return parse_object(await read_body(request, limit))


def _string(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise BadRequest(f'"{key}" must be a string')
    return value


def build_router(tidings: Tidings) -> APIRouter:
    router = APIRouter()
    settings = tidings.settings
    hub = tidings.hub
    body_limit = settings.max_message_size + 1024

    def authorized(request: Request) -> bool:
        return check_api_key(settings, dict(request.headers))

    denied = Unauthorized(
        "unauthorized"
        if settings.api_key is not None or settings.dev_mode
        else "unauthorized: the HTTP API needs TIDINGS_API_KEY to be set on the server"
    )

    async def publish(channel: str, data: bytes) -> Response:
        try:
            position = await hub.publish_json(channel, data)
        except TidingsError as exc:
            return error_response(exc)
        return json_response({"result": {"offset": position.offset, "epoch": position.epoch}})

    def transport_errors(request: Request) -> bool:
        """Centrifugo's opt-in: API errors as HTTP statuses with ``{"code", "message"}``."""
        return request.headers.get("x-centrifugo-error-mode", "") == "transport"

    async def api_body(request: Request) -> bytes | Response:
        """A server API request's body, or the 401/413 answer."""
        if not authorized(request):
            return error_response(denied, 401)
        try:
            return await read_body(request, settings.api_max_body_size)
        except BadRequest as exc:
            return error_response(exc, 413)

    @router.post("/api/{method}", tags=["api"])
    async def server_api(method: str, request: Request) -> Response:
        """Centrifugo's server API: ``publish``, ``broadcast``, ``history``, ``batch``, ..."""
        body = await api_body(request)
        if isinstance(body, Response):
            return body
        try:
            params = parse_object(body) if body.strip() else {}
            answer = await tidings.api.call(method, params)
            error = answer.get("error")
            if error is not None and method != "batch" and transport_errors(request):
                return json_response(error, TRANSPORT_STATUS.get(error["code"], 500))
            return json_response(answer)
        except MethodNotFound as exc:
            return error_response(exc, 404)
        except BadRequest as exc:  # not JSON, or Malformed params
            return error_response(exc, 400)

    @router.post("/api", tags=["api"])
    async def legacy_api(request: Request) -> Response:
        """Centrifugo's older single endpoint (cent < 5, gocent < 3): newline-delimited
        ``{"id": n, "method": "publish", "params": {...}}``, one reply line each."""
        body = await api_body(request)
        if isinstance(body, Response):
            return body
        replies = []
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                command = parse_object(line, "a command")
            except BadRequest as exc:
                return error_response(exc, 400)
            try:
                answer = await tidings.api.call(
                    str(command.get("method", "")).lower(), command.get("params")
                )
            except (MethodNotFound, Malformed) as exc:
                answer = {"error": exc.as_dict()}
            if command.get("id"):
                answer = {"id": command["id"], **answer}
            replies.append(orjson.dumps(answer))
        if not replies:
            return error_response(BadRequest("no command in the body"), 400)
        return Response(b"\n".join(replies), media_type="application/json")

    @router.post("/push", tags=["seed"])
    async def push(request: Request) -> Response:
        """The FastAPI + broadcaster example's shape: ``{"channel": str, "message": str}``."""
        if not authorized(request):
            return error_response(denied, 401)
        try:
            payload = await _json_object(request, body_limit)
            channel = _string(payload, "channel")
            message = _string(payload, "message")
        except TidingsError as exc:
            return error_response(exc, 400)
        return await publish(channel, orjson.dumps(message))

    @router.post("/publish/{channel}", tags=["seed"])
    async def publish_text(channel: str, request: Request) -> Response:
        """The tutorial shape: the request body, as text, is the message."""
        if not authorized(request):
            return error_response(denied, 401)
        try:
            text = (await read_body(request, body_limit)).decode()
        except UnicodeDecodeError:
            return error_response(BadRequest("body is not UTF-8 text"), 400)
        except TidingsError as exc:
            return error_response(exc, 400)
        return await publish(channel, orjson.dumps(text))

    @router.get("/health", tags=["ops"])
    async def health() -> Response:
        """Liveness plus broker connectivity: 503 when the broker cannot be reached."""
        try:
            await hub.broker.ping()
        except Exception as exc:
            return json_response(
                {"status": "error", "broker": {"ok": False, "error": str(exc)}}, 503
            )
        return json_response(
            {
                "status": "ok",
                "node": hub.node_id,
                "broker": {"ok": True, "engine": type(hub.broker).__name__},
                "connections": len(hub.sessions),
                "channels": len(list(hub.channels)),
            }
        )

    @router.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus exposition of the hub's counters."""
        body, content_type = tidings.metrics_exposition()
        return Response(body, media_type=content_type)

    return router
