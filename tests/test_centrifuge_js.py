"""The npm `centrifuge` SDK (centrifuge-js, under Node) against tidings, unchanged."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import orjson
import pytest

from .cfutil import SECRET, token
from .conftest import IN_CI, Serve, npm_once

JS = Path(__file__).parent / "js"


@pytest.fixture(scope="session")
def node() -> str:
    """Node with the SDK installed in tests/js/node_modules (npm install on first use)."""
    found = shutil.which("node")
    if found is None:
        if IN_CI:
            pytest.fail("node is required under CI")
        pytest.skip("node is not installed")
    npm_once(JS, JS / "node_modules" / "centrifuge" / "package.json")
    return found


async def test_js_sdk_connect_subscribe_recover(serve: Serve, node: str) -> None:
    srv = await serve(
        token_hmac_secret=SECRET,
        api_key="key",
        namespaces={"chat": {"force_recovery": True}},
    )
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS / "recover.mjs"),
        srv.url,
        token("js-user"),
        "key",
        "chat:js",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    steps = {s["step"]: s for s in map(orjson.loads, stdout.decode().splitlines())}
    assert steps["subscribed"] == {
        "step": "subscribed",
        "recoverable": True,
        "wasRecovering": False,
    }
    assert steps["live"]["pubs"] == [{"data": {"n": 0}, "offset": 1}]
    assert steps["resubscribed"]["recovered"] is True
    assert steps["resubscribed"]["wasRecovering"] is True
    assert steps["recovered"]["pubs"] == [{"data": {"n": i}, "offset": i + 1} for i in (1, 2, 3)]
