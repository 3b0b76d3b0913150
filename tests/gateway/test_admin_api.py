"""The admin API on a live gateway: sessions, CSRF, throttling, controls, audit, no secrets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .test_server import ENV, LIMITED, TOKEN, Gateway, running_gateway

PASSWORD = ENV["TEST_ADMIN_PASSWORD"]


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def with_admin(toml: str) -> str:
        return toml.replace('metrics = "/metrics"', 'metrics = "/metrics"\nadmin = "/admin"')

    with running_gateway(smollm_path, tmp_path_factory.mktemp("admin"), with_admin) as gw:
        yield gw


def _login(gw: Gateway) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=gw.management)
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
        httpx.post(f"{gateway.public}/admin/api/session", json={"password": PASSWORD}).status_code
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
    texts = [
        client.get(path).text
        for path in ("/admin/api/overview", "/admin/api/session", "/admin/api/audit")
    ]
    for text in texts:
        for secret in (PASSWORD, TOKEN, LIMITED, ENV["TEST_PROVIDER_TOKEN"]):
            assert secret not in text


def test_failed_logins_are_throttled(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.management) as client:
        codes = [
            client.post("/admin/api/session", json={"password": f"guess-{i}"}).status_code
            for i in range(6)
        ]
        assert codes == [401] * 5 + [429]
        # even the right password waits out the window once throttled
        assert client.post("/admin/api/session", json={"password": PASSWORD}).status_code == 429
