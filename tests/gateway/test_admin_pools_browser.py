"""The dashboard's pools, fallback rules and usage panels in Debian's headless Chromium
(Playwright, launched as `test_admin_browser` does) against a provider-only
`sipp-gateway serve`: a breaker the test opened shows, a fallback rule edited in the
page serves the next request, and the usage numbers move with traffic; with Redis, two
replicas' pages show the same rules and usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect

from ..remote.loopback import LoopbackServer
from .admin_gateways import admin_gateway, chat, login, open_breaker, ups
from .pool_upstreams import Deployment
from .redis_server import running_redis
from .test_admin_browser import Watched, _log_in, browser
from .test_server import Gateway
from .upstreams import text_reply

__all__ = ["browser", "ups"]  # fixtures shared with the other admin tests

USED = 6  # the loopback upstream's usage for one `chat`


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, ups: dict[str, Deployment]
) -> Iterator[Gateway]:
    upstream = LoopbackServer(text_reply)
    try:
        with admin_gateway(tmp_path_factory.mktemp("pools-browser"), upstream, ups) as gw:
            yield gw
    finally:
        upstream.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    watched = Watched(context.new_page())
    yield watched
    watched.closing = True
    context.close()
    assert watched.script_errors == []


def test_pools_fallback_rules_and_usage_in_the_page(
    page: Watched, gateway: Gateway, ups: dict[str, Deployment]
) -> None:
    p = page.page
    _log_in(page, gateway)

    # Usage first, on a fresh gateway: the day budgets move by exactly what was used.
    day = p.locator('#usage tr[data-usage="caller:team:tokens_per_day"] [data-field="used"]')
    target_day = p.locator('#usage tr[data-usage="target:remote:tokens_per_day"]')
    expect(day).to_have_text("0")
    expect(p.locator("#usage-backend")).to_have_text("this process's memory")
    for _ in range(3):
        assert chat(gateway, "remote").status_code == 200
    expect(day).to_have_text(str(3 * USED), timeout=15_000)
    expect(target_day.locator('[data-field="used"]')).to_have_text(str(3 * USED))
    expect(target_day.locator('[data-field="remaining"]')).to_have_text(f"{2_000_000 - 3 * USED:,}")
    rpm = p.locator('#usage tr[data-usage="caller:team:requests_per_minute"]')
    expect(rpm).to_contain_text("requests per minute")
    page.shot("10-usage")

    # A breaker the test opens shows in the pool panel, live.
    row_a = p.locator('#pools tr[data-pool="pool"][data-deployment="a"]')
    row_b = p.locator('#pools tr[data-pool="pool"][data-deployment="b"]')
    expect(row_a.locator('[data-field="breaker"]')).to_have_text("closed")
    client, _ = login(gateway)
    open_breaker(gateway, client, ups)
    expect(row_a.locator('[data-field="breaker"]')).to_have_text("open", timeout=15_000)
    expect(row_a).to_contain_text("unhealthy")
    expect(row_a.locator('[data-field="error_rate"]')).to_have_text("100.0 %")
    expect(row_b.locator('[data-field="breaker"]')).to_have_text("closed")
    expect(row_b).to_contain_text("healthy")
    page.shot("11-breaker-open")

    # Edit a fallback rule in the page: the next request is served by the new fallback.
    expect(p.locator("#controls-scope")).to_have_text("(this process only; reset on restart)")
    ups["primary"].mode = "500"
    assert chat(gateway, "primary").headers["x-sipp-target"] == "spare1"
    rule = p.locator('#fallbacks tr[data-fallbacks="primary"]')
    field = rule.locator('input[name="fallbacks"]')
    expect(field).to_have_value("spare1")
    field.fill("spare2")
    # a poll while the rule is being typed leaves it alone
    with p.expect_response(lambda r: r.url.endswith("/admin/api/pools"), timeout=15_000):
        pass
    expect(field).to_have_value("spare2")
    rule.get_by_role("button", name="Save").click()
    expect(p.locator('#audit tr[data-action="fallbacks"]')).to_have_count(1)
    expect(p.locator('#audit tr[data-action="fallbacks"]')).to_contain_text("target=primary")
    expect(rule).to_contain_text("edited")
    served = chat(gateway, "primary")
    assert served.status_code == 200 and served.headers["x-sipp-target"] == "spare2"
    page.shot("12-fallback-edited")

    # A rule that would loop is refused with the server's message and changes nothing.
    spare = p.locator('#fallbacks tr[data-fallbacks="spare2"]')
    spare.locator('input[name="fallbacks"]').fill("primary")
    spare.get_by_role("button", name="Save").click()
    expect(p.locator("#notice")).to_contain_text("fallbacks loop")
    expect(p.locator('#audit tr[data-action="fallbacks"]')).to_have_count(1)
    assert chat(gateway, "primary").headers["x-sipp-target"] == "spare2"

    # Reset: back to the TOML's rule.
    rule.get_by_role("button", name="Reset").click()
    expect(p.locator('#audit tr[data-action="fallbacks"]')).to_have_count(2)
    expect(field).to_have_value("spare1")
    expect(rule).not_to_contain_text("edited")
    assert chat(gateway, "primary").headers["x-sipp-target"] == "spare1"
    page.shot("13-fallback-reset")
    page.assert_no_secret_shown()


def test_with_redis_an_edit_on_one_replicas_page_shows_on_the_others(
    browser: Browser, tmp_path: Path, ups: dict[str, Deployment]
) -> None:
    upstream = LoopbackServer(text_reply)
    pages: list[Watched] = []
    try:
        with running_redis(tmp_path) as redis:
            env = {"TEST_REDIS_URL": redis.url}
            state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "pages"'
            with (
                admin_gateway(tmp_path, upstream, ups, state, env, name="a") as a,
                admin_gateway(tmp_path, upstream, ups, state, env, name="b") as b,
            ):
                for gw in (a, b):
                    context = browser.new_context(viewport={"width": 1400, "height": 1600})
                    pages.append(Watched(context.new_page()))
                    _log_in(pages[-1], gw)
                page_a, page_b = (w.page for w in pages)
                for p in (page_a, page_b):
                    expect(p.locator("#usage-backend")).to_have_text(
                        "shared by every replica through Redis"
                    )
                    expect(p.locator("#fallback-scope")).to_contain_text("every replica")
                    expect(p.locator("#controls-scope")).to_contain_text("through Redis")
                field_b = page_b.locator(
                    '#fallbacks tr[data-fallbacks="primary"] input[name="fallbacks"]'
                )
                expect(field_b).to_have_value("spare1")
                rule_a = page_a.locator('#fallbacks tr[data-fallbacks="primary"]')
                rule_a.locator('input[name="fallbacks"]').fill("spare2, spare1")
                rule_a.get_by_role("button", name="Save").click()
                expect(field_b).to_have_value("spare2, spare1", timeout=15_000)
                # requests through A show in B's usage: one budget in Redis
                day_b = page_b.locator(
                    '#usage tr[data-usage="caller:team:tokens_per_day"] [data-field="used"]'
                )
                expect(day_b).to_have_text("0")
                assert chat(a, "remote").status_code == 200
                expect(day_b).to_have_text(str(USED), timeout=15_000)
                pages[1].shot("14-redis-replica-b")
                for watched in pages:
                    watched.assert_no_secret_shown()
                _close(pages)  # while the gateways still answer the pages' last polls
    finally:
        _close(pages)
        upstream.close()
    for watched in pages:
        assert watched.script_errors == []


def _close(pages: list[Watched]) -> None:
    for watched in pages:
        if not watched.closing:
            watched.closing = True
            watched.page.context.close()
