"""The admin API's pools and fallback rules on a live `sipp-gateway serve`: the pool
snapshot, fallback edits checked like `sipp-gateway check`, audited, applied to the
next request, reset by a restart (the memory backend), and shared by every replica
through a real redis-server (`[state] backend = "redis"`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..remote.loopback import LoopbackServer
from .admin_gateways import (
    admin_gateway,
    chat,
    login,
    open_breaker,
    pool,
    ups,
    upstream,
)
from .pool_upstreams import Deployment
from .redis_server import running_redis
from .test_server import Gateway
from .upstreams import poll

__all__ = ["ups", "upstream"]  # fixtures shared with the other admin tests


class Setup:
    def __init__(self, gw: Gateway, ups: dict[str, Deployment]) -> None:
        self.gw, self.ups = gw, ups


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: LoopbackServer,
    ups: dict[str, Deployment],
) -> Iterator[Setup]:
    with admin_gateway(tmp_path_factory.mktemp("pools"), upstream, ups) as gw:
        yield Setup(gw, ups)


@pytest.fixture(autouse=True)
def configured(setup: Setup) -> Iterator[None]:
    """Each test starts with every deployment answering and the TOML's fallback rules."""
    yield
    for up in setup.ups.values():
        up.mode = "ok"
    client, csrf = login(setup.gw)
    for target in ("primary", "spare1", "spare2"):
        r = client.post(
            "/admin/api/controls/fallbacks", json={"target": target, "reset": True}, headers=csrf
        )
        assert r.status_code == 200, r.text


def _edit(client: httpx.Client, csrf: dict[str, str], **body: Any) -> httpx.Response:
    return client.post("/admin/api/controls/fallbacks", json=body, headers=csrf)


def test_pools_need_a_session_and_show_no_urls(setup: Setup) -> None:
    anonymous = httpx.get(f"{setup.gw.management}/admin/api/pools", timeout=60)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "authentication"
    assert httpx.get(f"{setup.gw.management}/admin/api/usage", timeout=60).status_code == 401
    client, _ = login(setup.gw)
    r = client.get("/admin/api/pools")
    assert r.status_code == 200
    for up in setup.ups.values():  # deployments by name only: a base URL may hold credentials
        assert f"127.0.0.1:{up.port}" not in r.text
    primary = pool(client, "primary")
    assert primary["fallbacks"] == ["spare1"] and primary["context_fallbacks"] == []
    assert primary["configured"]["fallbacks"] == ["spare1"] and not primary["edited"]
    # the public listener never answers admin routes
    assert httpx.get(f"{setup.gw.public}/admin/api/pools", timeout=60).status_code == 404


def test_breaker_health_in_flight_latency_and_error_rate(setup: Setup) -> None:
    client, _ = login(setup.gw)
    before = {d["name"]: d for d in pool(client, "pool")["deployments"]}
    assert set(before) == {"a", "b"}
    assert all(d["breaker"] == "closed" and d["healthy"] for d in before.values())
    assert all(d["in_flight"] == 0 for d in before.values())
    open_breaker(setup.gw, client, setup.ups)
    deps = {d["name"]: d for d in pool(client, "pool")["deployments"]}
    assert deps["a"]["breaker"] == "open" and not deps["a"]["healthy"]
    assert deps["a"]["breaker_opened"] == 1
    assert deps["a"]["error_rate"] == 1.0
    assert deps["b"]["breaker"] == "closed" and deps["b"]["healthy"]
    assert deps["b"]["error_rate"] == 0.0
    assert deps["b"]["latency_ms"] is not None and deps["b"]["latency_ms"] > 0
    assert deps["a"]["in_flight"] == deps["b"]["in_flight"] == 0
    # the same figures as /metrics
    assert setup.gw.metric("sipp_gateway_breaker_state", '{deployment="a",target="pool"}') == 1


