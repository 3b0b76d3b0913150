"""The exact cache's Redis backend: two `sipp-gateway serve` replicas on one real Redis
share entries (one stores, the other hits without an upstream call) and its caps."""

from __future__ import annotations

from pathlib import Path

from .redis_server import running_redis
from .test_cache_gateway import Provider, cached_gateway, chat, stored, upstream
from .upstreams import poll

__all__ = ["upstream"]  # the module-scoped provider fixture


def test_two_replicas_share_the_redis_store(upstream: Provider, tmp_path: Path) -> None:
    with running_redis(tmp_path) as redis:
        state = 'backend = "redis"\nurl_env = "CACHE_REDIS_URL"'
        env = {"CACHE_REDIS_URL": redis.url}
        cache = 'backend = "redis"\nmax_entries = 2'
        with (
            cached_gateway(tmp_path, upstream, cache, state, env=env, name="a") as a,
            cached_gateway(tmp_path, upstream, cache, state, env=env, name="b") as b,
        ):
            assert chat(a, "replicated?").headers["x-sipp-cache"] == "store"
            stored(b, "replicated?")
            calls = upstream.calls()
            assert chat(b, "replicated?").json()["text"] == "The sky is blue."
            assert upstream.calls() == calls
            # the caps hold across replicas: a third entry evicts the least recently used,
            # and a hit on either replica is a use
            chat(a, "second?")
            stored(a, "second?")
            assert chat(a, "replicated?").headers["x-sipp-cache"] == "hit"  # now "second?" is
            chat(b, "third?")
            stored(b, "third?")
            poll(
                lambda: b.metric("sipp_gateway_cache_entries", '{target="remote"}') == 2,
                "two entries left",
            )
            assert chat(b, "replicated?").headers["x-sipp-cache"] == "hit"
            assert chat(a, "second?").headers["x-sipp-cache"] == "store"  # evicted: a miss
            # Redis gone: requests are served uncached, the failures counted
            redis.stop()
            down = chat(a, "replicated?")
            assert down.status_code == 200 and down.headers["x-sipp-cache"] == "bypass"
            assert down.json()["text"] == "The sky is blue."
            assert (
                a.metric("sipp_gateway_cache_errors_total", '{operation="lookup",target="remote"}')
                >= 1
            )
