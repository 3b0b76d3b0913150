"""The admin API on a live gateway: sessions, CSRF, throttling, controls, audit, no secrets."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from sipp import InvalidConfigError
from sipp.gateway.admin import MAX_TRACKED_CLIENTS, admin_state

from .test_server import ENV, LIMITED, TOKEN, Gateway, running_gateway

PASSWORD = ENV["TEST_ADMIN_PASSWORD"]
SECRETS = (PASSWORD, TOKEN, LIMITED, ENV["TEST_PROVIDER_TOKEN"])


def with_admin(toml: str) -> str:
    return toml.replace('metrics = "/metrics"', 'metrics = "/metrics"\nadmin = "/admin"')


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(smollm_path, tmp_path_factory.mktemp("admin"), with_admin) as gw:
        yield gw


def _login(gw: Gateway) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=gw.management, timeout=60)
    r = client.post("/admin/api/session", json={"password": PASSWORD})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/admin" in cookie
    return client, r.json()["csrf_token"]


def _query(gw: Gateway, target: str = "local") -> httpx.Response:
    return httpx.post(
        f"{gw.public}/v1/query",
        json={"model": target, "prompt": "x", "max_tokens": 1},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )


def test_login_overview_logout(gateway: Gateway) -> None:
    client, csrf = _login(gateway)
    overview = client.get("/admin/api/overview").json()
    assert {t["name"]: t["state"] for t in overview["targets"]} == {
        "local": "loaded",
        "mock-openai": "loaded",
    }
    assert overview["targets"][0]["backend"] == "cpu"
    assert {t["caller"] for t in overview["tokens"]} == {"all-targets", "local-only"}
    assert "/v1/responses" in overview["openai_routes"]
    assert client.get("/admin/api/session").json()["authenticated"]
    assert client.request("DELETE", "/admin/api/session").status_code == 403  # no CSRF header
    assert (
        client.request(
            "DELETE", "/admin/api/session", headers={"x-sipp-admin-csrf": csrf}
        ).status_code
        == 200
    )
    assert client.get("/admin/api/overview").status_code == 401
    # the public listener never answers admin routes
    assert (
        httpx.post(
            f"{gateway.public}/admin/api/session", json={"password": PASSWORD}, timeout=60
        ).status_code
        == 404
    )


def test_mutations_need_the_csrf_token_and_change_nothing_without_it(gateway: Gateway) -> None:
    client, csrf = _login(gateway)
    r = client.post("/admin/api/controls/disable_target", json={"target": "local"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "authorization"
    assert _query(gateway).status_code == 200
    r = client.post(
        "/admin/api/controls/disable_target",
        json={"target": "local"},
        headers={"x-sipp-admin-csrf": "x" + csrf},
    )
    assert r.status_code == 403
    assert _query(gateway).status_code == 200


def test_controls_affect_the_public_listener_and_are_audited(gateway: Gateway) -> None:
    client, csrf = _login(gateway)
    h = {"x-sipp-admin-csrf": csrf}
    assert (
        client.post(
            "/admin/api/controls/disable_target", json={"target": "local"}, headers=h
        ).status_code
        == 200
    )
    r = _query(gateway)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    assert (
        client.post(
            "/admin/api/controls/enable_target", json={"target": "local"}, headers=h
        ).status_code
        == 200
    )
    assert _query(gateway).status_code == 200

    assert (
        client.post("/admin/api/controls/block", json={"ip": "127.0.0.1"}, headers=h).status_code
        == 200
    )
    blocked = _query(gateway)
    assert blocked.status_code == 403 and "blocked" in blocked.json()["error"]["message"]
    assert (
        client.post("/admin/api/controls/unblock", json={"ip": "127.0.0.1"}, headers=h).status_code
        == 200
    )
    assert _query(gateway).status_code == 200

    assert (
        client.post(
            "/admin/api/controls/rate_limit",
            json={"enabled": True, "requests_per_minute": 1, "burst": 1},
            headers=h,
        ).status_code
        == 200
    )
    assert [_query(gateway).status_code for _ in range(2)] == [200, 429]
    assert (
        client.post(
            "/admin/api/controls/rate_limit", json={"enabled": False}, headers=h
        ).status_code
        == 200
    )

    assert (
        client.post(
            "/admin/api/controls/max_concurrent_requests", json={"value": 0}, headers=h
        ).status_code
        == 400
    )
    assert (
        client.post("/admin/api/controls/block", json={"ip": "not-an-ip"}, headers=h).status_code
        == 400
    )
    actions = [e["action"] for e in client.get("/admin/api/audit").json()["entries"]]
    for action in ("login", "disable_target", "enable_target", "block", "unblock", "rate_limit"):
        assert action in actions
    entry = client.get("/admin/api/audit").json()["entries"][-1]
    assert len(entry["session"]) == 8 and entry["at"] > 0


def test_no_admin_response_contains_a_secret(gateway: Gateway) -> None:
    client, _ = _login(gateway)
    assert _query(gateway).status_code == 200  # so metrics and audit have content
    paths = (
        "/admin/api/overview",
        "/admin/api/session",
        "/admin/api/audit",
        "/admin/api/metrics",
        "/admin/",
        "/admin/assets/admin.js",
        "/admin/assets/admin.css",
    )
    for path in paths:
        response = client.get(path)
        assert response.status_code == 200, path
        for secret in SECRETS:
            assert secret not in response.text, path


def test_page_and_assets_are_served_on_the_management_listener_only(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.management, timeout=60) as client:
        r = client.get("/admin")
        assert r.status_code == 308 and r.headers["location"] == "/admin/"
        page = client.get("/admin/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert 'src="assets/admin.js"' in page.text
        js = client.get("/admin/assets/admin.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "text/css" in client.get("/admin/assets/admin.css").headers["content-type"]
        for bad in ("/admin/assets/nope.js", "/admin/assets/..%2Fadmin.py", "/admin/assets/"):
            r = client.get(bad)
            assert r.status_code == 404, bad
        assert client.get("/admin/api/metrics").status_code == 401  # data needs a session
    for path in ("/admin", "/admin/", "/admin/assets/admin.js"):
        assert httpx.get(f"{gateway.public}{path}", timeout=60).status_code == 404


def _stats(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/admin/api/metrics")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_metrics_count_requests_by_target_and_caller(gateway: Gateway) -> None:
    client, csrf = _login(gateway)
    off = {"enabled": False}  # this test counts requests, not refusals
    h = {"x-sipp-admin-csrf": csrf}
    assert client.post("/admin/api/controls/rate_limit", json=off, headers=h).status_code == 200
    before = _stats(client)

    def send(token: str, target: str, stream: bool = False) -> httpx.Response:
        return httpx.post(
            f"{gateway.public}/v1/query",
            json={"model": target, "prompt": "Count: 1, 2,", "max_tokens": 4, "stream": stream},
            headers={"authorization": f"Bearer {token}"},
            timeout=60,
        )

    # 12 successes, two at a time (max_concurrent_requests), split over two callers,
    # plus known failures.
    with ThreadPoolExecutor(2) as pool:
        ok = list(pool.map(lambda i: send(TOKEN if i % 2 else LIMITED, "local"), range(12)))
    assert [r.status_code for r in ok] == [200] * 12
    streamed = send(TOKEN, "local", stream=True)
    assert streamed.status_code == 200 and "event: done" in streamed.text
    assert send(LIMITED, "mock-openai").status_code == 403  # authorization
    assert send(TOKEN, "no-such-target").status_code == 404  # not_found, no target recorded
    after = _stats(client)

    def delta(*path: str) -> int:
        def get(d: dict[str, Any]) -> int:
            for key in path:
                d = d.get(key, {})
            return d if isinstance(d, int) else 0

        return get(after) - get(before)

    assert delta("totals", "requests") == 15
    assert delta("totals", "errors") == 2
    assert delta("totals", "errors_by_code", "authorization") == 1
    assert delta("totals", "errors_by_code", "not_found") == 1
    assert delta("callers", "all-targets", "requests") == 8
    assert delta("callers", "local-only", "requests") == 7
    assert delta("callers", "local-only", "errors") == 1
    assert delta("targets", "local", "requests") == 13
    assert delta("targets", "mock-openai", "requests") == 1
    assert "no-such-target" not in after["targets"]
    usage_in = sum(r.json()["usage"]["input_tokens"] for r in ok)
    usage_out = sum(r.json()["usage"]["output_tokens"] for r in ok)
    streamed_usage = json.loads(streamed.text.split("event: usage\ndata: ")[1].split("\n")[0])
    assert delta("targets", "local", "input_tokens") == usage_in + streamed_usage["input_tokens"]
    assert delta("targets", "local", "output_tokens") == usage_out + streamed_usage["output_tokens"]
    assert delta("totals", "output_tokens") == delta("targets", "local", "output_tokens")

    live = after["live"]
    assert live["requests_per_second"] > 0 and live["errors_by_code"]["authorization"] >= 1
    assert 0 < live["latency_p50_ms"] <= live["latency_p95_ms"]
    assert live["ttft_p50_ms"] is not None and live["ttft_p50_ms"] > 0
    history = after["history"]
    assert len(history) == 180 and history[-1]["t"] > history[0]["t"]
    # Every request the gateway ever served is in the 15-minute history.
    assert sum(row["requests"] for row in history) == after["totals"]["requests"]
    assert after["in_flight"] == 0
    assert max(row["in_flight"] for row in history) >= 1


def test_sessions_expire(smollm_path: Path, tmp_path: Path) -> None:
    env = {"SIPP_GATEWAY_ADMIN_SESSION_SECONDS": "2"}
    with running_gateway(smollm_path, tmp_path, with_admin, env) as gw:
        client, csrf = _login(gw)
        assert client.get("/admin/api/overview").status_code == 200
        time.sleep(2.5)
        for path in ("/admin/api/overview", "/admin/api/metrics", "/admin/api/session"):
            r = client.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "authentication"
        r = client.post(
            "/admin/api/controls/block",
            json={"ip": "10.0.0.1"},
            headers={"x-sipp-admin-csrf": csrf},
        )
        assert r.status_code == 401
        assert _query(gw).status_code == 200  # the expired session changed nothing
    # Admin actions reach the process log too, with the session prefix and never the password.
    assert '"message": "admin login by session ' in gw.stderr


@pytest.mark.parametrize("value", ["0", "abc", "86401", "-5"])
def test_bad_session_lifetime_is_refused(value: str) -> None:
    with pytest.raises(InvalidConfigError, match="SIPP_GATEWAY_ADMIN_SESSION_SECONDS"):
        admin_state("pw", {"SIPP_GATEWAY_ADMIN_SESSION_SECONDS": value})
    with pytest.raises(InvalidConfigError, match="SIPP_GATEWAY_ADMIN_ASSETS_DIR"):
        admin_state("pw", {"SIPP_GATEWAY_ADMIN_ASSETS_DIR": "/nonexistent"})


def test_failed_logins_are_throttled(smollm_path: Path, tmp_path: Path) -> None:
    # Its own gateway: the lockout would refuse every later login from this address.
    with (
        running_gateway(smollm_path, tmp_path, with_admin) as gw,
        httpx.Client(base_url=gw.management, timeout=60) as client,
    ):
        codes = [
            client.post("/admin/api/session", json={"password": f"guess-{i}"}).status_code
            for i in range(6)
        ]
        assert codes == [401] * 5 + [429]
        # even the right password waits out the window once throttled
        assert client.post("/admin/api/session", json={"password": PASSWORD}).status_code == 429


def test_cookie_is_secure_when_a_trusted_proxy_ended_tls(
    gateway: Gateway, smollm_path: Path, tmp_path: Path
) -> None:
    def session_cookie(gw: Gateway, **headers: str) -> str:
        r = httpx.post(
            f"{gw.management}/admin/api/session",
            json={"password": PASSWORD},
            headers=headers,
            timeout=60,
        )
        assert r.status_code == 200
        return r.headers["set-cookie"].lower()

    https = {"x-forwarded-proto": "https"}
    # No trusted proxies in this config: the header is anyone's claim and changes nothing.
    assert "; secure" not in session_cookie(gateway, **https)

    def trust_loopback(toml: str) -> str:
        return with_admin(toml).replace(
            "trusted_proxy_cidrs = []", 'trusted_proxy_cidrs = ["127.0.0.0/8"]'
        )

    with running_gateway(smollm_path, tmp_path, trust_loopback) as gw:
        assert "; secure" not in session_cookie(gw)
        assert "; secure" in session_cookie(gw, **https)


def test_forwarded_headers_from_an_untrusted_peer_cannot_dodge_a_block(gateway: Gateway) -> None:
    client, csrf = _login(gateway)
    h = {"x-sipp-admin-csrf": csrf}
    spoof = {
        "authorization": f"Bearer {TOKEN}",
        "x-forwarded-for": "203.0.113.50",
        "x-real-ip": "203.0.113.50",
    }
    body = {"model": "local", "prompt": "x", "max_tokens": 1}
    assert client.post("/admin/api/controls/block", json={"ip": "127.0.0.1"}, headers=h).is_success
    try:
        r = httpx.post(f"{gateway.public}/v1/query", json=body, headers=spoof, timeout=60)
        assert r.status_code == 403
    finally:
        client.post("/admin/api/controls/unblock", json={"ip": "127.0.0.1"}, headers=h)
    assert (
        httpx.post(f"{gateway.public}/v1/query", json=body, headers=spoof, timeout=60).status_code
        == 200
    )


def test_failed_login_table_stays_bounded() -> None:
    admin = admin_state("pw", {})
    for i in range(MAX_TRACKED_CLIENTS + 50):  # all inside one throttling window
        admin.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=i / 1000)
    assert len(admin.failures) == MAX_TRACKED_CLIENTS
    assert "10.0.0.0" not in admin.failures and "10.0.39.65" in admin.failures
    admin.failed("192.0.2.1", now=10_000.0)  # later: every earlier window has passed
    assert list(admin.failures) == ["192.0.2.1"]


def test_controls_and_audit_reset_on_restart(smollm_path: Path, tmp_path: Path) -> None:
    for run in range(2):
        directory = tmp_path / f"run{run}"
        directory.mkdir()
        with running_gateway(smollm_path, directory, with_admin) as gw:
            client, csrf = _login(gw)
            overview = client.get("/admin/api/overview").json()
            assert overview["controls"]["blocked_ips"] == []
            assert overview["controls"]["max_concurrent_requests"] == 2  # from the TOML
            assert not any(t["disabled"] for t in overview["targets"])
            actions = [e["action"] for e in client.get("/admin/api/audit").json()["entries"]]
            assert actions == ["login"]
            assert client.get("/admin/api/metrics").json()["totals"]["requests"] == 0
            h = {"x-sipp-admin-csrf": csrf}
            for action, body in (
                ("block", {"ip": "10.9.8.7"}),
                ("disable_target", {"target": "mock-openai"}),
                ("max_concurrent_requests", {"value": 1}),
            ):
                assert client.post(f"/admin/api/controls/{action}", json=body, headers=h).is_success
            assert _query(gw).status_code == 200
