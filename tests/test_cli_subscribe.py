"""`tidings subscribe` as a user runs it against a real `tidings serve` (issue 14, item 7):
it announces a subscription only once the server accepted it, never prints a token, catches up
from ``--since`` and after reconnections, and says so when it cannot."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import jwt

from .clirun import clean_env, running, tidings
from .conftest import free_port, served
from .engines import ENGINES, namespace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@contextmanager
def server(port: int | None = None, **env: str) -> Iterator[str]:
    """`tidings serve` on ``port`` (a free one by default) with ``env``; its URL."""
    port = port or free_port()
    with running("serve", "--port", str(port), env=clean_env(**env)) as serve:
        serve.wait("listening on")
        yield f"http://127.0.0.1:{port}"


def publish(url: str, channel: str, *messages: str, **env: str) -> None:
    for message in messages:
        done = tidings("publish", channel, message, "--url", url, env=clean_env(**env))
        assert done.returncode == 0, done.stderr


def test_refusal_comes_without_a_subscribed_line() -> None:
    with server() as url:
        done = tidings("subscribe", "nope:x", "--url", url)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: refused: unknown channel namespace 'nope' (code 102)"
    ]


def test_subscribed_once_accepted_and_the_token_is_never_printed() -> None:
    secret = "k" * 32
    token = jwt.encode({"sub": "alice"}, secret, algorithm="HS256")
    env = {"TIDINGS_TOKEN_HMAC_SECRET": secret, "TIDINGS_API_KEY": "key"}
    with server(**env) as url:
        args = ["subscribe", "news", "--url", url, "--count", "1"]
        with running(*args, env=clean_env(TIDINGS_TOKEN=token)) as sub:
            sub.wait("^subscribed to news")
            publish(url, "news", "hi", TIDINGS_API_KEY="key")
            assert sub.finish() == 0
        assert sub.out == ["hi"]
        assert not any(token in line or token[:20] in line for line in sub.err)

        anonymous = tidings("subscribe", "news", "--url", url)
        assert anonymous.returncode == 2
        assert "token required" in anonymous.stderr and "--token" in anonymous.stderr
        forged = jwt.encode({"sub": "alice"}, "x" * 32, algorithm="HS256")
        bad = tidings("subscribe", "news", "--url", url, "--token", forged)
        assert bad.returncode == 2 and "3500" in bad.stderr
        assert forged[:20] not in bad.stderr and "subscribed" not in bad.stderr


def test_since_prints_what_history_holds_after_the_offset_with_offsets() -> None:
    with server() as url:
        publish(url, "news", "a", "b", "c")
        done = tidings(
            "subscribe", "news", "--url", url, "--since", "1", "--show-offset", "--count", "2"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "2\tb\n3\tc\n"
        assert "missed" not in done.stderr and "reset" not in done.stderr


def test_since_with_another_epoch_is_told_and_replays_what_is_kept() -> None:
    with server() as url:
        publish(url, "news", "a", "b")
        done = tidings(
            "subscribe", "news", "--url", url, "--since", "1", "--epoch", "old", "--count", "2"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "a\nb\n"
        assert "stream reset: news has a new epoch (old → " in done.stderr


def test_a_gap_history_cannot_fill_is_reported() -> None:
    with server(TIDINGS_DEFAULTS__HISTORY_SIZE="2") as url:
        publish(url, "news", "1", "2", "3", "4")
        done = tidings(
            "subscribe", "news", "--url", url, "--since", "0", "--show-offset", "--count", "2"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == "3\t3\n4\t4\n"
        assert "missed publications 1..2 of news: history no longer holds them" in done.stderr


def test_a_reconnected_subscriber_recovers_what_it_missed() -> None:
    async def main() -> None:
        async with namespace(ENGINES["redis"]) as broker:
            out, err = await asyncio.to_thread(_across_restart, broker)
            assert out == ["1\ta", "2\tb", "3\tc"]
            assert "missed" not in "\n".join(err) and "reset" not in "\n".join(err)

    asyncio.run(main())


def test_a_stream_reset_across_a_restart_is_told() -> None:
    out, err = _across_restart("memory://")
    assert out[0] == "1\ta"
    assert out[1:] == ["1\tb", "2\tc"]  # the new stream, from its start
    assert any(line.startswith("stream reset: news has a new epoch") for line in err), err


def _across_restart(broker: str) -> tuple[list[str], list[str]]:
    """Subscribe; publish "a"; stop the server; start another on the same port and broker;
    publish "b" and "c" there (the subscriber reconnects on its own, before or after them)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TIDINGS_BROKER_URL": broker}
    args = ["subscribe", "news", "--url", url, "--show-offset", "--count", "3"]
    with running(*args) as sub:
        with server(port, **env):
            sub.wait("^subscribed to news")
            publish(url, "news", "a")
            sub.wait("a$", "out")
        sub.wait("disconnected|cannot connect")
        with server(port, **env):
            publish(url, "news", "b", "c")
            assert sub.finish() == 0
    return sub.out, sub.err


async def test_a_late_watcher_of_the_tasks_example_gets_every_step() -> None:
    # a copy of its own: the example's Tidings lives in one event loop (test_examples has it)
    spec = importlib.util.spec_from_file_location("tasks_for_cli", EXAMPLES / "tasks.py")
    assert spec is not None and spec.loader is not None
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    async with served(tasks.app) as (port, _):
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as http:
            started = (await http.post("/tasks", params={"steps": 3, "delay": 0})).json()
            channel = started["channel"]
            for _ in range(500):  # the job has finished before anyone watches
                history = await http.post(
                    "/api/history", json={"channel": channel, "limit": -1}
                )
                if len(history.json()["result"]["publications"]) == 4:
                    break
                await asyncio.sleep(0.01)
        args = ["subscribe", channel, "--url", url, "--since", "0", "--count", "4"]
        done = await asyncio.to_thread(tidings, *args)
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in done.stdout.splitlines()]
    assert [s.get("step") for s in steps] == [1, 2, 3, None]
    assert steps[3] == {"task": started["task"], "done": True}


def test_publish_without_the_api_key_says_how() -> None:
    with server(TIDINGS_API_KEY="key") as url:
        done = tidings("publish", "news", "hi", "--url", url)
        assert done.returncode == 2
        assert "(HTTP 401): pass --api-key or set TIDINGS_API_KEY" in done.stderr
        assert tidings("publish", "news", "hi", "--url", url, "--api-key", "key").returncode == 0


def test_a_channel_without_history_says_what_a_reconnection_loses() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"TIDINGS_DEFAULTS__HISTORY_SIZE": "0"}
    with running("subscribe", "news", "--url", url, "--count", "1") as sub:
        with server(port, **env):
            sub.wait("^subscribed to news$")  # no position: the channel keeps none
        sub.wait("disconnected|cannot connect")
        with server(port, **env):
            sub.wait("news keeps no history, so what was published while disconnected is lost")
            publish(url, "news", "after")
            assert sub.finish() == 0
    assert sub.out == ["after"]