def test_a_fallback_edit_applies_to_the_next_request_and_is_audited(setup: Setup) -> None:
    gw, ups = setup.gw, setup.ups
    client, csrf = login(gw)
    ups["primary"].mode = "500"
    r = chat(gw, "primary")
    assert r.status_code == 200 and r.headers["x-sipp-target"] == "spare1"
    assert r.json()["choices"][0]["message"]["content"] == "from spare1"

    edited = _edit(client, csrf, target="primary", fallbacks=["spare2"])
    assert edited.status_code == 200, edited.text
    r = chat(gw, "primary")
    assert r.status_code == 200 and r.headers["x-sipp-target"] == "spare2"
    assert r.json()["choices"][0]["message"]["content"] == "from spare2"
    assert r.headers["x-sipp-attempts"] == "2"
    view = pool(client, "primary")
    assert view["fallbacks"] == ["spare2"] and view["edited"]

    # Several in order: spare2 fails too, spare1 answers.
    ups["spare2"].mode = "500"
    assert _edit(client, csrf, target="primary", fallbacks=["spare2", "spare1"]).status_code == 200
    r = chat(gw, "primary")
    assert r.headers["x-sipp-target"] == "spare1" and r.headers["x-sipp-attempts"] == "3"

    # No fallbacks at all: the primary's failure reaches the caller.
    assert _edit(client, csrf, target="primary", fallbacks=[]).status_code == 200
    failed = chat(gw, "primary")
    assert failed.status_code >= 500 and "x-sipp-target" not in failed.headers

    assert _edit(client, csrf, target="primary", reset=True).status_code == 200
    assert pool(client, "primary")["fallbacks"] == ["spare1"]
    assert chat(gw, "primary").headers["x-sipp-target"] == "spare1"

    entries = [e for e in client.get("/admin/api/audit").json()["entries"]]
    edits = [e for e in entries if e["action"] == "fallbacks" and e["target"] == "primary"]
    assert [e["fallbacks"] for e in edits[-4:]] == ["spare2", "spare2,spare1", "-", "spare1"]
    assert edits[-1]["reset"] is True
    assert all(isinstance(e["at"], float) and len(e["session"]) == 8 for e in edits)


