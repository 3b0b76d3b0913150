"""The dashboard's audit panel in Debian's headless Chromium (launched as
`test_admin_browser` does) against provider-only `sipp-gateway serve` processes: it says
whose entries it lists (this process, every replica through Redis, or this replica only
while Redis is unreachable), and an edit made on replica A shows on B's page naming A."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, expect

from ..remote.loopback import LoopbackServer
from .admin_gateways import admin_gateway, login, ups, upstream
from .pool_upstreams import Deployment
from .redis_server import running_redis
from .test_admin_browser import Watched, _log_in, browser

__all__ = ["browser", "ups", "upstream"]  # fixtures shared with the other admin tests

STATE = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "audit-page"'


def _page(browser: Browser) -> Watched:
    return Watched(browser.new_context(viewport={"width": 1400, "height": 1600}).new_page())


def _close(watched: Watched) -> None:
    """Close the page while its gateway still answers (its polls end with it)."""
    watched.closing = True
    watched.page.context.close()
    assert watched.script_errors == []


def test_the_audit_panel_says_this_process_in_memory(
    browser: Browser, tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with admin_gateway(tmp_path, upstream, ups) as gw:
        watched = _page(browser)
        try:
            _log_in(watched, gw)
            expect(watched.page.locator("#audit-scope")).to_have_text("this process's memory")
            expect(watched.page.locator('#audit tr[data-action="login"]')).to_have_count(1)
        finally:
            _close(watched)


def test_with_redis_the_panel_lists_every_replica_then_says_when_it_is_partial(
    browser: Browser, tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with running_redis(tmp_path) as redis:
        env = {"TEST_REDIS_URL": redis.url}
        named = {**env, "SIPP_GATEWAY_REPLICA_ID": "replica-a"}
        with (
            admin_gateway(tmp_path, upstream, ups, STATE, named, name="a") as a,
            admin_gateway(tmp_path, upstream, ups, STATE, env, name="b") as b,
        ):
            watched = _page(browser)
            try:
                _log_in(watched, b)
                page = watched.page
                scope = page.locator("#audit-scope")
                expect(scope).to_have_text("every replica's, through Redis")
                client_a, csrf_a = login(a)
                r = client_a.post(
                    "/admin/api/controls/block", json={"ip": "203.0.113.44"}, headers=csrf_a
                )
                assert r.status_code == 200, r.text
                row = page.locator('#audit tr[data-action="block"]')
                expect(row).to_contain_text("replica=replica-a", timeout=15_000)
                expect(row).to_contain_text("ip=203.0.113.44")
                # the newest entry is the first row, whichever replica made it
                expect(page.locator("#audit tbody tr").first).to_have_attribute(
                    "data-action", "block"
                )
                redis.stop()
                expect(scope).to_have_text(
                    "this replica's entries only: Redis is unreachable", timeout=20_000
                )
                expect(scope).to_have_class("error")
                # B's own login is still listed; A's entry lives in Redis and A
                expect(page.locator('#audit tr[data-action="login"]')).to_have_count(1)
                expect(page.locator('#audit tr[data-action="block"]')).to_have_count(0)
                watched.assert_no_secret_shown()
            finally:
                _close(watched)
