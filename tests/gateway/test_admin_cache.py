"""The admin API's cache panel on live `sipp-gateway serve` processes: per cached target
the store's totals against its caps, hits, misses, bypasses, stores, the semantic index
(with the local all-MiniLM-L6-v2 embedding target) and the online verification counts;
a purge that needs a session and its CSRF header, is audited, refuses a target without a
cache with the spec's error body, and empties the store and the semantic index (the next
request misses); with Redis, a purge on one replica empties the cache every replica uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .admin_gateways import login
from .redis_server import running_redis
from .test_cache_gateway import cached_gateway, chat, sqlite_cache
from .test_cache_verify import Answers, hit, store, wait_for
from .test_semantic_gateway import indexed, semantic
from .test_server import ENV, Gateway
from .upstreams import poll


@pytest.fixture(scope="module")
def upstream() -> Iterator[Answers]:
    server = Answers()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(upstream: Answers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("admin-cache")
    extra = semantic("verify_fraction = 1\nmax_entries = 50\nttl_seconds = 600")
    with cached_gateway(directory, upstream, sqlite_cache(directory, extra)) as gw:
        yield gw


def panel(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/admin/api/cache")
    assert r.status_code == 200, r.text
    (entry,) = r.json()["caches"]  # only `remote` has a cache; `minilm` embeds for it
    return dict(entry)


def fill(gw: Gateway) -> None:
    """Two hits (one by meaning, both verified), four misses stored (one of them a guard
    rejection) and a bypass."""
    store(gw, "Why is the sky blue?")
    hit(gw, "Why is the sky blue?")
    wait_for(gw, "agree", 1)
    store(gw, "How do I reset my password?")
    indexed(gw, 2)
    hit(gw, "How can I reset my password?", match="semantic")
    wait_for(gw, "agree", 1, "semantic")
    store(gw, "Turn on dark mode in the settings app")
    indexed(gw, 3)
    store(gw, "Turn off dark mode in the settings app")  # the guard turns the near match away
    indexed(gw, 4)
    bypass = chat(gw, "Why is the sky blue?", headers={"cache-control": "no-cache, no-store"})
    assert bypass.headers["x-sipp-cache"] == "bypass"


def test_the_cache_panel_counts_and_a_purge_empties_it(gateway: Gateway) -> None:
    anonymous = httpx.get(f"{gateway.management}/admin/api/cache", timeout=60)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "authentication"
    client, csrf = login(gateway)
    empty = panel(client)
    assert empty["entries"] == 0 and empty["hits"] == 0 and empty["hit_ratio"] is None

    fill(gateway)
    cache = panel(client)
    assert {k: cache[k] for k in ("target", "backend", "available", "entries", "scope")} == {
        "target": "remote",
        "backend": "sqlite",
        "available": True,
        "entries": 4,
        "scope": "caller",
    }
    assert cache["bytes"] > 0
    assert (cache["max_entries"], cache["max_bytes"], cache["ttl_seconds"]) == (50, 64 << 20, 600)
    assert (cache["hits"], cache["misses"], cache["bypasses"], cache["stores"]) == (2, 4, 1, 4)
    assert cache["hit_ratio"] == pytest.approx(2 / 6)
    assert cache["tokens_saved"] == 2 * 6 and cache["errors"] == 0
    sem = cache["semantic"]
    assert sem["embedding_target"] == "minilm" and sem["threshold"] == 0.86
    assert (sem["entries"], sem["hits"], sem["embedding_failures"]) == (4, 1, 0)
    assert sem["guard_rejections"] >= 1
    verification = cache["verification"]
    assert verification["fraction"] == 1 and verification["threshold"] == 0.9
    for match in ("exact", "semantic"):
        assert verification[match] == {
            "agree": 1,
            "disagree": 0,
            "error": 0,
            "skipped": 0,
            "false_hit_rate": 0.0,
        }
    for secret in ENV.values():
        assert secret not in client.get("/admin/api/cache").text

    # A purge needs the session's CSRF header and a target that has a cache.
    purge = "/admin/api/cache/purge"
    assert client.post(purge, json={"target": "remote"}).status_code == 403
    assert httpx.post(f"{gateway.management}{purge}", json={"target": "remote"}).status_code == 401
    for body in ({"target": "nope"}, {"target": "minilm"}, {}, {"target": "remote", "x": 1}):
        refused = client.post(purge, json=body, headers=csrf)
        assert refused.status_code == 400, body
        assert refused.json()["error"]["code"] == "invalid_request"
        assert refused.json()["error"]["message"]
    assert client.post(purge, content=b"[", headers=csrf).status_code == 400
    assert panel(client)["entries"] == 4  # nothing refused purged anything

    done = client.post(purge, json={"target": "remote"}, headers=csrf)
    assert done.status_code == 200 and done.json() == {"ok": True, "target": "remote", "entries": 4}
    audit = client.get("/admin/api/audit").json()["entries"]
    assert [(a["action"], a["target"], a["entries"]) for a in audit if "target" in a] == [
        ("cache_purge", "remote", 4)
    ]
    after = panel(client)
    assert (after["entries"], after["bytes"], after["semantic"]["entries"]) == (0, 0, 0)
    assert gateway.metric("sipp_gateway_cache_entries", '{target="remote"}') == 0
    # the next requests miss: the exact question and a paraphrase of a purged one
    assert chat(gateway, "Why is the sky blue?").headers["x-sipp-cache"] == "store"
    assert chat(gateway, "How can I reset my password?").headers["x-sipp-cache"] == "store"


def test_a_purge_on_one_redis_replica_empties_every_replicas_cache(tmp_path: Path) -> None:
    upstream = Answers()
    try:
        with running_redis(tmp_path) as redis:
            state = 'backend = "redis"\nurl_env = "CACHE_REDIS_URL"'
            env = {"CACHE_REDIS_URL": redis.url}
            cache = 'backend = "redis"'
            with (
                cached_gateway(tmp_path, upstream, cache, state, env=env, name="a") as a,
                cached_gateway(tmp_path, upstream, cache, state, env=env, name="b") as b,
            ):
                store(a, "Why is the sky blue?")
                store(a, "Why is grass green?")
                hit(b, "Why is the sky blue?")
                client_a, csrf_a = login(a)
                client_b, csrf_b = login(b)
                shown = panel(client_a)
                assert (shown["backend"], shown["entries"], shown["hits"]) == ("redis", 2, 0)
                assert panel(client_b)["entries"] == 2  # one store, seen from both replicas
                assert panel(client_b)["hits"] == 1
                done = client_b.post(
                    "/admin/api/cache/purge", json={"target": "remote"}, headers=csrf_b
                )
                assert done.json() == {"ok": True, "target": "remote", "entries": 2}
                assert panel(client_a)["entries"] == 0
                assert chat(a, "Why is the sky blue?").headers["x-sipp-cache"] == "store"
                poll(lambda: panel(client_b)["entries"] == 1, "stored again")
                # Redis gone: the panel says so, and a purge is a 503 with the error body
                redis.stop()
                assert panel(client_a)["available"] is False
                down = client_a.post(
                    "/admin/api/cache/purge", json={"target": "remote"}, headers=csrf_a
                )
                assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
    finally:
        upstream.close()
