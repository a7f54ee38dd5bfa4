"""The admin page in a real headless Chromium: log in, see nodes and channels, a channel's
presence and history, publish, call any server API method, disconnect a user; at desktop and
phone widths. Screenshots go to ``artifacts/`` at the repository root (gitignored; CI keeps
them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tidings import ChannelOptions, Settings

from .cfutil import SECRET, Raw, token
from .conftest import Serve

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
SIZES = {"desktop": {"width": 1280, "height": 900}, "phone": {"width": 390, "height": 844}}
PASSWORD = "admin page test password, long enough"




def settings() -> Settings:
    return Settings(
        api_key="admin-page-api-key",
        token_hmac_secret=SECRET,  # type: ignore[arg-type]
        admin_password=PASSWORD,  # type: ignore[arg-type]
        namespaces={"chat": ChannelOptions(presence=True, history_size=50)},
    )


class Watched:
    """A page whose console errors and failed requests are collected."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("response", self._response)
        page.on("requestfailed", lambda r: self.problems.append(f"failed {r.url}"))

    def _console(self, message: Any) -> None:
        # Chromium reports every 4xx response as a console error too: counted below
        if message.type == "error" and "status of" not in message.text:
            self.problems.append(f"console: {message.text}")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status} {response.url}")


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def fits(page: Any) -> None:
    """Nothing is wider than the screen (no sideways scrolling of the page)."""
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= await page.evaluate("innerWidth")


async def log_in(page: Any, password: str) -> None:
    await page.fill("#login [name=password]", password)
    await page.click("#login button[type=submit]")


async def test_admin_page_operates_a_server(serve: Serve, browser: Any) -> None:
    srv = await serve(settings())
    alice = await Raw.open(srv.ws)
    try:
        await alice.connect(token=token("alice", info={"name": "Alice"}))
        await alice.subscribe("chat:room")

        watched = Watched(await browser.new_page(viewport=SIZES["desktop"]))
        page = watched.page
        await page.goto(srv.url + "/admin")
        assert await page.is_visible("#login") and not await page.is_visible("#admin-view")

        await log_in(page, "not the password")
        await page.wait_for_selector("#login-error:text('wrong password')")
        assert watched.problems == [f"HTTP 401 {srv.url}/admin/login"]
        watched.problems.clear()

        await log_in(page, PASSWORD)
        node = f"#nodes tr[data-uid='{srv.hub.node_id}']"
        await page.wait_for_selector(node)
        cells = await page.locator(f"{node} td").all_text_contents()
        assert cells[3:7] == ["1", "1", "1", "1"]  # clients, users, channels, subscriptions
        assert await page.text_content("#summary") == "1 node, 1 client"

        room = "#channels tr[data-channel='chat:room']"
        await page.wait_for_selector(room)
        assert (await page.locator(f"{room} td").all_text_contents())[1:] == ["1", "0"]
        await screenshot(page, "admin-desktop-overview")

        # a channel: presence and (empty) history
        await page.click(f"{room} button")
        await page.wait_for_selector("#presence li")
        presence = await page.locator("#presence li").all_text_contents()
        assert len(presence) == 1 and presence[0].startswith("alice · ")
        assert presence[0].endswith('{"name":"Alice"}')
        await page.wait_for_selector("#history-error:text('no publication kept')")

        # publish from the console: Alice gets it, the history shows it
        assert await page.input_value("#publish [name=channel]") == "chat:room"
        await page.fill("#publish [name=data]", '{"text": "from the admin"}')
        await page.click("#publish button[type=submit]")
        await page.wait_for_selector("#publish-result.ok:text('offset 1')")
        (pub,) = await alice.publications("chat:room", 1)
        assert pub["data"] == {"text": "from the admin"}
        await page.wait_for_selector('#history li:text(\'{"text":"from the admin"}\')')

        # text that is not JSON is refused unless sent "as text"
        await page.fill("#publish [name=data]", "plain words")
        await page.click("#publish button[type=submit]")
        await page.wait_for_selector("#publish-result.bad:text('not JSON')")
        await page.check("#publish [name=text]")
        await page.click("#publish button[type=submit]")
        await page.wait_for_selector("#publish-result.ok:text('offset 2')")
        assert (await alice.publications("chat:room", 2))[1]["data"] == "plain words"

        # any server API method
        await page.select_option("#call [name=method]", "presence_stats")
        await page.fill("#call [name=params]", '{"channel": "chat:room"}')
        await page.click("#call button[type=submit]")
        await page.wait_for_selector("#call-result:text('\"num_users\": 1')")
        await page.select_option("#call [name=method]", "history")
        await page.fill("#call [name=params]", '{"channel": "nope:x"}')
        await page.click("#call button[type=submit]")
        await page.wait_for_selector("#call-result:text('code 102')")
        await screenshot(page, "admin-desktop-channel")

        # disconnect the user: the connection is closed with 3503 and the channel goes away
        await page.fill("#disconnect [name=user]", "alice")
        await page.click("#disconnect button[type=submit]")
        await page.wait_for_selector("#disconnect-result.ok:text('disconnected user alice')")
        code, _ = await alice.closed()
        assert code == 3503
        await page.wait_for_selector("#channels-empty", state="visible")
        assert watched.problems == []

        # a token the server no longer accepts sends the page back to the login form
        await page.evaluate("sessionStorage.setItem('tidings-admin-token', 'bogus')")
        await page.reload()
        await page.wait_for_selector("#login-error:text('session expired')")
        assert not await page.is_visible("#admin-view")
    finally:
        await alice.close()


async def test_admin_page_on_a_phone(serve: Serve, browser: Any) -> None:
    srv = await serve(settings())
    watched = Watched(await browser.new_page(viewport=SIZES["phone"]))
    page = watched.page
    await page.goto(srv.url + "/admin")
    await fits(page)
    await screenshot(page, "admin-phone-login")
    await log_in(page, PASSWORD)
    await page.wait_for_selector(f"#nodes tr[data-uid='{srv.hub.node_id}']")
    await fits(page)  # wide tables scroll inside their section, not the page
    await screenshot(page, "admin-phone")
    await page.click("#logout")
    await page.wait_for_selector("#login", state="visible")
    assert await page.evaluate("sessionStorage.getItem('tidings-admin-token')") is None
    assert watched.problems == []
