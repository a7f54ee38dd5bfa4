"""The demo page in a real headless Chromium: subscribe, publish, see messages arrive."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import IN_CI, Serve

CHROMIUM = os.environ.get("TIDINGS_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    if not shutil.which(CHROMIUM):
        if IN_CI:
            pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
        pytest.skip("Chromium not installed")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def test_demo_page_subscribes_and_publishes(serve: Serve, page: Any) -> None:
    srv = await serve()
    await page.goto(srv.url + "/")
    await page.fill("input[name=channel]", "lobby")
    await page.click("#sub button[type=submit]")
    await page.wait_for_selector("#status.ok")
    assert await page.text_content("#status") == "subscribed to lobby"

    await page.fill("input[name=message]", "hello from the page")
    await page.click("#pub button[type=submit]")
    await page.wait_for_selector("#log li >> text=hello from the page")
    assert await page.text_content("#pubinfo") == "offset 1"

    await srv.hub.publish("lobby", {"from": "server"})
    await page.wait_for_selector('#log li >> text={"from":"server"}')

    await page.fill("input[name=channel]", "nope:x")
    await page.click("#sub button[type=submit]")
    await page.wait_for_selector("#status.bad")
    assert "unknown channel namespace" in (await page.text_content("#status") or "")
    if os.environ.get("TIDINGS_SCREENSHOT"):
        await page.screenshot(path=os.environ["TIDINGS_SCREENSHOT"])
