"""The dashboard's cache panel in Debian's headless Chromium (Playwright, launched as
`test_admin_browser` does) against a provider-only `sipp-gateway serve` with a verified
SQLite cache: the numbers move with traffic, and Purge asks for confirmation, empties the
cache (the next request misses) and shows in the audit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Dialog, Locator, expect

from .test_admin_browser import Watched, _log_in, browser, page
from .test_cache_gateway import cached_gateway, chat, sqlite_cache
from .test_cache_verify import Answers, hit, store, wait_for
from .test_server import Gateway

__all__ = ["browser", "page"]  # the browser fixtures of test_admin_browser


@pytest.fixture(scope="module")
def upstream() -> Iterator[Answers]:
    server = Answers()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(upstream: Answers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("cache-browser")
    cache = sqlite_cache(directory, "verify_fraction = 1\nttl_seconds = 600")
    with cached_gateway(directory, upstream, cache) as gw:
        yield gw


def test_cache_panel_numbers_and_purge(page: Watched, gateway: Gateway) -> None:
    p = page.page
    _log_in(page, gateway)
    row = p.locator('#cache tr[data-cache="remote"]')

    def cell(name: str) -> Locator:
        return row.locator(f'[data-field="{name}"]')

    expect(cell("entries")).to_have_text("0 / 10,000")
    expect(cell("ttl")).to_have_text("10 min")
    expect(cell("hit_ratio")).to_have_text("–")
    expect(cell("semantic")).to_have_text("off")

    store(gateway, "Why is the sky blue?")
    hit(gateway, "Why is the sky blue?")
    wait_for(gateway, "agree", 1)
    expect(cell("entries")).to_have_text("1 / 10,000", timeout=15_000)
    expect(cell("hits")).to_have_text("1", timeout=15_000)
    expect(cell("misses")).to_have_text("1")
    expect(cell("stores")).to_have_text("1")
    expect(cell("hit_ratio")).to_have_text("50.0 %")
    expect(cell("verified")).to_contain_text("exact 1 / 0 / 0 / 0", timeout=15_000)
    expect(cell("false_hit_rate")).to_contain_text("exact 0.0 %")
    expect(cell("bytes")).to_contain_text("B / 64.0 MiB")
    page.shot("20-cache-panel")

    # Purge asks first: dismissed, nothing happens.
    asked: list[str] = []

    def dismiss(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    p.once("dialog", dismiss)
    row.get_by_role("button", name="Purge").click()
    assert asked and "remote" in asked[0]
    with p.expect_response(lambda r: r.url.endswith("/admin/api/cache"), timeout=15_000):
        pass
    expect(cell("entries")).to_have_text("1 / 10,000")
    expect(p.locator('#audit tr[data-action="cache_purge"]')).to_have_count(0)

    # Accepted: the cache empties, the audit shows it, the next request misses.
    p.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Purge").click()
    expect(p.locator('#audit tr[data-action="cache_purge"]')).to_have_count(1, timeout=15_000)
    expect(p.locator('#audit tr[data-action="cache_purge"]')).to_contain_text("target=remote")
    expect(cell("entries")).to_have_text("0 / 10,000")
    assert chat(gateway, "Why is the sky blue?").headers["x-sipp-cache"] == "store"
    expect(cell("misses")).to_have_text("2", timeout=15_000)
    page.shot("21-cache-purged")
    page.assert_no_secret_shown()
