"""Upstream failover: one of three deployments of a pooled target dies under load.

* lost requests: an open-loop load (default 200 req/s, half of them streamed) on a
  target pooling three loopback OpenAI mocks (each its own process); after a few
  seconds one mock is killed (SIGKILL). Reported: non-streaming requests that failed,
  and streams that failed before their first token (uncommitted) or after it.
* breaker: time from the kill to `sipp_gateway_breaker_state` of that deployment
  reading 1 on /metrics (polled every 10 ms, so within 10 ms).
* pool cost: p50 latency of the pooled target against a single-upstream target on
  the same mock, non-streaming, open loop, alternated over rounds.

    python bench/upstream_failover.py [--rate 200] [--seconds 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _stats import spread
from gateway_overhead import BODY, free_port, start_mock, wait_http

STREAM_MOCK = """
import json, sys, time
sys.path.insert(0, {root!r})
from tests.remote.loopback import LoopbackServer, json_reply, sse_reply
BODY = {{"id": "c", "object": "chat.completion", "created": 1, "model": "mock-model", "choices": [{{"index": 0,
    "message": {{"role": "assistant", "content": "hi there"}}, "finish_reason": "stop"}}],
    "usage": {{"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}}}
CHUNK = {{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "mock-model",
    "choices": [{{"index": 0, "delta": {{"content": "hi there"}}, "finish_reason": "stop"}}]}}
def handle(req):
    if json.loads(req.body).get("stream"):
        return sse_reply([b"data: " + json.dumps(CHUNK).encode() + b"\\n\\n", b"data: [DONE]\\n\\n"])
    return json_reply(BODY)
server = LoopbackServer(handle)
print(server.url, flush=True)
time.sleep(10**6)
"""
TOML = """
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
max_request_bytes = 65536
allowed_origins = []
admin_password_env = "BENCH_ADMIN"
[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []
[security.rate_limit]
enabled = false
[routes]
metrics = "/metrics"
health = "/healthz"
[[tokens]]
env = "BENCH_TOKEN"
caller = "bench"
targets = []
[[targets]]
name = "single"
type = "openai_compatible"
model = "mock-model"
base_url = "{a}/v1"
[[targets]]
name = "pooled"
type = "openai_compatible"
model = "mock-model"
[targets.retry]
attempts = 3
backoff_base_seconds = 0.005
backoff_cap_seconds = 0.05
[targets.breaker]
window_seconds = 10
min_requests = 5
failure_rate = 0.5
cooldown_seconds = 5
[[targets.deployments]]
name = "a"
base_url = "{a}/v1"
[[targets.deployments]]
name = "b"
base_url = "{b}/v1"
[[targets.deployments]]
name = "c"
base_url = "{c}/v1"
"""
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench-token"}


async def load(
    url: str, model: str, rate: float, seconds: float, stream_share: float
) -> dict[str, int | list[float]]:
    """Open-loop requests; counts of each outcome and the latencies of the successes."""
    out: dict[str, int | list[float]] = {
        "ok": 0, "failed": 0, "stream_ok": 0, "stream_uncommitted": 0, "stream_cut": 0,
        "latencies": [],
    }  # fmt: skip
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(stream: bool) -> None:
            body = {**BODY, "model": model, "stream": stream}
            start = time.perf_counter()
            try:
                r = await client.post(url, json=body, headers=HEADERS)
            except httpx.HTTPError:
                out["stream_uncommitted" if stream else "failed"] += 1  # type: ignore[operator]
                return
            if r.status_code != 200:
                out["stream_uncommitted" if stream else "failed"] += 1  # type: ignore[operator]
                return
            if stream:
                done = r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
                out["stream_ok" if done else "stream_cut"] += 1  # type: ignore[operator]
                return
            out["ok"] += 1  # type: ignore[operator]
            out["latencies"].append((time.perf_counter() - start) * 1000)  # type: ignore[union-attr]

        tasks = []
        t0 = time.perf_counter()
        every = round(1 / stream_share) if stream_share else 0
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(bool(every) and i % every == 0)))
        await asyncio.gather(*tasks)
    return out


async def watch_breaker(metrics: str, started: float, stop: asyncio.Event) -> float | None:
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            text = (await client.get(metrics)).text
            if 'sipp_gateway_breaker_state{deployment="b",target="pooled"} 1.0' in text:
                return time.perf_counter() - started
            await asyncio.sleep(0.01)
    return None


async def failover(
    url: str, metrics: str, mock_b: subprocess.Popen[bytes], args: argparse.Namespace
) -> tuple[dict[str, int | list[float]], float | None]:
    stop = asyncio.Event()
    traffic = asyncio.create_task(load(url, "pooled", args.rate, args.seconds, 0.5))
    await asyncio.sleep(args.seconds / 3)
    mock_b.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    breaker = asyncio.create_task(watch_breaker(metrics, killed, stop))
    counts = await traffic
    stop.set()
    return counts, await breaker


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sipp-failover-"))
    try:
        urls = [start_mock(STREAM_MOCK, procs) for _ in range(3)]
        public, management = free_port(), free_port()
        (tmp / "gw.toml").write_text(
            TOML.format(public=public, management=management, a=urls[0], b=urls[1], c=urls[2])
        )
        env = {**os.environ, "BENCH_TOKEN": "bench-token", "BENCH_ADMIN": "pw"}
        env["SIPP_GATEWAY_LOG"] = "error"
        gw = subprocess.Popen(
            [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(tmp / "gw.toml")],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{management}/healthz", gw)
        url = f"http://127.0.0.1:{public}/v1/chat/completions"
        for model in ("single", "pooled"):  # warm up, and prove both answer
            asyncio.run(load(url, model, 50, 1, 0))

        p50: dict[str, list[float]] = {"single": [], "pooled": []}
        for i in range(args.rounds):
            for model in p50:
                counts = asyncio.run(load(url, model, args.rate, args.seconds / 2, 0))
                assert counts["failed"] == 0, counts
                p50[model].append(statistics.median(counts["latencies"]))  # type: ignore[arg-type]
            print(f"round {i + 1}: p50 single {p50['single'][-1]:.3f} ms, "
                  f"pooled {p50['pooled'][-1]:.3f} ms")  # fmt: skip
        added = [p - s for p, s in zip(p50["pooled"], p50["single"], strict=True)]
        print(f"added p50 of a pool of three over one upstream: {spread(added, '.3f', 'ms')}")

        counts, to_open = asyncio.run(
            failover(url, f"http://127.0.0.1:{management}/metrics", procs[1], args)
        )
        sent = int(args.rate * args.seconds)
        print(f"one of three upstreams killed at {args.rate:.0f} req/s, {sent} requests:")
        print(f"  non-streaming: {counts['ok']} ok, {counts['failed']} failed")
        print(
            f"  streams: {counts['stream_ok']} ok, {counts['stream_uncommitted']} failed "
            f"before committing, {counts['stream_cut']} cut after committing"
        )
        shown = "never" if to_open is None else f"{to_open * 1000:.0f} ms"
        print(f"  kill to breaker open (10 ms polling): {shown}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
