"""The demo page in a real headless Chromium, at desktop and phone widths: subscribe, publish,
see messages arrive; errors shown and cleared; nothing wider than the screen; served under a
prefix. Screenshots go to ``artifacts/`` at the repository root (CI keeps them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from tidings import Tidings

from .conftest import Serve

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}




class Watched:
    """A page whose failed requests and console errors are collected."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("response", self._response)
        page.on("requestfailed", lambda r: self.problems.append(f"failed {r.url}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status} {response.url}")


async def open_page(browser: Any, size: str, url: str) -> Watched:
    page = await browser.new_page(viewport=SIZES[size])
    watched = Watched(page)
    await page.goto(url)
    return watched


async def subscribe(page: Any, channel: str) -> None:
    await page.fill("input[name=channel]", channel)
    await page.click("#sub button[type=submit]")


async def publish(page: Any, message: str) -> None:
    await page.fill("input[name=message]", message)
    await page.click("#pub button[type=submit]")


async def fits(page: Any) -> None:
    """Nothing is wider than the screen, and Publish is on it."""
    width = await page.evaluate("window.innerWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    box = await page.locator("#pub button[type=submit]").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width


async def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.parametrize("size", list(SIZES))
async def test_demo_page(serve: Serve, browser: Any, size: str) -> None:
    srv = await serve()
    watched = await open_page(browser, size, srv.url + "/")
    page = watched.page
    # before any message: a line saying what to do, no empty box
    assert await page.locator("#empty").is_visible()
    assert not await page.locator("#log").is_visible()
    hints = await page.text_content("#hints") or ""
    assert f"tidings publish news \"hello\" --url {srv.url}" in hints
    assert f"curl -X POST {srv.url}/api/publish" in hints

    await subscribe(page, "lobby")
    await page.wait_for_selector("#status.ok")
    assert await page.text_content("#status") == "subscribed to lobby"
    assert f"tidings subscribe lobby --url {srv.url}" in (await page.text_content("#hints") or "")

    await publish(page, "hello from the page")
    await page.wait_for_selector("#log li >> text=hello from the page")
    info = page.locator("#pubinfo")
    assert await info.text_content() == "published to lobby: offset 1 in its history"
    assert "position in the channel's history" in (await info.get_attribute("title") or "")
    assert not await page.locator("#empty").is_visible()

    await srv.hub.publish("lobby", {"from": "server"})
    await page.wait_for_selector('#log li >> text={"from":"server"}')

    long = "x" * 2000  # one unbroken word: it wraps, the page does not widen
    await publish(page, long)
    await page.wait_for_selector(f"#log li >> text={long[:50]}")
    await fits(page)
    await shot(page, f"demo-{size}")

    # a failed publish is shown, and the error goes with the channel it was about
    await subscribe(page, "nope:x")
    await page.wait_for_selector("#status.bad")
    assert "unknown channel namespace" in (await page.text_content("#status") or "")
    await publish(page, "into the void")
    await page.wait_for_selector("#pubinfo.bad")
    assert "publish failed: unknown channel namespace" in (await info.text_content() or "")
    await fits(page)
    await shot(page, f"demo-{size}-errors")
    await subscribe(page, "lobby2")
    await page.wait_for_selector("#status.ok")
    assert await info.text_content() == ""
    assert not await info.is_visible()

    # the server goes away: publishing says so
    srv.server.should_exit = True
    await page.wait_for_selector("#status.bad")  # the subscription noticed
    await publish(page, "anyone there?")
    await page.wait_for_selector("#pubinfo.bad")
    assert await info.text_content() == "publish failed: the server cannot be reached"
    assert "retrying" in (await page.text_content("#status") or "")
    await shot(page, f"demo-{size}-server-down")

    before_down = [p for p in watched.problems if "nope" not in p and "void" not in p]
    # the only failures: the refused channel's socket, and what the stopped server caused
    assert not [p for p in before_down if "favicon" in p or "HTTP 4" in p], watched.problems


def user_app(tidings: Tidings) -> FastAPI:
    app = FastAPI()
    tidings.install(app, prefix="/rt")

    @app.get("/", response_class=PlainTextResponse)
    async def home() -> str:
        return "the user's own home page"

    return app


async def _round_trip(page: Any, channel: str) -> None:
    await subscribe(page, channel)
    await page.wait_for_selector("#status.ok")
    await publish(page, f"hi {channel}")
    await page.wait_for_selector(f"#log li >> text=hi {channel}")


async def test_demo_page_under_a_prefix(serve: Serve, browser: Any) -> None:
    tidings = Tidings(demo=True)
    srv = await serve(app=user_app(tidings))
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/")).text == "the user's own home page"
    watched = await open_page(browser, "desktop", srv.url + "/rt/")
    page = watched.page
    await _round_trip(page, "prefixed")
    hints = await page.text_content("#hints") or ""
    assert f"--url {srv.url}/rt" in hints and f"{srv.url}/rt/api/publish" in hints
    assert watched.problems == []
    await shot(page, "demo-prefix")


async def test_demo_router_anywhere_finds_the_api(serve: Serve, browser: Any) -> None:
    tidings = Tidings()
    app = user_app(tidings)
    app.include_router(tidings.demo_router, prefix="/tools/demo")
    srv = await serve(app=app)
    watched = await open_page(browser, "phone", srv.url + "/tools/demo/")
    await _round_trip(watched.page, "elsewhere")
    assert watched.problems == []


async def test_mounting_never_takes_the_apps_root(serve: Serve) -> None:
    tidings = Tidings()  # no demo=True
    app = FastAPI()
    tidings.install(app)  # at the root, before the app's own "/"

    @app.get("/", response_class=PlainTextResponse)
    async def home() -> str:
        return "mine"

    srv = await serve(app=app)
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/")).text == "mine"
        assert (await http.get("/health")).status_code == 200
    bare = FastAPI()
    Tidings().install(bare)
    srv2 = await serve(app=bare)
    async with httpx.AsyncClient(base_url=srv2.url) as http:
        assert (await http.get("/")).status_code == 404
