"""What token-aware limits add to a request: one gateway without limits, one with the
same caller limits in memory, one with them in Redis (Debian's redis-server on a free
loopback port, no persistence), all on one loopback OpenAI mock.

An open-loop load at a fixed rate (default 200 req/s) for a few seconds per round, the
three gateways alternated within each round; p50/p99 of each, and the added latency of
Redis-backed limits over in-memory ones (the goal: at most 0.5 ms at p50). The limits
are far above the load, so every request is reserved and settled and none refused.

    python bench/shaping_overhead.py [--rate 200] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx

from _redis_server import start_redis
from _stats import percentile
from gateway_overhead import (
    BODY,
    GATEWAY_TOML,
    MOCK,
    READINESS,
    free_port,
    open_loop,
    start_gateway,
    start_mock,
    stop_all,
)

LIMITS = "limits = { requests_per_minute = 100000000, tokens_per_minute = 1000000000 }"
REDIS_STATE = '\n[state]\nbackend = "redis"\nurl_env = "BENCH_REDIS_URL"\n'


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sipp-bench-shaping-"))
    try:
        mock = start_mock(MOCK, procs)
        redis_url = start_redis(tmp, procs)
        env = {
            **os.environ,
            "BENCH_TOKEN": "bench-token",
            "BENCH_ADMIN": "pw",
            "BENCH_UPSTREAM": "up",
            "BENCH_REDIS_URL": redis_url,
            "SIPP_GATEWAY_LOG": "warning",
        }
        urls = {}
        for name, extra in (("none", None), ("memory", ""), ("redis", REDIS_STATE)):
            public, management = free_port(), free_port()
            toml = GATEWAY_TOML.format(public=public, management=management, mock=mock)
            if extra is not None:
                toml = toml.replace("targets = []", f"targets = []\n{LIMITS}", 1) + extra
            (tmp / name).write_text(toml + READINESS)
            start_gateway(tmp / name, management, env, procs, ready=True)
            urls[name] = f"http://127.0.0.1:{public}/v1/chat/completions"
        headers = {"content-type": "application/json", "authorization": "Bearer bench-token"}
        body = json.dumps({**BODY, "model": "mock"}).encode()
        for name, url in urls.items():  # warm up, and prove each path answers (with headers)
            r = httpx.post(url, content=body, headers=headers, timeout=30)
            r.raise_for_status()
            assert ("x-ratelimit-limit-tokens" in r.headers) == (name != "none"), name
            asyncio.run(open_loop(url, headers, body, 50, 1))
        lat: dict[str, list[float]] = {k: [] for k in urls}
        errors = dict.fromkeys(urls, 0)
        for i in range(args.rounds):
            for name, url in urls.items():
                ok, failed = asyncio.run(open_loop(url, headers, body, args.rate, args.seconds))
                lat[name] += ok
                errors[name] += failed
            print(f"round {i + 1} done")
        sent = args.rounds * int(args.rate * args.seconds)
        p50 = {k: percentile(v, 0.5) for k, v in lat.items()}
        p99 = {k: percentile(v, 0.99) for k, v in lat.items()}
        for k in urls:
            print(f"{k:7s} p50 {p50[k]:.2f} ms  p99 {p99[k]:.2f} ms  errors {errors[k]} of {sent}")
        print(
            f"limits in memory over none: p50 {p50['memory'] - p50['none']:+.2f} ms, "
            f"p99 {p99['memory'] - p99['none']:+.2f} ms"
        )
        print(
            f"limits in Redis over memory: p50 {p50['redis'] - p50['memory']:+.2f} ms, "
            f"p99 {p99['redis'] - p99['memory']:+.2f} ms (goal: p50 <= +0.50 ms)"
        )
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
