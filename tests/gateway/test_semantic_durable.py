"""The semantic cache's vectors are stored with their entries: real `sipp-gateway serve`
processes (a local all-MiniLM-L6-v2 embedding target, a loopback provider counting its
calls). A gateway killed with SIGKILL comes back with its semantic hits; another
embedding model never reads them; two replicas on one real Redis answer each other's
questions by meaning, and an evicted entry is never served."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ..ports import free_port
from .limited_gateways import toml
from .redis_server import running_redis
from .test_cache_gateway import Provider, sqlite_cache, upstream
from .test_semantic_gateway import TARGET, ask, indexed, semantic
from .test_server import ENV, Gateway
from .upstreams import poll

__all__ = ["upstream"]  # the module-scoped provider fixture

ENTRIES = "sipp_gateway_cache_semantic_entries"
LEAVE = "How many days of annual leave do I get?"
LEAVE_PARAPHRASE = "How many days of annual leave am I entitled to?"


@contextmanager
def gateway_process(
    directory: Path,
    upstream: Provider,
    cache: str,
    state: str = "",
    env: dict[str, str] | None = None,
    name: str = "gateway",
) -> Iterator[Gateway]:
    """A ready provider-only gateway (target "remote", `[targets.cache]` = `cache`) that a
    test may kill; one still running at the end stops on SIGTERM with exit code 0."""
    public, management = free_port(), free_port()
    path = directory / f"{name}.toml"
    limits = f"\n[targets.cache]\n{cache}\n"
    path.write_text(toml(upstream.url, public, management, target_limits=limits, state=state))
    gw = Gateway(path, {**ENV, **(env or {})}, public, management)
    try:
        gw.wait_ready(timeout=60)
        yield gw
    finally:
        if gw.proc.poll() is None:
            code, err = gw.stop()
            assert code == 0, err


def restored(gw: Gateway) -> float:
    """Wait until the semantic index was rebuilt from the store (the gauge appears once
    it was read), and say how many questions it holds."""
    series = re.compile(rf"^{ENTRIES}{re.escape(TARGET)} ([0-9.e+-]+)$", re.M)

    def shown() -> re.Match[str] | None:
        return series.search(httpx.get(f"{gw.management}/metrics", timeout=60).text)

    poll(lambda: shown() is not None, "the semantic index restored", timeout=60)
    found = shown()
    assert found is not None
    return float(found.group(1))


def test_the_vectors_survive_a_crash(upstream: Provider, tmp_path: Path) -> None:
    cache = sqlite_cache(tmp_path, semantic())
    with gateway_process(tmp_path, upstream, cache, name="first") as gw:
        assert ask(gw, LEAVE).headers["x-sipp-cache"] == "store"
        indexed(gw, 1)
        gw.proc.kill()  # SIGKILL: no shutdown, nothing saved on the way out
        gw.proc.wait(timeout=60)
    calls = upstream.calls()
    with gateway_process(tmp_path, upstream, cache, name="second") as gw:
        assert restored(gw) == 1
        hit = ask(gw, LEAVE_PARAPHRASE)
        assert hit.headers["x-sipp-cache"] == "hit"
        assert hit.headers["x-sipp-cache-match"] == "semantic"
        assert hit.json()["text"] == "The sky is blue." and upstream.calls() == calls


def test_another_embedding_model_never_reads_the_vectors(
    upstream: Provider, tmp_path: Path
) -> None:
    """The same GGUF with another pooling is another vector space: its gateway starts with
    an empty index over the same store, and the first model's vectors stay apart."""
    mean = sqlite_cache(tmp_path, semantic())
    cls = sqlite_cache(tmp_path, semantic().replace('pooling = "mean"', 'pooling = "cls"'))
    with gateway_process(tmp_path, upstream, mean, name="mean") as gw:
        ask(gw, LEAVE)
        indexed(gw, 1)
    with gateway_process(tmp_path, upstream, cls, name="cls") as gw:
        assert restored(gw) == 0
        calls = upstream.calls()
        assert ask(gw, LEAVE).headers["x-sipp-cache-match"] == "exact"  # entries are shared
        miss = ask(gw, LEAVE_PARAPHRASE)
        assert miss.headers["x-sipp-cache"] == "store" and upstream.calls() == calls + 1
        indexed(gw, 1)  # the paraphrase, under the cls model
    with gateway_process(tmp_path, upstream, mean, name="mean-again") as gw:
        assert restored(gw) == 1  # its own question only, not the cls one


