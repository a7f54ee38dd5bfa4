"""The task board (examples/taskboard) over real sockets: REST API, tidings channels, outbox,
restarts and the two commands; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from centrifuge import Client, PublicationContext, SubscriptionEventHandler
from examples.taskboard.outbox import Relay
from examples.taskboard.store import Store

from tidings.brokers import BrokerUnavailable

from .boardutil import (
    ROOT,
    SECRET,
    WAIT,
    add_users,
    board_app,
    database,
    install_sdk,
    login,
    token_of,
)
from .cfutil import Raw
from .conftest import Running, Serve, free_port, served
from .engines import ENGINES, namespace


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with database(request.param, tmp_path) as url:
        await add_users(url, "alice", "bob", "carol")
        yield url


@pytest.fixture
def app(db_url: str) -> Any:
    return board_app(db_url)


@pytest.fixture
async def board(serve: Serve, app: Any) -> Running:
    return await serve(app=app)


class Pubs(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[PublicationContext] = asyncio.Queue()

    async def on_publication(self, ctx: PublicationContext) -> None:
        await self.queue.put(ctx)

    async def next(self) -> Any:
        return (await asyncio.wait_for(self.queue.get(), WAIT)).pub.data


async def sdk_subscriber(srv: Running, token: str, channel: str) -> tuple[Client, Pubs]:
    """centrifuge-python connected with a board token and subscribed to ``channel``."""
    client = Client(f"{srv.ws}/connection/websocket", token=token, proxy=None)
    await client.connect()
    pubs = Pubs()
    sub = client.new_subscription(channel, pubs)
    await sub.subscribe()
    await sub.ready(WAIT)
    return client, pubs


def event(data: dict[str, Any]) -> tuple[str, int, int]:
    return data["type"], data["id"], data["version"]


# -- login and tokens --------------------------------------------------------------------------


async def test_login_and_unauthorized_access(board: Running) -> None:
    async with httpx.AsyncClient(base_url=board.url) as anon:
        for user, given in [("alice", "wrong"), ("nobody", "pw"), ("bad name!", "pw")]:
            r = await anon.post("/token", data={"username": user, "password": given})
            assert r.status_code == 401, r.text
            assert r.json() == {"detail": "incorrect user name or password"}
            assert r.headers["www-authenticate"] == "Bearer"
        r = await anon.post("/token", data={"username": "alice"})
        assert r.status_code == 422  # the form needs a password

        r = await anon.get("/tasks")
        assert (r.status_code, r.json()) == (401, {"detail": "not authenticated"})
        assert r.headers["www-authenticate"] == "Bearer"
        now = int(time.time())
        bad = {
            "garbage": "not-a-jwt",
            "other secret": jwt.encode(
                {"sub": "alice", "exp": now + 60}, "another-secret-32-bytes-long!!!!!", "HS256"
            ),
            "expired": jwt.encode({"sub": "alice", "exp": now - 60}, SECRET, "HS256"),
            "not a user": jwt.encode({"sub": "mallory", "exp": now + 60}, SECRET, "HS256"),
        }
        for why, token in bad.items():
            r = await anon.get("/tasks", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, why
        r = await anon.get("/tasks", headers={"Authorization": f"Bearer {bad['expired']}"})
        assert r.json() == {"detail": "token expired"}
        r = await anon.post("/tasks", json={"title": "x"})
        assert r.status_code == 401

    async with login(board.url, "alice") as alice:
        assert (await alice.get("/users/me")).json() == {"name": "alice"}
        names = [u["name"] for u in (await alice.get("/users")).json()]
        assert names == ["alice", "bob", "carol"]
        claims = jwt.decode(token_of(alice), SECRET, algorithms=["HS256"])
        assert claims["sub"] == "alice" and claims["info"] == {"name": "alice"}
        assert claims["exp"] - claims["iat"] == 3600
        renewed = (await alice.post("/token/refresh")).json()
        assert renewed["token_type"] == "bearer" and renewed["expires_in"] == 3600
        r = await alice.get(
            "/users/me", headers={"Authorization": f"Bearer {renewed['access_token']}"}
        )
        assert r.json() == {"name": "alice"}


async def test_the_login_token_opens_the_websocket_too(board: Running) -> None:
    async with login(board.url, "alice") as alice:
        raw = await Raw.open(board.ws)
        try:
            reply = await raw.connect(token=token_of(alice))
            assert reply["client"]
            # browsers may publish to the chat (tidings adds the author), never to `tasks`
            refused = await raw.call("publish", channel="tasks", data={"type": "task.deleted"})
            assert refused["error"]["code"] == 103, refused
            sent = await raw.call("publish", channel="chat:tasks", data={"text": "hi"})
            assert "error" not in sent, sent
            history = await board.tidings.hub.history("chat:tasks", limit=-1)
            (pub,) = history.publications
            assert pub.info is not None and pub.info.user == "alice"
            # without a token tidings refuses the connection (the board is not in dev mode)
            stranger = await Raw.open(board.ws)
            await stranger.send({"connect": {}})
            with pytest.raises(Exception):  # noqa: B017 - closed: 3501
                await stranger.read_frame(WAIT)
            assert stranger.ws.close_code == 3501
        finally:
            await raw.ws.close()


# -- CRUD and validation -----------------------------------------------------------------------


async def test_crud(board: Running) -> None:
    async with login(board.url, "alice") as alice:
        r = await alice.post(
            "/tasks", json={"title": "  Write docs ", "description": "the tutorial"}
        )
        assert r.status_code == 201, r.text
        task = r.json()
        assert {k: task[k] for k in ("title", "description", "done", "assignee")} == {
            "title": "Write docs",
            "description": "the tutorial",
            "done": False,
            "assignee": None,
        }
        assert task["created_by"] == "alice" and task["version"] == 1
        assert task["created_at"] == task["updated_at"]
        second = (await alice.post("/tasks", json={"title": "Ship", "assignee": "bob"})).json()
        assert second["assignee"] == "bob" and second["id"] > task["id"]

        listed = (await alice.get("/tasks")).json()
        assert [t["id"] for t in listed] == [task["id"], second["id"]]
        assert (await alice.get(f"/tasks/{task['id']}")).json() == task

        r = await alice.patch(f"/tasks/{task['id']}", json={"version": 1, "done": True})
        assert r.status_code == 200, r.text
        done = r.json()
        assert done["done"] is True and done["version"] == 2
        assert done["updated_at"] > done["created_at"]
        r = await alice.patch(f"/tasks/{task['id']}", json={"version": 2, "assignee": "carol"})
        assert r.json()["assignee"] == "carol" and r.json()["version"] == 3
        r = await alice.patch(f"/tasks/{task['id']}", json={"version": 3, "assignee": None})
        assert r.json()["assignee"] is None and r.json()["version"] == 4
        r = await alice.patch(
            f"/tasks/{task['id']}", json={"version": 4, "title": "Docs", "description": ""}
        )
        assert (r.json()["title"], r.json()["description"]) == ("Docs", "")

        assert (await alice.delete(f"/tasks/{second['id']}")).status_code == 204
        assert (await alice.get(f"/tasks/{second['id']}")).status_code == 404
        assert (await alice.delete(f"/tasks/{second['id']}")).status_code == 404
        r = await alice.patch(f"/tasks/{second['id']}", json={"version": 1, "done": True})
        assert (r.status_code, r.json()) == (404, {"detail": f"no task {second['id']}"})
        assert [t["id"] for t in (await alice.get("/tasks")).json()] == [task["id"]]


async def test_validation_errors_are_clear_422s(board: Running) -> None:
    async with login(board.url, "alice") as alice:
        tid = (await alice.post("/tasks", json={"title": "t"})).json()["id"]
        cases: list[tuple[str, str, Any, list[str], str]] = [
            ("POST", "/tasks", {"title": "   "}, ["body", "title"], "at least 1 character"),
            ("POST", "/tasks", {}, ["body", "title"], "Field required"),
            ("POST", "/tasks", {"title": "x" * 201}, ["body", "title"], "at most 200"),
            ("POST", "/tasks", {"title": "t", "color": "red"}, ["body", "color"], "Extra inputs"),
            ("POST", "/tasks", {"title": "t", "assignee": "zed"}, ["body", "assignee"], "'zed'"),
            ("POST", "/tasks", {"title": "t", "assignee": "a,b"}, ["body", "assignee"], "match"),
            ("POST", "/tasks", {"title": 5}, ["body", "title"], "valid string"),
            ("PATCH", f"/tasks/{tid}", {"done": True}, ["body", "version"], "Field required"),
            ("PATCH", f"/tasks/{tid}", {"version": 1}, ["body"], "nothing to change"),
            ("PATCH", f"/tasks/{tid}", {"version": 0, "done": 1}, ["body", "version"], "equal to"),
            ("PATCH", f"/tasks/{tid}", {"version": 1, "done": None}, ["body", "done"], "null"),
            ("PATCH", f"/tasks/{tid}", {"version": 1, "done": "maybe"}, ["body", "done"], "bool"),
            (
                "PATCH",
                f"/tasks/{tid}",
                {"version": 1, "assignee": "zed"},
                ["body", "assignee"],
                "zed",
            ),
            ("PATCH", "/tasks/abc", {"version": 1, "done": True}, ["path", "task_id"], "integer"),
            ("DELETE", f"/tasks/{tid}?version=x", None, ["query", "version"], "integer"),
        ]
        for method, path, body, loc, message in cases:
            r = await alice.request(method, path, json=body)
            assert r.status_code == 422, (method, path, body, r.text)
            errors = r.json()["detail"]
            assert any(e["loc"] == loc and message in e["msg"] for e in errors), (body, errors)
        # nothing above changed the task
        assert (await alice.get(f"/tasks/{tid}")).json()["version"] == 1


async def test_stale_version_is_409(board: Running) -> None:
    async with login(board.url, "alice") as alice, login(board.url, "bob") as bob:
        tid = (await alice.post("/tasks", json={"title": "race"})).json()["id"]
        assert (await alice.patch(f"/tasks/{tid}", json={"version": 1, "done": True})).is_success
        r = await bob.patch(f"/tasks/{tid}", json={"version": 1, "assignee": "bob"})
        assert r.status_code == 409
        detail = r.json()["detail"]
        assert detail["message"] == f"task {tid} changed since: it is at version 2"
        assert detail["current"]["version"] == 2 and detail["current"]["assignee"] is None
        r = await bob.delete(f"/tasks/{tid}", params={"version": 1})
        assert r.status_code == 409 and r.json()["detail"]["current"]["version"] == 2

        # several writers holding the same version at once: exactly one wins
        answers = await asyncio.gather(
            *(
                client.patch(f"/tasks/{tid}", json={"version": 2, "title": f"by {n}"})
                for n, client in enumerate([alice, bob, alice, bob, alice])
            )
        )
        assert sorted(r.status_code for r in answers) == [200, 409, 409, 409, 409]
        final = (await alice.get(f"/tasks/{tid}")).json()
        winner = next(r.json() for r in answers if r.status_code == 200)
        assert final == winner and final["version"] == 3
        assert (await bob.delete(f"/tasks/{tid}", params={"version": 3})).status_code == 204


# -- what is published -------------------------------------------------------------------------


async def test_each_committed_change_is_published_with_id_and_version(board: Running) -> None:
    async with login(board.url, "alice") as alice:
        client, pubs = await sdk_subscriber(board, token_of(alice), "tasks")
        try:
            created = (await alice.post("/tasks", json={"title": "a"})).json()
            tid = created["id"]
            first = await pubs.next()
            assert event(first) == ("task.created", tid, 1)
            assert first["task"] == created and first["by"] == "alice"
            assert isinstance(first["event"], int)
            # refused changes are never published: the next publication is the next commit
            await alice.patch(f"/tasks/{tid}", json={"version": 9, "done": True})
            await alice.post("/tasks", json={"title": ""})
            await alice.patch(f"/tasks/{tid}", json={"version": 1, "assignee": "zed"})
            await alice.patch(f"/tasks/{tid}", json={"version": 1, "done": True})
            updated = await pubs.next()
            assert event(updated) == ("task.updated", tid, 2) and updated["task"]["done"]
            assert updated["event"] > first["event"]
            await alice.delete(f"/tasks/{tid}")
            deleted = await pubs.next()
            assert event(deleted) == ("task.deleted", tid, 3) and deleted["task"] is None
        finally:
            await client.disconnect()


async def test_notification_reaches_only_the_assignee(board: Running) -> None:
    async with (
        login(board.url, "alice") as alice,
        login(board.url, "bob") as bob,
        login(board.url, "carol") as carol,
    ):
        # another user cannot subscribe to bob's channel (tidings' `#user` rule: error 103)
        raw = await Raw.open(board.ws)
        try:
            await raw.connect(token=token_of(carol))
            refused = await raw.call("subscribe", channel="notifications:#bob")
            assert refused["error"]["code"] == 103, refused
            # nor publish into it
            refused = await raw.call("publish", channel="notifications:#bob", data={"x": 1})
            assert refused["error"]["code"] == 103, refused
        finally:
            await raw.ws.close()

        bob_client, to_bob = await sdk_subscriber(board, token_of(bob), "notifications:#bob")
        carol_client, to_carol = await sdk_subscriber(
            board, token_of(carol), "notifications:#carol"
        )
        try:
            # assigning to yourself tells nobody; assigning to bob tells bob
            await alice.post("/tasks", json={"title": "mine", "assignee": "alice"})
            task = (await alice.post("/tasks", json={"title": "for bob", "assignee": "bob"})).json()
            note = await to_bob.next()
            assert (note["type"], note["by"], note["task"]) == ("task.assigned", "alice", task)
            # re-assigning to carol tells carol; her first notification is hers, not bob's
            r = await alice.patch(f"/tasks/{task['id']}", json={"version": 1, "assignee": "carol"})
            note = await to_carol.next()
            assert note["task"] == r.json() and note["task"]["assignee"] == "carol"
            # bob reassigning to carol again does not repeat it (no change of assignee)
            await bob.patch(f"/tasks/{task['id']}", json={"version": 2, "assignee": "carol"})
            await alice.post("/tasks", json={"title": "second", "assignee": "bob"})
            assert (await to_bob.next())["task"]["title"] == "second"
            assert to_carol.queue.empty() and to_bob.queue.empty()
        finally:
            await bob_client.disconnect()
            await carol_client.disconnect()


class FlakyBroker:
    """Makes the broker's publish fail ``times`` times (BrokerUnavailable), then work."""

    def __init__(self, srv: Running, times: int) -> None:
        self.broker = srv.tidings.hub.broker
        self.real = self.broker.publish
        self.left = times
        self.calls = 0
        self.broker.publish = self.publish

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.left > 0:
            self.left -= 1
            raise BrokerUnavailable("broker blinked (test)")
        return await self.real(*args, **kwargs)


