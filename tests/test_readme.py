"""The README's code runs as written (issue 14, item 4).

Every ``python`` and ``toml`` block in README.md is preceded by a marker line:
``<!-- readme: program NAME -->`` for a complete program, which a test below extracts and runs
(``CHECKS[NAME]``), or ``<!-- readme: fragment -->`` for an excerpt that needs context (a
server, a token, an ``await`` outside a function). A block without a marker fails
``test_every_block_is_marked``, so a new snippet cannot slip in untested by accident.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from tidings import Settings

from .conftest import served

README = Path(__file__).resolve().parent.parent / "README.md"
MARKED = re.compile(r"<!-- readme: (program (?P<name>[\w-]+)|fragment) -->\n```(?P<lang>\w+)\n")
FENCE = re.compile(r"^```(?P<lang>\w+)\n", re.MULTILINE)


@dataclass
class Block:
    line: int
    lang: str
    code: str
    marked: bool
    program: str | None  # its name, if marked as a complete program


def blocks() -> list[Block]:
    text = README.read_text()
    found = []
    for fence in FENCE.finditer(text):
        if fence["lang"] not in ("python", "toml"):
            continue
        end = text.index("\n```", fence.end() - 1)
        before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1] + "\n"
        marker = MARKED.match(before + fence.group(0))
        found.append(
            Block(
                line=text.count("\n", 0, fence.start()) + 1,
                lang=fence["lang"],
                code=text[fence.end() : end + 1],
                marked=marker is not None,
                program=marker["name"] if marker is not None else None,
            )
        )
    return found


def programs() -> dict[str, Block]:
    return {b.program: b for b in blocks() if b.program is not None}


def test_every_block_is_marked() -> None:
    unmarked = [b.line for b in blocks() if not b.marked]
    assert not unmarked, f"README.md blocks at lines {unmarked} need a <!-- readme: ... --> marker"
    assert set(programs()) == set(CHECKS), "each program has a check, and each check a program"


def load(block: Block) -> types.ModuleType:
    """Run a Python block as the module ``readme_NAME``, as `python file.py` would."""
    name = f"readme_{block.program}"
    module = types.ModuleType(name)
    module.__file__ = f"{README}:{block.line}"
    sys.modules[name] = module
    exec(compile(block.code, module.__file__, "exec"), module.__dict__)
    return module


async def _next(ws: websockets.ClientConnection) -> str:
    message = await asyncio.wait_for(ws.recv(), 10)
    assert isinstance(message, str)
    return message


async def check_mount(block: Block, tmp: Path) -> None:
    module = load(block)
    async with (
        served(module.app) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/ws/orders") as ws,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        for _ in range(500):  # subscribed once the hub counts it
            if module.tidings.hub.subscribers("orders"):
                break
            await asyncio.sleep(0.01)
        answer = await http.post("/orders", json={"id": 7})
        assert answer.json() == {"ok": True}
        assert await _next(ws) == '{"id":7}'
        assert (await http.get("/")).status_code == 404  # no demo page in the user's app


async def check_install(block: Block, tmp: Path) -> None:
    module = load(block)
    async with (
        served(module.app) as (port, _),
        websockets.connect(f"ws://127.0.0.1:{port}/rt/ws/orders?since=0") as ws,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        for _ in range(500):
            if module.tidings.hub.subscribers("orders"):
                break
            await asyncio.sleep(0.01)
        assert (await http.post("/orders")).status_code == 200
        assert await _next(ws) == '{"id":1}'
        status = await http.post("/rt/api/history", json={"channel": "status", "limit": -1})
        assert status.json()["result"]["publications"][0]["data"] == "up"  # my_lifespan ran


async def check_toml(block: Block, tmp: Path) -> None:
    path = tmp / "tidings.toml"
    path.write_text(block.code)
    settings = Settings.load(path)  # every key known, every value valid
    assert settings.broker_url == "redis://127.0.0.1:6379"
    assert settings.namespaces["private"].allow_subscribe == "token"


CHECKS: dict[str, Callable[[Block, Path], Awaitable[None]]] = {
    "mount": check_mount,
    "install": check_install,
    "toml": check_toml,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
async def test_readme_program_runs(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.startswith("TIDINGS_") and not key.startswith("TIDINGS_TEST_"):
            monkeypatch.delenv(key)
    block = programs()[name]
    try:
        await CHECKS[name](block, tmp_path)
    finally:
        sys.modules.pop(f"readme_{name}", None)
