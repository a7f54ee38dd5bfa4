"""The configuration contract (env, TOML, namespaces) and the CLI's serve/token commands."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest
import websockets
from pydantic import ValidationError

from tidings import ChannelOptions, Settings

from .conftest import Serve, free_port
from .test_raw import recv_n

GOOD = """
port = 8001
api_key = "from-toml"

[defaults]
history_size = 10
presence = true

[namespaces.chat]
presence = true
join_leave = true
force_push_join_leave = true
history_size = 50
history_ttl = 60
allow_publish = false
force_recovery = true
allow_subscribe = "token"
"""


def clean_env() -> dict[str, str]:
    """The environment without TIDINGS_* settings, so only what a test sets counts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}


@pytest.fixture(autouse=True)
def no_tidings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in os.environ:
        if key.startswith("TIDINGS_"):
            monkeypatch.delenv(key)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_env(), "COLUMNS": "200", **(env or {})},
    )


def test_toml_with_namespaces_loads(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(GOOD)
    s = Settings.load(path)
    assert s.port == 8001 and s.api_key is not None and not s.dev_mode
    assert (s.defaults.history_size, s.defaults.presence) == (10, True)
    assert s.namespaces["chat"] == ChannelOptions(
        presence=True,
        join_leave=True,
        force_push_join_leave=True,
        history_size=50,
        history_ttl=60,
        allow_publish=False,
        force_recovery=True,
        allow_subscribe="token",
    )
    assert s.subscribe_rule(s.namespaces["chat"]) == "token"
    assert not s.allows_client_publish(s.namespaces["chat"])


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ("port = 1\nbogus_top = 1\n", "bogus_top"),
        ("[defaults]\nhistory_sizee = 1\n", "defaults.history_sizee"),
        ("[namespaces.chat]\npresense = true\n", "namespaces.chat.presense"),
        ('[namespaces.chat]\nallow_subscribe = "everyone"\n', "allow_subscribe"),
    ],
)
def test_unknown_or_bad_key_fails_naming_it(tmp_path: Path, toml: str, named: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ValidationError) as bad:
        Settings.load(path)
    assert named in str(bad.value)


def test_env_overrides_toml_and_code_overrides_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("TIDINGS_PORT", "9001")
    monkeypatch.setenv("TIDINGS_API_KEY", "from-env")
    monkeypatch.setenv("TIDINGS_DEFAULTS__HISTORY_SIZE", "5")
    s = Settings.load(path)
    assert s.port == 9001
    assert s.api_key is not None and s.api_key.get_secret_value() == "from-env"
    # nested env merges into the TOML table instead of replacing it
    assert (s.defaults.history_size, s.defaults.presence) == (5, True)
    assert Settings.load(path, port=9002, host=None).port == 9002


def test_serve_with_bad_config_exits_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[namespaces.chat]\npresense = true\n")
    done = cli("serve", "--config", str(path), "--port", str(free_port()))
    assert done.returncode != 0
    assert "namespaces.chat.presense" in done.stderr and "unknown key" in done.stderr
    missing = cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode != 0 and "not found" in missing.stderr


def test_serve_refuses_public_host_in_dev_mode() -> None:
    done = cli("serve", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode != 0
    assert "refusing" in done.stderr and "--insecure" in done.stderr


def test_serve_public_host_with_insecure_starts() -> None:
    port = free_port()
    args = [
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--insecure",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        for _ in range(300):
            assert proc.poll() is None, proc.communicate()[1].decode()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError("tidings serve did not answer /health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def test_token_command_prints_only_a_verifiable_jwt() -> None:
    secret = "s" * 32
    done = cli(
        "token",
        "--user",
        "alice",
        "--channel",
        "chat:1",
        "--ttl",
        "60",
        "--info",
        '{"n":1}',
        env={"TIDINGS_TOKEN_HMAC_SECRET": secret},
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n"
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["channel"] == "chat:1"
    assert claims["info"] == {"n": 1} and 0 < claims["exp"] - claims["iat"] <= 60

    forever = cli("token", "--user", "bob", "--ttl", "0", "--secret", secret)
    assert "exp" not in jwt.decode(forever.stdout.strip(), secret, algorithms=["HS256"])
    assert cli("token", "--user", "bob").returncode != 0  # no secret anywhere
    bad_info = cli("token", "--user", "bob", "--secret", secret, "--info", "{nope")
    assert bad_info.returncode != 0 and "--info" in bad_info.stderr


async def test_cli_tokens_open_token_channels_and_anonymous_is_refused(serve: Serve) -> None:
    secret = "t" * 32
    srv = await serve(
        token_hmac_secret=secret,
        namespaces={"chat": ChannelOptions(allow_subscribe="token")},
    )
    env = {"TIDINGS_TOKEN_HMAC_SECRET": secret}
    conn = (await asyncio.to_thread(cli, "token", "--user", "alice", env=env)).stdout.strip()
    sub = await asyncio.to_thread(cli, "token", "--user", "alice", "--channel", "chat:1", env=env)
    url = f"{srv.ws}/ws/chat:1"

    for refused in (url, f"{url}?token={conn}", f"{srv.ws}/ws/news"):
        async with websockets.connect(refused) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008

    async with websockets.connect(f"{url}?token={conn}&sub_token={sub.stdout.strip()}") as ws:
        for _ in range(500):
            if srv.hub.subscribers("chat:1"):
                break
            await asyncio.sleep(0.01)
        await srv.hub.publish("chat:1", "hi alice")
        assert await recv_n(ws, 1) == ["hi alice"]