async def test_a_failed_publish_is_retried_from_the_outbox(board: Running, app: Any) -> None:
    relay = app.state.board.relay
    async with login(board.url, "alice") as alice:
        client, pubs = await sdk_subscriber(board, token_of(alice), "tasks")
        try:
            flaky = FlakyBroker(board, times=3)
            r = await alice.post("/tasks", json={"title": "survives"})
            assert r.status_code == 201  # the commit does not wait for the broker
            got = await pubs.next()
            assert event(got) == ("task.created", r.json()["id"], 1)
            assert flaky.calls == 4 and relay.failures == 3
            await asyncio.wait_for(relay.settled(), WAIT)
            assert await relay.store.outbox() == []
            # the next change goes straight out, in order after the retried one
            await alice.patch(f"/tasks/{r.json()['id']}", json={"version": 1, "done": True})
            assert event(await pubs.next()) == ("task.updated", r.json()["id"], 2)
        finally:
            await client.disconnect()


# -- restart ------------------------------------------------------------------------------------


async def test_restart_keeps_tasks_and_publishes_what_was_pending(
    db_url: str, tmp_path: Path
) -> None:
    first = board_app(db_url, broker_url="memory://")
    async with served(first) as (port, _):
        url = f"http://127.0.0.1:{port}"
        async with login(url, "alice") as alice:
            a = (await alice.post("/tasks", json={"title": "one"})).json()
            await alice.patch(f"/tasks/{a['id']}", json={"version": 1, "done": True})
            b = (await alice.post("/tasks", json={"title": "two", "assignee": "bob"})).json()
            await asyncio.wait_for(first.state.board.relay.settled(), WAIT)
            # the broker goes away for good: the change commits, its publication waits
            tried = asyncio.Event()

            async def down(*args: Any, **kwargs: Any) -> Any:
                tried.set()
                raise BrokerUnavailable("down (test)")

            first.state.tidings.hub.broker.publish = down
            c = (await alice.post("/tasks", json={"title": "three"})).json()
            await asyncio.wait_for(tried.wait(), WAIT)
            before = (await alice.get("/tasks")).json()
            token = token_of(alice)
    store = Store(db_url)
    try:
        (pending,) = await store.outbox()
    finally:
        await store.close()
    assert pending.channel == "tasks" and pending.data["id"] == c["id"]
    assert pending.attempts >= 1 and "down (test)" in (pending.last_error or "")
    second = board_app(db_url, broker_url="memory://")
    async with served(second) as (port, _):
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url) as http:
            # same secret: the login survives the restart too
            r = await http.get("/tasks", headers={"Authorization": f"Bearer {token}"})
            assert r.json() == before
            assert [(t["title"], t["version"]) for t in r.json()] == [
                ("one", 2),
                ("two", 1),
                ("three", 1),
            ]
            assert [t["id"] for t in r.json()] == [a["id"], b["id"], c["id"]]
        relay = second.state.board.relay
        await asyncio.wait_for(relay.settled(), WAIT)
        history = await second.state.tidings.hub.history("tasks", limit=-1)
        published = [p.data for p in history.publications]
        assert len(published) == 1, published
        assert b'"three"' in published[0] and b'"task.created"' in published[0]
        assert await relay.store.outbox() == []


