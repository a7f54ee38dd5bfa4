"""centrifuge-python, the installed release and 0.6.0, in its JSON and protobuf flavours, on
both server paths: the same scenario (tests/sdk_scenario.py) passes in each of the eight.

0.6.0 is installed apart from the dev dependencies (only one release can be in a venv):
``pip install --no-deps --target .sdk/centrifuge-python-0.6.0 centrifuge-python==0.6.0``, as
``.ci/run`` does (README: Test). Each run is a subprocess with that directory first on
``PYTHONPATH``; the scenario prints the SDK module it ran, which the test checks.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from .cfutil import SECRET
from .conftest import IN_CI, Serve

ROOT = Path(__file__).resolve().parent.parent
SDK_060 = Path(os.environ.get("TIDINGS_TEST_SDK_060", ROOT / ".sdk" / "centrifuge-python-0.6.0"))

NAMESPACES = {
    "chat": {
        "presence": True,
        "allow_publish": True,
        "force_recovery": True,
        "allow_subscribe": "authenticated",
    },
}


@pytest.mark.parametrize("flavour", ["json", "protobuf"])
@pytest.mark.parametrize("release", ["installed", "0.6.0"])
@pytest.mark.parametrize("fast", [False, True], ids=["mounted", "fast"])
async def test_sdk_scenario(serve: Serve, release: str, flavour: str, fast: bool) -> None:
    env = dict(os.environ)
    if release == "0.6.0":
        if not (SDK_060 / "centrifuge").is_dir():
            if IN_CI:
                pytest.fail(f"centrifuge-python 0.6.0 is not installed in {SDK_060} (.ci/run)")
            pytest.skip(f"centrifuge-python 0.6.0 not installed in {SDK_060} (README: Test)")
        env["PYTHONPATH"] = os.pathsep.join([str(SDK_060), str(ROOT)])
    else:
        env["PYTHONPATH"] = str(ROOT)
    uvicorn_options = {}
    if release == "0.6.0" and flavour == "json" and not fast:
        # 0.6.0 sends an empty Sec-WebSocket-Protocol header for JSON; uvicorn's default
        # WebSocket implementation (websockets-sansio) answers it 400 before any app runs, so a
        # mounted app serving such clients runs uvicorn with ws="wsproto" (README)
        uvicorn_options["ws"] = "wsproto"
    srv = await serve(
        token_hmac_secret=SECRET,
        api_key="key",
        namespaces=NAMESPACES,
        fast=fast,
        uvicorn_options=uvicorn_options,
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.sdk_scenario",
        srv.ws,
        srv.url,
        flavour,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    last = text.strip().splitlines()[-1]
    assert last.startswith("ok "), text
    if release == "0.6.0":
        assert str(SDK_060) in last, text  # the 0.6.0 copy ran, not the installed one
    else:
        assert str(SDK_060) not in last, text
