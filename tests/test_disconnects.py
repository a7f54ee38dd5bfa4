"""A client that disconnects in the middle of a request body costs one log line, not a
traceback, on both paths (stock uvicorn + FastAPI routes; `tidings serve`'s own HTTP)."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from .conftest import Serve


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("path", ["/push", "/api", "/api/publish", "/publish/c?token=secret"])
async def test_disconnect_mid_body_is_one_line(
    serve: Serve, caplog: pytest.LogCaptureFixture, fast: bool, path: str
) -> None:
    caplog.set_level(logging.INFO)
    srv = await serve(fast=fast)
    _reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b'{"channel": "c", "mess'
    )
    await writer.drain()
    writer.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not [r for r in caplog.records if "disconnected after" in r.getMessage()]:
        assert loop.time() < deadline, "no line about the disconnect"
        await asyncio.sleep(0.01)
    async with httpx.AsyncClient() as http:  # served on, and any traceback is logged by now
        assert (await http.get(f"{srv.url}/health")).status_code == 200
    lines = [r for r in caplog.records if "disconnected after" in r.getMessage()]
    assert len(lines) == 1
    assert "secret" not in lines[0].getMessage()
    assert lines[0].getMessage().startswith(f"POST {path.partition('?')[0]}: ")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
