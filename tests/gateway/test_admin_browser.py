"""The Admin Dashboard in a real browser: Debian's headless Chromium driven by Playwright.

`./dev test` installs the `chromium` and `chromium-driver` packages; Playwright's
own browser download is never used. Screenshots go to `test-artifacts/admin/`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Route,
    expect,
    sync_playwright,
)
from playwright.sync_api import (
    Error as PlaywrightError,
)

from .test_admin_api import PASSWORD, SECRETS, with_admin
from .test_server import LIMITED, TOKEN, Gateway, running_gateway

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "admin"


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(smollm_path, tmp_path_factory.mktemp("browser"), with_admin) as gw:
        yield gw


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian chromium is missing: run ./dev test (it installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


class Watched:
    """A page plus everything it received and every script error it raised."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.bodies: list[str] = []
        self.script_errors: list[str] = []
        self.closing = False
        # Every request of the page goes through here, so every body it got is kept.
        page.route(re.compile(r"/admin"), self.answer)
        page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        page.on("console", self._console)

    def answer(self, route: Route) -> None:
        """Let a request through to the server and keep the body it got."""
        try:
            response = route.fetch(max_redirects=0)
            body = response.text()
        except PlaywrightError:
            if self.closing:  # a poll still in flight when the test closed its context
                return
            raise
        self.bodies.append(body)
        route.fulfill(response=response)

    def _console(self, message: ConsoleMessage) -> None:
        # Refused API calls (the session probe's 401, a refused control) are logged by
        # Chromium as failed loads; anything else at error level is a page bug.
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.script_errors.append(message.text)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def assert_no_secret_shown(self) -> None:
        """Neither the rendered page nor anything the page fetched holds a secret."""
        seen = [self.page.content(), self.page.inner_text("body")]
        seen += self.bodies
        assert len(seen) > 5
        for text in seen:
            for secret in SECRETS:
                assert secret not in text


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    watched = Watched(context.new_page())
    yield watched
    watched.closing = True
    context.close()
    assert watched.script_errors == []


def _public(gw: Gateway, target: str = "local", stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{gw.public}/v1/query",
        json={"model": target, "prompt": "Hello", "max_tokens": 4, "stream": stream},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )


def _log_in(page: Watched, gw: Gateway) -> None:
    page.page.goto(f"{gw.management}/admin")
    expect(page.page.locator("#login-view")).to_be_visible()
    page.page.fill("#password", PASSWORD)
    page.page.click("#login-form button[type=submit]")
    expect(page.page.locator("#dashboard")).to_be_visible()


