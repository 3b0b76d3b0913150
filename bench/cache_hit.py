"""An exact cache hit answered end to end, against the gateway's path without a cache.

One `sipp-gateway serve` with two targets on one loopback OpenAI mock: `mock` (no
cache) and `cached` (`[targets.cache]`, SQLite in a temporary directory). Paths:

* direct:   the mock alone (no gateway), for scale;
* no-cache: through the gateway to the mock, a target without a cache (the no-op path);
* hit:      the same request to `cached`, answered from the cache (no upstream call);
* store:    `cached` with `Cache-Control: no-cache` (no lookup; the answer goes
            upstream and is written to the store again: the miss path's extra work).

Latency, not throughput: one request at a time (so a busy machine adds no queueing), each
path on its own kept-alive connection, the paths taking turns request by request (the
order rotates between rounds), so load from elsewhere falls on every path alike. Per
round `--requests` requests per path and their p50/p99; then the median over rounds with
its spread, and what a hit adds over the no-cache path (the goal: p50 <= +1 ms; negative
means a hit is faster). The gateway's own lookup time (`sipp_gateway_cache_lookup_seconds`)
is printed last.

    python bench/cache_hit.py [--requests 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _stats import percentile, spread
from gateway_overhead import (
    BODY,
    GATEWAY_TOML,
    MOCK,
    free_port,
    start_mock,
    stop_all,
    wait_http,
)

CACHED_TARGET = """
[[targets]]
name = "cached"
type = "openai_compatible"
model = "mock-model"
base_url = "{mock}/v1"
token_env = "BENCH_UPSTREAM"
[targets.cache]
path = "{path}"
ttl_seconds = 86400
[routes]
metrics = "/metrics"
"""


def one(client: httpx.Client, url: str, headers: dict[str, str], body: bytes) -> float | None:
    """One request's latency in ms; None when it failed."""
    start = time.perf_counter()
    try:
        client.post(url, content=body, headers=headers).raise_for_status()
    except httpx.HTTPError:
        return None
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sipp-bench-cache-"))
    try:
        mock = start_mock(MOCK, procs)
        public, management = free_port(), free_port()
        toml = GATEWAY_TOML.format(public=public, management=management, mock=mock)
        toml += CACHED_TARGET.format(mock=mock, path=tmp / "cache")
        (tmp / "gw.toml").write_text(toml)
        env = {
            **os.environ,
            "BENCH_TOKEN": "bench-token",
            "BENCH_ADMIN": "pw",
            "BENCH_UPSTREAM": "up",
            "SIPP_GATEWAY_LOG": "warning",
        }
        gw = subprocess.Popen(
            [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(tmp / "gw.toml")],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{management}/healthz", gw)

        url = f"http://127.0.0.1:{public}/v1/chat/completions"
        auth = {"content-type": "application/json", "authorization": "Bearer bench-token"}
        greedy = {**BODY, "temperature": 0}  # only a greedy request is cached by default
        paths = {
            "direct": (
                f"{mock}/v1/chat/completions",
                {"content-type": "application/json"},
                {**greedy, "model": "mock-model"},
                None,
            ),
            "no-cache": (url, auth, {**greedy, "model": "mock"}, None),
            "hit": (url, auth, {**greedy, "model": "cached"}, "hit"),
            "store": (
                url,
                {**auth, "cache-control": "no-cache"},
                {**greedy, "model": "cached"},
                "store",
            ),
        }
        bodies = {name: json.dumps(p[2]).encode() for name, p in paths.items()}
        # prove each path answers as it should: "store" stores, then "hit" hits (the write
        # happens in the background, so ask until it has landed)
        deadline = time.monotonic() + 60  # the targets are registered in the background
        while "still loading" in httpx.post(url, content=bodies["no-cache"], headers=auth).text:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway's targets never loaded")
            time.sleep(0.1)
        for name, (target, headers, _, verdict) in paths.items():
            r = httpx.post(target, content=bodies[name], headers=headers, timeout=30)
            if r.status_code != 200:
                raise SystemExit(f"{name}: {r.status_code} {r.text}")
            if verdict == "store":
                assert r.headers["x-sipp-cache"] == "store", r.headers
        for _ in range(100):
            r = httpx.post(url, content=bodies["hit"], headers=auth, timeout=30)
            if r.headers.get("x-sipp-cache") == "hit":
                break
        assert r.headers.get("x-sipp-cache") == "hit", "the cached answer never hit"
        clients = {name: httpx.Client(timeout=30) for name in paths}

        names = list(paths)
        p50: dict[str, list[float]] = {k: [] for k in names}
        p99: dict[str, list[float]] = {k: [] for k in names}
        added: list[float] = []
        errors = dict.fromkeys(names, 0)
        for i in range(-1, args.rounds):  # round -1 warms up, and is not counted
            order = names[i % len(names) :] + names[: i % len(names)]
            ok: dict[str, list[float]] = {k: [] for k in names}
            for _ in range(args.requests):
                for name in order:
                    target, headers, _, _ = paths[name]
                    ms = one(clients[name], target, headers, bodies[name])
                    if ms is None:
                        errors[name] += i >= 0
                    else:
                        ok[name].append(ms)
            if i < 0:
                continue
            for name in names:
                p50[name].append(percentile(ok[name], 0.5))
                p99[name].append(percentile(ok[name], 0.99))
            added.append(p50["hit"][-1] - p50["no-cache"][-1])
            line = "  ".join(f"{k} {p50[k][-1]:.2f}" for k in names)
            print(f"round {i + 1}: p50 ms  {line}  (hit - no-cache {added[-1]:+.2f})")
        sent = args.rounds * args.requests
        for k in names:
            print(
                f"{k:9s} p50 {spread(p50[k], '.2f', 'ms')}  p99 {spread(p99[k], '.2f', 'ms')}"
                f"  errors {errors[k]} of {sent}"
            )
        print(f"hit over no-cache, p50 per round: {spread(added, '+.2f', 'ms')} (goal: <= +1 ms)")
        store_added = [s - n for s, n in zip(p50["store"], p50["no-cache"], strict=True)]
        print(
            f"store (miss path) over no-cache, p50 per round: {spread(store_added, '+.2f', 'ms')}"
        )
        metrics = httpx.get(f"http://127.0.0.1:{management}/metrics", timeout=30).text
        for line in metrics.splitlines():
            if line.startswith(
                ("sipp_gateway_cache_lookup_seconds_sum", "sipp_gateway_cache_lookup_seconds_count")
            ):
                print(line)
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