# -- the two commands ---------------------------------------------------------------------------


def _command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.taskboard", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


async def test_the_commands_add_users_and_serve(tmp_path: Path) -> None:
    install_sdk()
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    added = await asyncio.to_thread(
        _command, "add-user", "dave", "--password", "s3cret!", "--database-url", url
    )
    assert added.returncode == 0, added.stderr
    assert "added user 'dave'" in added.stdout
    again = await asyncio.to_thread(
        _command, "add-user", "dave", "--password", "x", "--database-url", url
    )
    assert again.returncode == 1 and "exists already" in again.stderr
    bad = await asyncio.to_thread(
        _command, "add-user", "da#ve", "--password", "x", "--database-url", url
    )
    assert bad.returncode == 2 and "bad user name" in bad.stderr

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "examples.taskboard",
        "serve",
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, "TASKBOARD_DATABASE_URL": url, "TASKBOARD_SECRET": SECRET},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            await _until_up(http, proc)
            page = await http.get("/")
            assert page.status_code == 200 and "<title>Task board" in page.text
            sdk = await http.get("/vendor/centrifuge.js")
            assert sdk.status_code == 200 and "Centrifuge" in sdk.text
            assert sdk.headers["content-type"].startswith("text/javascript")
            assert (await http.get("/vendor/other.js")).status_code == 404
            r = await http.post("/token", data={"username": "dave", "password": "s3cret!"})
            assert r.status_code == 200, r.text
            claims = jwt.decode(r.json()["access_token"], SECRET, algorithms=["HS256"])
            assert claims["sub"] == "dave"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), WAIT)


