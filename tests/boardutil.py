"""Helpers for the task board's tests (examples/taskboard): databases, users, logins, the SDK.

PostgreSQL tests use a database created for the test and dropped after it, on the server at
``TIDINGS_TEST_POSTGRES_URL`` (default: the local one); under CI=true an unreachable server is a
failure, not a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples.taskboard import BoardSettings, create_app
from examples.taskboard.security import hash_password
from examples.taskboard.store import Store

from .conftest import IN_CI, npm_once

ROOT = Path(__file__).resolve().parents[1]
BOARD_DIR = ROOT / "examples" / "taskboard"
ARTIFACTS = ROOT / "artifacts"  # screenshots, kept by CI (gitignored)
POSTGRES_URL = os.environ.get(
    "TIDINGS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
SECRET = "taskboard-test-secret-long-enough-for-hs256"
WAIT = 10.0  # seconds a test waits for an event before failing


def password(user: str) -> str:
    return f"pw-of-{user}"


@asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A SQLAlchemy URL of an empty database of ``kind`` ("sqlite" or "postgres")."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'board.db'}"
        return
    import asyncpg

    name = f"taskboard_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=10)
    except Exception as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc!r}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = POSTGRES_URL.rsplit("/", 1)[0].split("://", 1)[1]
    try:
        yield f"postgresql+asyncpg://{base}/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_URL, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


#: user name -> the argon2id hash of ``password(name)``, made once per test process: a hash
#: costs ~0.25 s of CPU by design, and a fresh salt per database tests nothing more
_HASHES: dict[str, str] = {}


async def add_users(url: str, *names: str) -> None:
    """Create the tables and the users (password: ``password(name)``)."""
    store = Store(url)
    try:
        await store.create()
        for name in names:
            if name not in _HASHES:
                _HASHES[name] = await hash_password(password(name))
            await store.add_user(name, _HASHES[name])
    finally:
        await store.close()


def board_app(url: str, **tidings_settings: Any) -> Any:
    settings = BoardSettings(database_url=url, secret=SECRET, outbox_poll=0.5)
    return create_app(settings, **tidings_settings)


@asynccontextmanager
async def login(base_url: str, user: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client logged in as ``user`` (its bearer token in every request)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=WAIT) as client:
        answer = await client.post("/token", data={"username": user, "password": password(user)})
        assert answer.status_code == 200, answer.text
        client.headers["Authorization"] = f"Bearer {answer.json()['access_token']}"
        yield client


def token_of(client: httpx.AsyncClient) -> str:
    return client.headers["Authorization"].removeprefix("Bearer ")


def install_sdk() -> None:
    """`npm ci` in examples/taskboard unless the centrifuge SDK is there already."""
    npm_once(BOARD_DIR, BOARD_DIR / "node_modules" / "centrifuge" / "dist" / "centrifuge.js", "ci")
