"""The per-client-IP rate limit (`[security.rate_limit]`) and its admin override shared
through Redis by two real `sipp-gateway serve` replicas on a real redis-server: one
bucket per client address whatever replica answers, a request's extra cost (one per
choice) taken all or none, an override set on one replica enforced by the other and by a
replica started later, and Redis taken away and brought back under each policy."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from ..ports import free_port
from ..remote.loopback import LoopbackServer
from .limited_gateways import LIMITED_CALLER, toml
from .redis_server import RedisServer
from .test_redis_state import _admin, _state
from .test_server import ENV, Gateway, serving
from .upstreams import poll, text_reply

AUTH = {"authorization": f"Bearer {LIMITED_CALLER}"}
DISABLED = "[security.rate_limit]\nenabled = false\n"
# One token a minute: over a test's few seconds the buckets hardly refill.
PER_MINUTE = 1


def _rate_limit(burst: int) -> str:
    return f"[security.rate_limit]\nenabled = true\nrequests_per_minute = {PER_MINUTE}\nburst = {burst}\n"


@contextmanager
def _replica(
    directory: Path,
    redis: RedisServer | None,
    upstream: LoopbackServer,
    name: str,
    rate_limit: str,
    policy: str = "fail_open",
) -> Iterator[Gateway]:
    """A ready replica sharing `redis` (None: the memory backend), its
    `[security.rate_limit]` table `rate_limit`."""
    public, management = free_port(), free_port()
    state = _state(policy) if redis is not None else ""
    config = toml(upstream.url, public, management, state=state)
    assert DISABLED in config
    path = directory / f"{name}.toml"
    path.write_text(config.replace(DISABLED, rate_limit))
    env = {"TEST_REDIS_URL": redis.url} if redis is not None else {}
    with serving(path, {**ENV, **env}, public, management, timeout=60) as gw:
        yield gw


@contextmanager
def _replicas(
    directory: Path,
    redis: RedisServer,
    upstream: LoopbackServer,
    rate_limit: str,
    policy: str = "fail_open",
) -> Iterator[tuple[Gateway, Gateway]]:
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(_replica(directory, redis, upstream, name, rate_limit, policy))
            for name in ("a", "b")
        )
        yield a, b


def _chat(gw: Gateway, n: int = 1) -> httpx.Response:
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "n": n}
    return httpx.post(f"{gw.public}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def test_one_client_ip_has_one_bucket_across_replicas(tmp_path: Path, redis: RedisServer) -> None:
    burst = 3
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, _rate_limit(burst)) as (a, b),
    ):
        answers = [_chat(gw) for _ in range(burst + 1) for gw in (a, b)]
        statuses = [r.status_code for r in answers]
        assert set(statuses) == {200, 429}, statuses
        # the burst, plus at most one token refilled meanwhile; per replica it would be 2 x 3
        assert burst <= statuses.count(200) <= burst + 1, statuses
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        models = httpx.get(f"{b.public}/v1/models", headers=AUTH, timeout=60)
        assert models.status_code == 429  # every public route checks the same bucket
        assert a.metric("sipp_gateway_rate_limited_total") > 0
        assert b.metric("sipp_gateway_rate_limited_total") > 0
        # the bucket is in Redis under the state prefix, keyed by the client's address
        assert redis.command("EXISTS", "sipp:client_ip:127.0.0.1") == b":1\r\n"


def test_a_requests_extra_cost_is_charged_all_or_none_across_replicas(
    tmp_path: Path, redis: RedisServer
) -> None:
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, _rate_limit(6)) as (a, b),
    ):
        too_many = _chat(a, n=7)  # more than the burst: waiting would never help
        assert too_many.status_code == 429 and "burst" in too_many.text
        # the client check took its one token, as it does for every request: 5 left
        assert _chat(a, n=3).status_code == 200  # 2 left
        refused = _chat(b, n=3)  # its first token is taken, the other 2 are not there
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        # nothing more went: the one token left serves one request, on either replica
        assert _chat(a).status_code == 200
        assert _chat(b).status_code == 429


def test_an_override_set_on_one_replica_holds_on_every_replica(
    tmp_path: Path, redis: RedisServer
) -> None:
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, DISABLED) as (a, b),
    ):
        assert _chat(b).status_code == 200  # the TOML: no per-client limit
        admin_a, csrf_a = _admin(a)
        setting = {"enabled": True, "requests_per_minute": PER_MINUTE, "burst": 2}
        r = admin_a.post("/admin/api/controls/rate_limit", json=setting, headers=csrf_a)
        assert r.status_code == 200, r.text
        poll(lambda: _chat(b).status_code == 429, "replica B enforces the override set on A")
        admin_b, csrf_b = _admin(b)
        controls = admin_b.get("/admin/api/overview").json()["controls"]
        assert controls["rate_limit"] == {"requests_per_minute": PER_MINUTE, "burst": 2}
        assert _chat(a).status_code == 429  # one bucket: B used it up

        # a replica started now picks the override up
        with _replica(tmp_path, redis, upstream, "c", DISABLED) as c:
            poll(lambda: _chat(c).status_code == 429, "replica C enforces the override")

        # Redis away: the change is refused, not made on one replica only
        redis.stop()
        r = admin_b.post("/admin/api/controls/rate_limit", json={"reset": True}, headers=csrf_b)
        assert r.status_code == 503 and "not made" in r.text
        redis.start()  # empty, so no override until one is set again

        def set_on_b() -> bool:
            r = admin_b.post("/admin/api/controls/rate_limit", json=setting, headers=csrf_b)
            assert r.status_code in (200, 503), r.text  # 503 until B reaches Redis again
            return r.status_code == 200

        poll(set_on_b, "replica B writes to Redis again")
        poll(lambda: _chat(a).status_code == 429, "replica A enforces the override set on B")
        r = admin_b.post("/admin/api/controls/rate_limit", json={"reset": True}, headers=csrf_b)
        assert r.status_code == 200, r.text
        poll(lambda: _chat(a).status_code == 200, "replica A is back to its TOML")
        assert admin_a.get("/admin/api/overview").json()["controls"]["rate_limit"] is None
        r = admin_a.post(
            "/admin/api/controls/rate_limit", json={"reset": True, "burst": 3}, headers=csrf_a
        )
        assert r.status_code == 400


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
def test_redis_killed_and_restarted(tmp_path: Path, redis: RedisServer, policy: str) -> None:
    burst = 2
    with (
        LoopbackServer(text_reply) as upstream,
        _replicas(tmp_path, redis, upstream, _rate_limit(burst), policy) as (a, b),
    ):
        seen = [_chat(gw).status_code for gw in (a, a, a, b)]
        assert seen.count(429) >= 1, seen
        redis.stop()
        outage = [_chat(gw) for gw in (a, b, a, b)]
        expected = 503 if policy == "fail_closed" else 200
        assert [r.status_code for r in outage] == [expected] * 4
        if policy == "fail_closed":
            assert outage[0].json()["error"]["code"] == "unavailable"
            assert outage[0].headers["retry-after"] == "1"
        assert a.metric("sipp_gateway_state_errors_total") > 0
        assert b.metric("sipp_gateway_state_available") == 0
        # no token or budget limit here: the per-client one alone decides readiness
        ready = httpx.get(f"{a.management}/readyz", timeout=30)
        if policy == "fail_closed":
            assert ready.status_code == 503 and "state store unavailable" in ready.text
        else:
            assert ready.status_code == 200 and "limits fail open" in ready.text
        redis.start()  # same port, empty: the bucket starts full again
        after: list[int] = []

        def refused_again() -> bool:
            after.append(_chat(a if len(after) % 2 else b).status_code)
            return after[-1] == 429

        poll(refused_again, "the limit holds again once Redis is back")
        # no 500 ever; 503 only where the policy promises it
        assert set(seen + after) <= {200, 429} | ({503} if policy == "fail_closed" else set())
        assert b.metric("sipp_gateway_state_available") == 1 or _chat(b).status_code == 429


def test_without_redis_an_override_is_this_replicas_and_reset_restores_the_toml(
    tmp_path: Path,
) -> None:
    with (
        LoopbackServer(text_reply) as upstream,
        _replica(tmp_path, None, upstream, "solo", _rate_limit(50)) as gw,
    ):
        admin, csrf = _admin(gw)
        setting = {"enabled": True, "requests_per_minute": PER_MINUTE, "burst": 1}
        r = admin.post("/admin/api/controls/rate_limit", json=setting, headers=csrf)
        assert r.status_code == 200, r.text
        assert [_chat(gw).status_code for _ in range(2)] == [200, 429]
        r = admin.post("/admin/api/controls/rate_limit", json={"reset": True}, headers=csrf)
        assert r.status_code == 200, r.text
        controls = admin.get("/admin/api/overview").json()["controls"]
        assert controls["rate_limit"] == {"requests_per_minute": PER_MINUTE, "burst": 50}
        assert _chat(gw).status_code == 200  # the TOML's fresh bucket
        audit = admin.get("/admin/api/audit").json()
        assert any(e["action"] == "rate_limit" and e.get("reset") for e in audit["entries"])
