"""The admin login and its tokens over real HTTP (both of `tidings serve`'s paths): off unless
configured, refused in dev mode off loopback, wrong password 401, rate-limited, tokens accepted
by the server API and nothing else."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import jwt
import pytest
from fastapi import FastAPI

from tidings import Settings, Tidings, create_app
from tidings.admin import AUDIENCE, WINDOW, AdminAuth, LoginLimiter

from .conftest import Serve
from .test_top import env

PASSWORD = "correct horse battery staple, twice over"
KEY = "admin-test-api-key"


def admin_settings(**more: object) -> Settings:
    return Settings(api_key=KEY, admin_password=PASSWORD, **more)  # type: ignore[arg-type]


async def login(http: httpx.AsyncClient, password: str = PASSWORD) -> httpx.Response:
    return await http.post("/admin/login", json={"password": password})


async def test_admin_is_off_unless_a_password_is_set(serve: Serve) -> None:
    srv = await serve(api_key=KEY)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/admin")).status_code == 404
        assert (await login(http)).status_code in (404, 405)
        # a Bearer header is no way in when the admin page is off
        r = await http.post("/api/info", headers={"Authorization": "Bearer x"})
        assert r.status_code == 401


@pytest.mark.parametrize("fast", [False, True], ids=["asgi", "fast"])
async def test_login_gives_a_token_the_server_api_accepts(serve: Serve, fast: bool) -> None:
    srv = await serve(admin_settings(), fast=fast)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        page = await http.get("/admin")
        assert page.status_code == 200 and "tidings admin" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        for asset, kind in (("admin.js", "text/javascript"), ("admin.css", "text/css")):
            r = await http.get(f"/admin/{asset}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert (await http.get("/admin/secrets.txt")).status_code == 404

        assert (await http.post("/api/info", json={})).status_code == 401
        r = await login(http)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["expires_in"] == 900 and r.headers["cache-control"] == "no-store"
        bearer = {"Authorization": f"Bearer {answer['token']}"}
        r = await http.post("/api/info", json={}, headers=bearer)
        assert r.status_code == 200 and r.json()["result"]["nodes"][0]["uid"] == srv.hub.node_id
        r = await http.post("/api/publish", json={"channel": "c", "data": 1}, headers=bearer)
        assert r.json() == {"result": {"offset": 1, "epoch": r.json()["result"]["epoch"]}}
        # the API key still works, and a tampered token does not
        assert (await http.post("/api/info", headers={"X-API-Key": KEY})).status_code == 200
        tampered = {"Authorization": f"Bearer {answer['token']}x"}
        assert (await http.post("/api/info", headers=tampered)).status_code == 401


async def test_wrong_password_is_401_and_bad_bodies_400(serve: Serve) -> None:
    srv = await serve(admin_settings())
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await login(http, "wrong")
        assert r.status_code == 401
        assert r.json() == {"error": {"code": 101, "message": "wrong password"}}
        for body in (b"not json", b"[]", b'{"password": 1}', b"{}"):
            r = await http.post("/admin/login", content=body)
            assert r.status_code == 400, body
        r = await http.post("/admin/login", content=b"x" * 10_000)
        assert r.status_code == 413


async def test_failed_logins_are_rate_limited_per_address(serve: Serve) -> None:
    srv = await serve(admin_settings(admin_login_attempts=3))
    async with httpx.AsyncClient(base_url=srv.url) as http:
        for _ in range(3):
            assert (await login(http, "guess")).status_code == 401
        for password in ("guess", PASSWORD):  # even the right one, until the window passes
            r = await login(http, password)
            assert r.status_code == 429, r.text
            assert 1 <= int(r.headers["retry-after"]) <= WINDOW + 1
            assert r.json()["error"]["code"] == 111


def test_login_limiter_window_and_addresses() -> None:
    limiter = LoginLimiter(attempts=2)
    limiter.failed("a", 100.0)
    limiter.failed("a", 110.0)
    assert limiter.retry_after("a", 111.0) == int(WINDOW - 11) + 1
    assert limiter.retry_after("b", 111.0) == 0  # another address is not held back
    assert limiter.retry_after("a", 100.0 + WINDOW) == 0  # the first failure aged out


def test_expired_and_foreign_tokens_are_refused() -> None:
    auth = AdminAuth(admin_settings(admin_secret="shared"))
    other = AdminAuth(admin_settings(admin_secret="shared"))
    assert other.verify(auth.issue())  # the same admin_secret on another node: accepted
    assert not AdminAuth(admin_settings()).verify(auth.issue())  # a random key per process
    now = int(time.time())
    key = auth._key
    expired = jwt.encode({"sub": "admin", "aud": AUDIENCE, "exp": now - 1}, key, "HS256")
    assert not auth.verify(expired)
    no_aud = jwt.encode({"sub": "admin", "exp": now + 60}, key, "HS256")
    assert not auth.verify(no_aud)
    # a client connection token signed with the admin password is not an admin token
    assert not auth.verify(jwt.encode({"sub": "admin", "exp": now + 60}, PASSWORD, "HS256"))
    assert not auth.allows({"authorization": "apikey " + auth.issue()})
    assert auth.allows({"authorization": "Bearer " + auth.issue()})


def test_admin_is_refused_in_dev_mode_off_loopback() -> None:
    with pytest.raises(ValueError, match="dev mode"):
        Tidings(host="0.0.0.0", insecure=True, admin_password=PASSWORD)
    with pytest.raises(ValueError, match="not empty"):
        Tidings(admin_password="")
    # on loopback in dev mode, or anywhere with a secret, it is allowed
    assert Tidings(admin_password=PASSWORD).admin is not None
    assert Tidings(host="0.0.0.0", api_key=KEY, admin_password=PASSWORD).admin is not None


def test_serve_refuses_admin_in_dev_mode_off_loopback_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tidings.cli", "serve", "--host", "0.0.0.0", "--insecure"],
        env=env(TIDINGS_ADMIN_PASSWORD=PASSWORD),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "admin page" in done.stderr and "dev mode" in done.stderr
    assert "Traceback" not in done.stderr


async def test_admin_under_a_prefix(serve: Serve) -> None:
    app = FastAPI()
    Tidings(admin_settings()).install(app, prefix="/rt")
    srv = await serve(app=app)
    async with httpx.AsyncClient(base_url=srv.url + "/rt") as http:
        assert (await http.get("/admin")).status_code == 200
        assert (await http.get("/admin/admin.js")).status_code == 200
        token = (await login(http)).json()["token"]
        r = await http.post("/api/info", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200


async def test_dev_mode_admin_answers_only_loopback_clients() -> None:
    """Whatever the host setting says (a mounted app binds where its server does)."""
    for settings, remote_status in (
        (Settings(admin_password=PASSWORD), 403),
        (admin_settings(), 200),
    ):
        app = create_app(settings)
        for client, status in ((("10.1.2.3", 5000), remote_status), (("127.0.0.1", 5000), 200)):
            transport = httpx.ASGITransport(app=app, client=client)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/admin")).status_code == status
                assert (await login(http)).status_code == status