def test_context_fallbacks_are_editable(setup: Setup) -> None:
    gw, ups = setup.gw, setup.ups
    client, csrf = login(gw)
    ups["primary"].mode = "context"
    refused = chat(gw, "primary")  # configured: no context fallback, and fallbacks skip it
    assert refused.status_code >= 400 and "x-sipp-target" not in refused.headers
    r = _edit(client, csrf, target="primary", context_fallbacks=["spare2"])
    assert r.status_code == 200, r.text
    assert pool(client, "primary")["fallbacks"] == ["spare1"]  # the other list is kept
    served = chat(gw, "primary")
    assert served.status_code == 200 and served.headers["x-sipp-target"] == "spare2"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"target": "nope", "fallbacks": []}, "'target' must name a configured target"),
        ({"target": "primary", "fallbacks": ["nope"]}, "references unknown target 'nope'"),
        ({"target": "primary", "fallbacks": ["primary"]}, "cannot fall back to itself"),
        ({"target": "primary", "context_fallbacks": ["primary"]}, "cannot fall back to itself"),
        ({"target": "spare1", "fallbacks": ["primary"]}, "fallbacks loop"),
        ({"target": "spare1", "context_fallbacks": ["primary"]}, "fallbacks loop"),
        ({"target": "primary", "fallbacks": "spare2"}, "must be an array of target names"),
        ({"target": "primary", "fallbacks": [1]}, "must be an array of target names"),
        ({"target": "primary", "fallbacks": ["spare2", "spare2"]}, "names a target twice"),
        ({"target": "primary"}, "give 'fallbacks', 'context_fallbacks' or 'reset'"),
        ({"target": "primary", "reset": "yes"}, "'reset' must be a boolean"),
        ({"target": "primary", "reset": True, "fallbacks": []}, "'reset' takes no lists"),
        ({"target": "primary", "fallback": []}, "unknown field(s): fallback"),
    ],
)
def test_bad_edits_are_400_and_change_nothing(
    setup: Setup, body: dict[str, Any], fragment: str
) -> None:
    client, csrf = login(setup.gw)
    before = client.get("/admin/api/pools").json()
    audited = len(client.get("/admin/api/audit").json()["entries"])
    r = _edit(client, csrf, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and fragment in error["message"]
    assert client.get("/admin/api/pools").json() == before
    assert len(client.get("/admin/api/audit").json()["entries"]) == audited


def test_an_edit_needs_a_session_and_the_csrf_token(setup: Setup) -> None:
    gw = setup.gw
    body = {"target": "primary", "fallbacks": ["spare2"]}
    url = f"{gw.management}/admin/api/controls/fallbacks"
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    client, csrf = login(gw)
    no_csrf = client.post("/admin/api/controls/fallbacks", json=body)
    assert no_csrf.status_code == 403 and no_csrf.json()["error"]["code"] == "authorization"
    wrong = client.post(
        "/admin/api/controls/fallbacks",
        json=body,
        headers={"x-sipp-admin-csrf": "x" + csrf["x-sipp-admin-csrf"]},
    )
    assert wrong.status_code == 403
    assert pool(client, "primary")["fallbacks"] == ["spare1"]
    not_json = client.post(
        "/admin/api/controls/fallbacks", content=b"[", headers={**csrf, "content-type": "x"}
    )
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_request"


def test_a_restart_resets_the_edits(
    tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with admin_gateway(tmp_path, upstream, ups, name="first") as gw:
        client, csrf = login(gw)
        assert _edit(client, csrf, target="primary", fallbacks=["spare2"]).status_code == 200
        assert pool(client, "primary")["fallbacks"] == ["spare2"]
    with admin_gateway(tmp_path, upstream, ups, name="second") as gw:
        client, _ = login(gw)
        assert pool(client, "primary")["fallbacks"] == ["spare1"]
        assert not pool(client, "primary")["edited"]


def test_edits_are_shared_by_replicas_on_redis(
    tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    """Edited on replica A, followed by replica B (its requests too), kept in Redis across
    a restart, and a reset on B is A's too."""
    env = {"TEST_REDIS_URL": ""}
    state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"\nkey_prefix = "shared"'
    with running_redis(tmp_path) as redis:
        env["TEST_REDIS_URL"] = redis.url
        ups["primary"].mode = "500"
        with admin_gateway(tmp_path, upstream, ups, state, env, name="a") as a:
            with admin_gateway(tmp_path, upstream, ups, state, env, name="b") as b:
                client_a, csrf_a = login(a)
                client_b, csrf_b = login(b)
                assert chat(b, "primary").headers["x-sipp-target"] == "spare1"
                r = _edit(client_a, csrf_a, target="primary", fallbacks=["spare2"])
                assert r.status_code == 200, r.text
                poll(
                    lambda: pool(client_b, "primary")["fallbacks"] == ["spare2"],
                    "replica B follows A's edit",
                )
                served = chat(b, "primary")
                assert served.status_code == 200 and served.headers["x-sipp-target"] == "spare2"
                # B checks edits against the shared table: A's edit makes this one a loop
                loop = _edit(client_b, csrf_b, target="spare2", fallbacks=["primary"])
                assert loop.status_code == 400 and "fallbacks loop" in loop.text
            # a replica started later finds the edit in Redis
            with admin_gateway(tmp_path, upstream, ups, state, env, name="c") as c:
                client_c, csrf_c = login(c)
                assert pool(client_c, "primary")["fallbacks"] == ["spare2"]
                assert chat(c, "primary").headers["x-sipp-target"] == "spare2"
                assert _edit(client_c, csrf_c, target="primary", reset=True).status_code == 200
                poll(
                    lambda: pool(client_a, "primary")["fallbacks"] == ["spare1"],
                    "replica A follows C's reset",
                )
                assert chat(a, "primary").headers["x-sipp-target"] == "spare1"
                assert not pool(client_a, "primary")["edited"]


def test_an_edit_with_redis_away_is_refused_and_changes_nothing(
    tmp_path: Path, upstream: LoopbackServer, ups: dict[str, Deployment]
) -> None:
    with running_redis(tmp_path) as redis:
        env = {"TEST_REDIS_URL": redis.url}
        state = 'backend = "redis"\nurl_env = "TEST_REDIS_URL"'
        with admin_gateway(tmp_path, upstream, ups, state, env) as gw:
            client, csrf = login(gw)
            redis.stop()
            r = _edit(client, csrf, target="primary", fallbacks=["spare2"])
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert pool(client, "primary")["fallbacks"] == ["spare1"]
            redis.start()
            poll(
                lambda: (
                    _edit(client, csrf, target="primary", fallbacks=["spare2"]).status_code == 200
                ),
                "the edit goes through once Redis is back",
            )
            assert pool(client, "primary")["fallbacks"] == ["spare2"]