def test_login_live_counters_block_ip_and_logout(page: Watched, gateway: Gateway) -> None:
    p = page.page
    p.goto(f"{gateway.management}/admin")
    expect(p.locator("#login-view")).to_be_visible()
    expect(p.locator("#dashboard")).to_be_hidden()
    p.fill("#password", "not-the-password")
    p.click("#login-form button[type=submit]")
    expect(p.locator("#login-error")).to_have_text("wrong password")
    page.shot("01-login-refused")

    _log_in(page, gateway)
    local = p.locator('#targets tr[data-target="local"]')
    expect(local).to_contain_text("cpu")
    expect(local).to_contain_text("loaded")
    expect(local).to_contain_text("healthy")
    expect(p.locator('#targets tr[data-target="mock-openai"]')).to_contain_text("openai")
    expect(p.locator('#callers tr[data-caller="local-only"]')).to_contain_text("local")
    expect(p.locator("#routes")).to_contain_text("/v1/chat/completions")
    requests_tile = p.locator('[data-live="requests"]')
    expect(requests_tile).not_to_have_text("–")
    before = int(requests_tile.inner_text().replace(",", ""))

    # Traffic while the page is open: the counters and charts move without a reload.
    def traffic() -> None:
        for i in range(6):
            assert _public(gateway, stream=i % 2 == 1).status_code == 200
        assert _public(gateway, target="no-such-target").status_code == 404

    sender = threading.Thread(target=traffic)
    sender.start()
    sender.join()
    expect(requests_tile).to_have_text(str(before + 7), timeout=15_000)
    expect(p.locator('#errors tr[data-code="not_found"]')).to_be_visible()
    expect(p.locator("#recent tbody tr").first).to_contain_text("not_found")  # newest first
    expect(p.locator('[data-live="ttft_p50_ms"]')).to_have_text(re.compile(r"\d"))
    expect(local.locator("td").nth(5)).not_to_have_text("0")
    assert p.locator('#chart-requests polyline[data-series="requests"]').count() >= 1
    expect(
        p.locator('#chart-latency polyline[data-series="latency_p50_ms"]').first
    ).to_be_attached()
    page.shot("02-live-dashboard")

    # Block this machine's address from the page: the public listener refuses it.
    p.fill("#block-ip", "127.0.0.1")
    p.click("#block-form button[type=submit]")
    expect(p.locator('#blocked li[data-ip="127.0.0.1"]')).to_be_visible()
    refused = _public(gateway)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "authorization"
    expect(p.locator('#audit tr[data-action="block"]')).to_be_visible()
    page.shot("03-ip-blocked")
    p.locator('#blocked li[data-ip="127.0.0.1"] button').click()
    expect(p.locator('#blocked li[data-ip="127.0.0.1"]')).to_have_count(0)
    assert _public(gateway).status_code == 200

    # Disable a target from its row: 503 with the envelope, then enable it again.
    local.get_by_role("button", name="Disable").click()
    expect(local).to_contain_text("disabled")
    disabled = _public(gateway)
    assert disabled.status_code == 503 and disabled.json()["error"]["code"] == "unavailable"
    local.get_by_role("button", name="Enable").click()
    expect(local).to_contain_text("healthy")
    assert _public(gateway).status_code == 200

    page.assert_no_secret_shown()
    (cookie,) = [c for c in p.context.cookies() if c["name"] == "sipp_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    p.click("#logout")
    expect(p.locator("#login-view")).to_be_visible()
    expect(p.locator("#login-error")).to_have_text("Logged out.")
    page.shot("04-logged-out")
    # The ended session's cookie no longer opens the API.
    old = httpx.get(
        f"{gateway.management}/admin/api/overview",
        cookies={"sipp_admin": cookie["value"]},
        timeout=60,
    )
    assert old.status_code == 401


def test_runtime_limits_from_the_page(page: Watched, gateway: Gateway) -> None:
    p = page.page
    _log_in(page, gateway)
    # The form shows the configured limit; a poll never overwrites a form being edited.
    expect(p.locator("#rate-rpm")).to_have_value("60")
    p.check("#rate-enabled")
    p.fill("#rate-rpm", "1")
    p.fill("#rate-burst", "1")
    with p.expect_response(lambda r: r.url.endswith("/admin/api/overview"), timeout=15_000):
        pass
    expect(p.locator("#rate-rpm")).to_have_value("1")
    # Rate limit: 1 request per minute, burst 1 -> the second call in a row gets 429.
    p.click("#rate-form button[type=submit]")
    expect(p.locator('#audit tr[data-action="rate_limit"]')).to_be_visible()
    assert [_public(gateway).status_code for _ in range(2)] == [200, 429]
    expect(p.locator('[data-live="rate_limited"]')).not_to_have_text("0", timeout=10_000)
    p.uncheck("#rate-enabled")
    p.click("#rate-form button[type=submit]")
    expect(p.locator('#audit tr[data-action="rate_limit"]')).to_have_count(2)
    assert _public(gateway).status_code == 200

    # max_concurrent_requests = 1: while one stream holds the only permit, the next
    # request is refused at admission, and the page counts it.
    p.fill("#max-concurrent", "1")
    p.click("#concurrency-form button[type=submit]")
    expect(p.locator('#audit tr[data-action="max_concurrent_requests"]')).to_be_visible()
    # A counting prompt at temperature 0 runs all 400 tokens (seconds), holding the permit.
    body = {"model": "local", "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0}
    body["stream"] = True
    auth = {"authorization": f"Bearer {LIMITED}"}
    with httpx.stream(
        "POST", f"{gateway.public}/v1/query", json=body, headers=auth, timeout=60
    ) as held:
        lines = held.iter_lines()  # keep it: a dropped iterator closes the connection
        assert next(lines).startswith("event: token")
        assert _public(gateway).status_code == 429
    expect(p.locator('[data-live="admission_rejected"]')).not_to_have_text("0", timeout=10_000)
    p.fill("#max-concurrent", "")
    p.click("#concurrency-form button[type=submit]")
    expect(p.locator('#audit tr[data-action="max_concurrent_requests"]')).to_have_count(2)
    assert _public(gateway).status_code == 200

    # A bad value is refused with the server's message and changes nothing.
    p.fill("#block-ip", "not-an-ip")
    p.click("#block-form button[type=submit]")
    expect(p.locator("#notice")).to_contain_text("'ip' must be an IP address")
    expect(p.locator("#blocked li")).to_have_count(0)
    page.shot("05-controls")
    page.assert_no_secret_shown()


def test_page_returns_to_login_when_the_session_ends(page: Watched, gateway: Gateway) -> None:
    p = page.page
    _log_in(page, gateway)
    # End the session from outside the page (as expiry would): the next poll notices.
    p.context.clear_cookies()
    expect(p.locator("#login-view")).to_be_visible(timeout=15_000)
    expect(p.locator("#login-error")).to_contain_text("session ended")


def test_a_poll_answered_after_logout_leaves_the_logout_message(
    page: Watched, gateway: Gateway
) -> None:
    p = page.page
    _log_in(page, gateway)
    # Hold the next metrics poll in flight, log out, then let it through: the server
    # answers 401 (the session is gone), which must not read as an expired session.
    held: list[Route] = []

    def hold(route: Route) -> None:
        held.append(route)

    p.route(re.compile(r"/admin/api/metrics"), hold)
    for _ in range(300):
        if held:
            break
        p.wait_for_timeout(50)
    assert held, "the page made no metrics poll in 15 s"
    p.click("#logout")
    expect(p.locator("#login-error")).to_have_text("Logged out.")
    with p.expect_request_finished(lambda request: "/api/metrics" in request.url):
        for route in held:
            page.answer(route)
    # Two turns of the page's task queue: the late answer's handlers have run.
    p.evaluate("() => new Promise((done) => setTimeout(() => setTimeout(done, 0), 0))")
    expect(p.locator("#login-error")).to_have_text("Logged out.")
    expect(p.locator("#login-view")).to_be_visible()