async def _until_up(http: httpx.AsyncClient, proc: asyncio.subprocess.Process) -> None:
    """Wait for the served app to answer /health (fail at once if the process died)."""
    async with asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                assert proc.stderr is not None
                raise AssertionError((await proc.stderr.read()).decode())
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


# -- several nodes -----------------------------------------------------------------------------


async def test_two_nodes_share_the_database_and_the_broker(serve: Serve, tmp_path: Path) -> None:
    """No sticky sessions: a browser may talk to any node. A change made through node A (REST)
    reaches a subscriber connected to node B, through Redis, once, though both nodes' relays
    watch the same outbox."""
    async with (
        database("postgres", tmp_path) as url,
        namespace(ENGINES["redis"]) as broker_url,
    ):
        await add_users(url, "alice", "bob")
        node_a = await serve(app=board_app(url, broker_url=broker_url))
        node_b = await serve(app=board_app(url, broker_url=broker_url))
        async with login(node_a.url, "alice") as alice, login(node_b.url, "bob") as bob:
            client, pubs = await sdk_subscriber(node_b, token_of(bob), "tasks")
            try:
                tid = (await alice.post("/tasks", json={"title": "via A"})).json()["id"]
                assert event(await pubs.next()) == ("task.created", tid, 1)
                r = await bob.patch(f"/tasks/{tid}", json={"version": 1, "done": True})
                assert r.status_code == 200
                await alice.patch(f"/tasks/{tid}", json={"version": 2, "title": "via A again"})
                assert event(await pubs.next()) == ("task.updated", tid, 2)
                assert event(await pubs.next()) == ("task.updated", tid, 3)
                # a login made on B works on A: one secret, no session state in a node
                r = await alice.get("/tasks", headers={"Authorization": f"Bearer {token_of(bob)}"})
                assert r.json()[0]["title"] == "via A again"
            finally:
                await client.disconnect()


