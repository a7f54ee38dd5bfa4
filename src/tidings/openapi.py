"""The server API's OpenAPI 3.1 document, served at ``GET /api/openapi.json``.

Built from the pydantic models :mod:`tidings.server_api` validates params with, so the schema
and the implementation cannot drift apart: each method is ``POST /api/{method}`` with its
params object as the body. Answers (Centrifugo's shapes):

* 200 ``{"result": {...}}``, or ``{"error": {"code", "message"}}`` for a request that was
  understood but cannot be done (102 unknown namespace, 107 bad channel, 108 not available,
  112 unrecoverable position, ...); with ``X-Centrifugo-Error-Mode: transport`` such errors
  are HTTP statuses instead (not described here);
* 400 ``{"error": ...}``: the body is not JSON, or the params do not have the documented types;
* 401 without the API key (when one is configured), 413 past ``api_max_body_size`` bytes.

``batch`` takes ``{"commands": [{METHOD: PARAMS}, ...], "parallel": bool}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from . import server_api as api

#: each server API method's params model (``info`` takes none)
METHOD_PARAMS: dict[str, type[BaseModel] | None] = {
    "publish": api._PublishOne,
    "broadcast": api._Broadcast,
    "history": api._History,
    "history_remove": api._ChannelOnly,
    "presence": api._ChannelOnly,
    "presence_stats": api._ChannelOnly,
    "subscribe": api._UserChannel,
    "unsubscribe": api._UserChannel,
    "disconnect": api._Disconnect,
    "refresh": api._Refresh,
    "channels": api._Channels,
    "info": None,
    "batch": api._Batch,
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        }
    },
}

_POSITION = {
    "type": "object",
    "properties": {"offset": {"type": "integer", "minimum": 0}, "epoch": {"type": "string"}},
}


def _result(method: str) -> dict[str, Any]:
    if method == "publish":
        result: dict[str, Any] = _POSITION
    elif method == "batch":
        return {
            "type": "object",
            "required": ["replies"],
            "properties": {"replies": {"type": "array", "items": {"type": "object"}}},
        }
    else:
        result = {"type": "object"}
    return {
        "oneOf": [
            {"type": "object", "required": ["result"], "properties": {"result": result}},
            {"$ref": "#/components/schemas/Error"},
        ]
    }


def _int64(schema: Any) -> None:
    """Bound every integer to 64 bits: the JSON parser refuses larger numbers (HTTP 400)."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["format"] = "int64"
            schema.setdefault("minimum", -(2**63))
            schema.setdefault("maximum", 2**63 - 1)
        for value in schema.values():
            _int64(value)
    elif isinstance(schema, list):
        for value in schema:
            _int64(value)


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(version: str = "0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of the server API (a dict, ready for JSON)."""
    components: dict[str, Any] = {"Error": _ERROR}
    paths: dict[str, Any] = {}
    for method, model in METHOD_PARAMS.items():
        if model is None:
            params: dict[str, Any] = {"type": "object"}
        else:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, definition in schema.pop("$defs", {}).items():
                components[name] = definition
            name = f"{method.title().replace('_', '')}Params"
            schema["title"] = name
            if method in ("publish", "broadcast"):  # server_api._data: one of them is required
                schema["anyOf"] = [
                    {"required": ["data"]},
                    {"required": ["b64data"], "properties": {"b64data": {"minLength": 1}}},
                ]
            components[name] = schema
            params = {"$ref": f"#/components/schemas/{name}"}
        paths[f"/api/{method}"] = {
            "post": {
                "operationId": method,
                "summary": f"Centrifugo server API: {method}",
                "security": [{"ApiKey": []}, {"Authorization": []}, {}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": params}},
                },
                "responses": {
                    "200": _json(_result(method), "the result, or an error for the request"),
                    "400": _json({"$ref": "#/components/schemas/Error"}, "not the params"),
                    "401": _json({"$ref": "#/components/schemas/Error"}, "API key required"),
                    "413": _json({"$ref": "#/components/schemas/Error"}, "body too large"),
                },
            }
        }
    _int64(components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "tidings server API (Centrifugo-compatible)", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Authorization": {"type": "apiKey", "in": "header", "name": "Authorization"},
            },
        },
    }


__all__ = ["METHOD_PARAMS", "document"]
