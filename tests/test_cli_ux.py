"""A newcomer's first hour with the ``tidings`` command (issue 14): start-up failures, help,
configuration mistakes, logs, tokens and the client commands' imports, each checked through a
real ``tidings`` process (or typer's CliRunner for the help text)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import jwt
import pytest
import websockets
from typer.testing import CliRunner

from tidings.cli import app

from .cfutil import SECRET, Raw
from .cfutil import token as cf_token
from .clirun import clean_env, running, tidings
from .conftest import Serve, free_port

# -- 1, 8: start-up ----------------------------------------------------------------------------


def test_unreachable_broker_is_one_line_and_a_failure() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    done = tidings("serve", "--broker", dead, "--port", str(free_port()))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert f"cannot reach the broker {dead}" in errors[0]
    assert "--broker" in errors[0] and "TIDINGS_BROKER_URL" in errors[0]  # the fix
    assert "listening" not in done.stderr  # never announced


def test_start_up_failure_in_json_logs_is_a_json_line() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    done = tidings("serve", "--broker", dead, "--port", str(free_port()), "--log-format", "json")
    assert done.returncode == 1
    [entry] = [json.loads(line) for line in done.stderr.splitlines()]  # all JSON, one line
    assert entry["level"] == "error" and entry["event"] == "startup_failed"
    assert entry["message"].startswith(f"cannot reach the broker {dead}")


def test_taken_port_is_one_line_and_no_banner() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = tidings("serve", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"error: port {port} is already in use on 127.0.0.1 (another tidings serve?): "
        "stop that process or choose another port with --port or TIDINGS_PORT"
    ]


def test_address_of_another_machine_is_named() -> None:
    done = tidings("serve", "--host", "192.0.2.1", "--port", str(free_port()), "--insecure")
    assert done.returncode == 1
    assert "192.0.2.1" in done.stderr and "--host" in done.stderr
    assert "Traceback" not in done.stderr


def test_banner_comes_once_listening_and_dev_mode_once() -> None:
    port = free_port()
    with running("serve", "--port", str(port)) as serve:
        [banner] = serve.wait("listening on")
        # announced once it listens: the URL it names answers at once
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert banner.endswith(
            f"tidings listening on http://127.0.0.1:{port} "
            f"(broker memory://, demo page http://127.0.0.1:{port}/)"
        )
    text = "\n".join(serve.err)
    assert text.count("DEV MODE") == 1
    assert "Uvicorn running" not in text and "Started server process" not in text


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_banner_has_brackets() -> None:
    port = free_port()
    with running("serve", "--host", "::1", "--port", str(port)) as serve:
        [banner] = serve.wait("listening on")
        assert f"http://[::1]:{port} " in banner
        assert httpx.get(f"http://[::1]:{port}/health").status_code == 200


# -- 5: help, version, markup ------------------------------------------------------------------

runner = CliRunner()


def _help(*command: str) -> str:
    done = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    return " ".join(done.output.split())  # as one line: wrapping depends on the terminal


def test_help_shows_env_vars_defaults_and_flags_as_flags() -> None:
    serve = _help("serve")
    assert "[env var: TIDINGS_HOST; default: (127.0.0.1)]" in serve
    assert "[env var: TIDINGS_PORT; default: (8000)]" in serve
    assert "[env var: TIDINGS_BROKER_URL; default: (memory://)]" in serve
    assert "[env var: TIDINGS_LOG_FORMAT; default: (text)]" in serve
    assert "--insecure Allow dev mode" in serve  # a flag: no value shown
    assert "<bool>" not in serve

    publish = _help("publish")
    assert "publish [OPTIONS] CHANNEL DATA " in publish
    assert "{" not in publish
    assert "[env var: TIDINGS_URL; default: http://127.0.0.1:8000]" in publish

    subscribe = _help("subscribe")
    for option in ("--since", "--epoch", "--show-offset", "--count", "--sub-token"):
        assert option in subscribe


def test_version() -> None:
    from importlib.metadata import version

    done = tidings("--version")
    assert done.returncode == 0
    assert done.stdout == f"tidings {version('tidings')}\n"


def test_text_in_square_brackets_is_shown_as_typed() -> None:
    # rich markup would read [redis] or [bold] as tags and drop them
    url = f"http://127.0.0.1:{free_port()}/[redis]/[bold]x"
    done = tidings("publish", "news", "hi", "--url", url)
    assert done.returncode == 2
    assert f"cannot reach {url}" in done.stderr


def test_install_hint_keeps_its_extra_in_brackets() -> None:
    # as if redis-py were not installed: the hint's [redis] is text, not a markup tag
    probe = (
        "import sys; sys.modules['redis'] = sys.modules['redis.asyncio'] = None\n"
        "from tidings.cli import app\n"
        f"app(['serve', '--broker', 'redis://127.0.0.1:6379', '--port', '{free_port()}'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.strip().endswith("install tidings[redis]"), done.stderr


# -- 6, 12: configuration mistakes -------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "closest"),
    [
        ("TIDINGS_APIKEY", "TIDINGS_API_KEY"),
        ("TIDINGS_BROKER", "TIDINGS_BROKER_URL"),
        ("TIDINGS_DEFAULTS__HISTORY_SIZ", "TIDINGS_DEFAULTS__HISTORY_SIZE"),
        ("TIDINGS_NAMESPACES__CHAT__PRESENSE", "TIDINGS_NAMESPACES__CHAT__PRESENCE"),
    ],
)
def test_unknown_env_var_is_an_error_naming_the_closest_setting(
    variable: str, closest: str
) -> None:
    done = tidings("serve", "--port", str(free_port()), env=clean_env(**{variable: "1"}))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: bad configuration: unknown environment variable {variable} "
        f"(did you mean {closest}?)"
    )


def test_unknown_env_var_is_an_error_in_code_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from tidings import Tidings
    from tidings.config import ConfigError

    monkeypatch.setenv("TIDINGS_APIKEY", "secret")
    with pytest.raises(ConfigError, match="TIDINGS_API_KEY"):
        Tidings()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--log-level", "loud", "log_level"), ("--log-format", "xml", "log_format")],
)
def test_bad_option_value_names_the_setting(option: str, value: str, named: str) -> None:
    done = tidings("serve", option, value, "--port", str(free_port()))
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert lines[0] == "error: bad configuration (options or TIDINGS_* variables):"
    assert lines[1].startswith(f"  {named}: ") and len(lines) == 2


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "tidings.toml"
    path.write_text("port = 8001\n\n[namespaces.chat\npresence = true\n")
    done = tidings("serve", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: bad configuration: {path}, line 3, column 17: ")
    assert "Traceback" not in done.stderr


# -- 10: logs ----------------------------------------------------------------------------------


async def _refused_and_accepted(port: int, token: str) -> None:
    base = f"ws://127.0.0.1:{port}"
    for url in (f"{base}/ws/nope:x?token={token}", f"{base}/ws/news?token={token}&since=0"):
        async with websockets.connect(url) as ws:
            with pytest.raises((websockets.ConnectionClosed, TimeoutError)):
                await asyncio.wait_for(ws.recv(), 0.3 if "news" in url else 10)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_one_log_line_per_connection_event_and_no_token(fmt: str) -> None:
    secret = "k" * 32
    token = jwt.encode({"sub": "alice"}, secret, algorithm="HS256")
    env = clean_env(
        TIDINGS_TOKEN_HMAC_SECRET=secret,
        TIDINGS_API_KEY="api-secret",
        TIDINGS_DEFAULTS__ALLOW_SUBSCRIBE="anonymous",
    )
    port = free_port()
    args = ["serve", "--port", str(port), "--log-level", "debug", "--log-format", fmt]
    with running(*args, env=env) as serve:
        serve.wait("listening on")
        asyncio.run(_refused_and_accepted(port, token))
        httpx.post(
            f"http://127.0.0.1:{port}/api/publish?api_key=api-secret",
            json={"channel": "news", "data": 1},
            headers={"X-API-Key": "api-secret"},
        )
        serve.wait("closed /ws/news")
        serve.wait(r"POST /api/publish\b")  # uvicorn's access line, in debug
    lines = serve.err
    text = "\n".join(lines)
    assert token not in text and token.split(".")[0] not in text and "api-secret" not in text
    assert "?" not in "".join(line for line in lines if "/ws/" in line or "/api/" in line)
    if fmt == "json":
        events = [json.loads(line) for line in lines]  # every line is one JSON object
        by_event = [e for e in events if e.get("event")]
        assert not [e for e in events if "accepted" in e["message"] or "open" in e["message"]]
        assert [(e["event"], e["path"]) for e in by_event] == [
            ("refused", "/ws/nope:x"),
            ("connected", "/ws/news"),
            ("closed", "/ws/news"),
        ]
        assert by_event[0]["code"] == 1008 and "unknown channel namespace" in by_event[0]["reason"]
        assert by_event[1]["user"] == "alice"
    else:
        # no uvicorn [accepted] or websockets "connection open" beside them (debug shows more:
        # websockets' own protocol lines, redacted too)
        ws_lines = [line for line in lines if "/ws/" in line and " DEBUG " not in line]
        assert len(ws_lines) == 3, ws_lines
        assert "refused /ws/nope:x: 1008 102: unknown channel namespace" in ws_lines[0]
        assert "connected /ws/news" in ws_lines[1] and "user=alice" in ws_lines[1]
        assert "closed /ws/news" in ws_lines[2]


def test_log_redaction_of_anything_secret() -> None:
    from tidings.logs import redact

    jwt_ = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    assert redact(f'127.0.0.1:5 - "GET /ws/ch?token={jwt_} HTTP/1.1" 101') == (
        '127.0.0.1:5 - "GET /ws/ch HTTP/1.1" 101'
    )
    assert redact(f"bad token {jwt_}") == "bad token ***"
    assert redact("api_key=abc, password: hunter2") == "api_key=***, password: ***"
    assert redact("did you mean TIDINGS_API_KEY?") == "did you mean TIDINGS_API_KEY?"


def test_redact_filter_on_uvicorns_access_record() -> None:
    from tidings.logs import Redact

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/rt/ws/news?token=abc.def.ghi&since=3", "1.1", 101),
        None,
    )
    assert Redact().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /rt/ws/news HTTP/1.1" 101'
    accepted = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", "/ws/news?token=x"),
        None,
    )
    assert not Redact().filter(accepted)  # tidings logs the connection itself


# -- 10: tokens --------------------------------------------------------------------------------


def test_token_with_a_short_secret_warns_in_one_line_of_ours() -> None:
    done = tidings("token", "--user", "alice", "--secret", "short")
    assert done.returncode == 0
    claims = jwt.decode(done.stdout.strip(), options={"verify_signature": False})
    assert claims["sub"] == "alice"
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("warning: the secret is 5 bytes; HS256 needs at least 32")
    assert "InsecureKeyLengthWarning" not in done.stderr and "api_jwt" not in done.stderr
    long = tidings("token", "--user", "alice", "--secret", "s" * 32)
    assert long.returncode == 0 and long.stderr == ""


# -- 11: what the client commands import -------------------------------------------------------

#: (typer >= 0.2x imports pydantic itself, when installed, to support pydantic parameter types)
SERVER_SIDE = ("fastapi", "starlette", "uvicorn", "pydantic_settings", "httpx", "tidings.app")

#: runs ``tidings ARGS`` in-process, then reports which of SERVER_SIDE it imported
PROBE = textwrap.dedent(
    f"""
    import sys
    from tidings.cli import app
    try:
        app(sys.argv[1:])
    except SystemExit:
        pass
    heavy = sorted({{m for m in sys.modules}} & set({SERVER_SIDE!r}))
    print("IMPORTED", ",".join(heavy), file=sys.stderr)
    """
)


def _probe(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    [line] = [line for line in done.stderr.splitlines() if line.startswith("IMPORTED")]
    return [m for m in line.removeprefix("IMPORTED").strip().split(",") if m]


def test_client_commands_import_no_server_side() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: publish fails fast
    assert _probe("publish", "news", "hi", "--url", url) == []
    assert _probe("token", "--user", "alice", "--secret", "s" * 32) == []
    assert _probe("subscribe", "--help") == []
    # the probe sees them when they are imported: serve imports the server side
    assert "pydantic_settings" in _probe("serve", "--port", "-1")


def test_subscribe_imports_no_server_side_while_receiving() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with running("serve", "--port", str(port)) as serve:
        serve.wait("listening on")
        sub = subprocess.Popen(
            [sys.executable, "-c", PROBE, "subscribe", "news", "--url", url, "--count", "1"],
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert sub.stderr is not None
            line = sub.stderr.readline()
            assert line.startswith("subscribed to news"), line
            assert tidings("publish", "news", "hi", "--url", url).returncode == 0
            out, err = sub.communicate(timeout=30)
        finally:
            sub.kill()
    assert out == "hi\n"
    assert "IMPORTED \n" in err


async def test_centrifuge_connection_events_are_one_line_each(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    srv = await serve(token_hmac_secret=SECRET)
    with caplog.at_level(logging.INFO, logger="tidings.connection"):
        anonymous = await Raw.open(srv.ws)
        await anonymous.send({"connect": {}})
        assert (await anonymous.closed())[0] == 3501
        alice = await Raw.open(srv.ws)
        await alice.connect(token=cf_token("alice"))
        await alice.close()
        for _ in range(500):  # the server logs the close once it has seen it
            if any(r.getMessage().startswith("closed") for r in caplog.records):
                break
            await asyncio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "tidings.connection"]
    assert len(lines) == 3, lines
    assert lines[0] == "refused /connection/websocket: 3501 bad request: token required"
    assert lines[1].startswith("connected /connection/websocket client=")
    assert lines[1].endswith(" user=alice")
    assert lines[2].startswith("closed /connection/websocket client=")
    assert lines[2].endswith(": 1000 client closed")