def test_replicas_on_one_redis_answer_each_other_by_meaning(
    upstream: Provider, tmp_path: Path
) -> None:
    with running_redis(tmp_path) as redis:
        state = 'backend = "redis"\nurl_env = "CACHE_REDIS_URL"'
        env = {"CACHE_REDIS_URL": redis.url}
        cache = f'backend = "redis"\nmax_entries = 3\n{semantic()}'
        with gateway_process(tmp_path, upstream, cache, state, env, name="a") as a:
            assert ask(a, "What time does the library close?").headers["x-sipp-cache"] == "store"
            indexed(a, 1)
            # b starts after a stored: it reads the question at startup
            with gateway_process(tmp_path, upstream, cache, state, env, name="b") as b:
                assert restored(b) == 1
                calls = upstream.calls()
                hit = ask(b, "When does the library close?")
                assert hit.headers["x-sipp-cache-match"] == "semantic"
                assert upstream.calls() == calls
                # stored through a while b runs: b picks it up
                ask(a, "How do I renew my library card?")
                indexed(b, 2)
                calls = upstream.calls()
                hit = ask(b, "How can I renew my library card?")
                assert hit.headers["x-sipp-cache-match"] == "semantic"
                assert upstream.calls() == calls
                # The store evicts by use, each index by age: after a use of the first
                # entry, two more stores evict the second from Redis, while b's index
                # (3 questions too) drops the first and keeps the second's vector.
                assert ask(a, "What time does the library close?").headers["x-sipp-cache"] == "hit"
                for question in ("Who wrote Hamlet?", "Why is the sea salty?"):
                    ask(a, question)
                no_store = {"cache-control": "no-store"}  # looks up, never stores
                poll(
                    lambda: (
                        ask(b, "Why is the ocean salty?", headers=no_store).headers.get(
                            "x-sipp-cache-match"
                        )
                        == "semantic"
                    ),
                    "b follows a's last store",
                    timeout=60,
                )
                gone = ask(a, "How do I renew my library card?", headers=no_store)
                assert gone.headers["x-sipp-cache"] == "miss"  # evicted from Redis
                calls = upstream.calls()
                evicted = ask(b, "How can I renew my library card?", headers=no_store)
                assert evicted.headers["x-sipp-cache"] == "miss"  # found, not served
                assert upstream.calls() == calls + 1
                assert b.metric(ENTRIES, TARGET) == 2  # b held its vector, and dropped it


def test_a_replica_that_cannot_bind_exits_with_its_redis_reader_stopped(
    upstream: Provider, tmp_path: Path
) -> None:
    """The semantic stage starts reading Redis before the listeners bind; a bind that
    fails must still stop that reader, or the process never exits."""
    with running_redis(tmp_path) as redis, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        public, management = int(taken.getsockname()[1]), free_port()
        state = 'backend = "redis"\nurl_env = "CACHE_REDIS_URL"'
        limits = f'\n[targets.cache]\nbackend = "redis"\n{semantic()}\n'
        path = tmp_path / "gateway.toml"
        path.write_text(toml(upstream.url, public, management, target_limits=limits, state=state))
        env = {**os.environ, **ENV, "CACHE_REDIS_URL": redis.url}
        command = [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(path)]
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "could not bind" in out.stderr and "Traceback" not in out.stderr
