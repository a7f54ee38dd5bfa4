"""The server API's OpenAPI document (``GET /api/openapi.json``), and schemathesis driving
the API from it on both HTTP paths (stock uvicorn, `tidings serve`'s own HTTP protocol):
no server error, statuses, content types and bodies as the document says."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tidings.brokers.memory import MemoryBroker
from tidings.config import Settings
from tidings.hub import Hub
from tidings.openapi import METHOD_PARAMS, document
from tidings.server_api import ServerApi

from .conftest import Serve
from .fuzzutil import ThreadServer

KEY = "schemathesis-key"


def test_every_server_api_method_is_described() -> None:
    api = ServerApi(Hub(MemoryBroker(), Settings()), Settings())
    assert set(METHOD_PARAMS) == {*api.methods, "batch"}
    paths = document()["paths"]
    assert set(paths) == {f"/api/{m}" for m in METHOD_PARAMS}


@pytest.mark.parametrize("fast", [False, True])
async def test_the_document_is_served(serve: Serve, fast: bool) -> None:
    srv = await serve(fast=fast, api_key=KEY)
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{srv.url}/api/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["openapi"] == "3.1.0"
    publish = body["paths"]["/api/publish"]["post"]
    params = body["components"]["schemas"]["PublishParams"]
    assert publish["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PublishParams"
    )
    assert {"channel", "data", "b64data", "skip_history", "tags"} <= set(params["properties"])


@pytest.mark.parametrize("fast", [False, True], ids=["uvicorn", "serve"])
def test_server_api_conforms_to_its_document(fast: bool) -> None:
    """schemathesis generates requests for every operation of the served document; each answer
    must pass its checks (no 5xx, documented status, content type and body)."""
    with ThreadServer(fast, api_key=KEY, max_commands_per_second=0) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        loaded = schemathesis.openapi.from_url(f"{base}/api/openapi.json")
        operations = [result.ok() for result in loaded.get_all_operations()]
        assert len(operations) == len(METHOD_PARAMS)
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
            def conforms(case: Any) -> None:
                case.call_and_validate(base_url=base, headers={"X-API-Key": KEY})

            conforms()


@pytest.mark.parametrize("fast", [False, True])
async def test_non_ascii_b64data_is_a_client_error(
    serve: Serve, fast: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by schemathesis: non-ASCII ``b64data`` was error 100 and a logged traceback."""
    srv = await serve(fast=fast)
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{srv.url}/api/publish", json={"channel": "c", "b64data": "é=="})
    assert r.json()["error"]["code"] == 107
    assert not [rec for rec in caplog.records if rec.levelno >= 40 or rec.exc_info]