async def test_nodes_starting_together_create_the_tables_once(tmp_path: Path) -> None:
    async with database("postgres", tmp_path) as url:
        stores = [Store(url) for _ in range(4)]
        try:
            await asyncio.gather(*(store.create() for store in stores))
            await stores[0].add_user("alice", "hash")
            assert await stores[3].users() == ["alice"]
        finally:
            for store in stores:
                await store.close()


async def test_a_stopped_relay_gives_its_claims_back(tmp_path: Path) -> None:
    """A relay stopped mid-publish (here: a publish that never returns) releases the rows it
    claimed, so the next relay publishes them at once instead of after the lease."""
    async with database("sqlite", tmp_path) as url:
        await add_users(url, "alice")
        store = Store(url)
        try:
            await store.create_task("alice", "stuck", "", None)
            called = asyncio.Event()

            async def hangs(channel: str, data: Any) -> None:
                called.set()
                await asyncio.Event().wait()

            relay = Relay(store, hangs, lease=3600)
            relay.start()
            await asyncio.wait_for(called.wait(), WAIT)
            await relay.stop(timeout=0.1)
            (row,) = await store.outbox()
            assert row.claimed_until is None and row.attempts == 0

            got: list[tuple[str, Any]] = []

            async def works(channel: str, data: Any) -> None:
                got.append((channel, data))

            relay = Relay(store, works, lease=3600)
            relay.start()
            await asyncio.wait_for(relay.settled(), WAIT)
            await relay.stop()
            assert [(channel, data["type"]) for channel, data in got] == [("tasks", "task.created")]
            assert await store.outbox() == []
        finally:
            await store.close()
