"""Two gateway replicas sharing one Redis: does a limit hold across them, and what do
they serve together? Sipp side by side with LiteLLM's proxy, on one loopback OpenAI mock.

1. Exactness. Two `sipp-gateway serve` replicas and one redis-server (Debian's, a free
   loopback port, no persistence), with a requests-per-minute limit of N on the *target*
   (`[targets.limits] requests_per_minute = N`, over every caller, kept in Redis). One
   request goes through each replica (the warm-up, counted), then the other 3N - 2 all at
   once, alternating between the replicas; the 2xx answers over all 3N are the admitted
   ones, the rest must be 429. The same with two LiteLLM proxies on a fresh redis-server,
   configured with the closest equivalent LiteLLM has without a database: an `rpm` of N
   on the one deployment (LiteLLM's per-target limit), enforced by
   `router_settings.optional_pre_call_checks: ["enforce_model_rate_limits"]`, its
   counters in Redis through `router_settings.redis_host/redis_port` (a Redis INCR per
   request). Key-level `rpm_limit`s need virtual keys, which need Postgres; the
   `usage-based-routing-v2` strategy reads the same `rpm` but writes its counters to
   Redis in batches every 0.1 s, so it is not the stricter of the two (measure it with
   --litellm-limit routing). LiteLLM counts
   per UTC minute (a fixed window), so its rounds start with at least --window-margin
   seconds left in the minute and a round whose burst crossed a minute is flagged.
   Sipp's limit is a token bucket that refills N/60 a second, so its allowance is N plus
   the refill from the first request to the last answer (printed beside it).
   Each side's processes (Redis included) are stopped before the other side starts; the
   sides alternate which goes first from round to round. Printed: admitted/N per round,
   its median and spread per side, and how many were admitted beyond the allowance.

2. Sustained req/s. One redis-server and two sipp replicas with caller limits far above
   the load (in Redis, so every request is reserved and settled there, none refused).
   One `wrk` process (closed loop, 2 threads of --connections/2 connections each) with
   both threads on replica A ("one replica", B idle), then one thread on each ("two
   replicas"); the two loads alternate which goes first. Printed: req/s of each, the
   mock alone under the same wrk (the ceiling), and the ratio two/one per round, median
   and spread. Caveat: on a small machine both replicas, Redis, the mock and wrk share
   the same cores, so a second replica adds processes, not CPU: the ratio says what a
   second replica gains or costs on the same cores, not on a second machine.

Everything binds 127.0.0.1 on free ports and every process started is stopped at the
end, on an error, Ctrl-C or SIGTERM. Needs redis-server, wrk and LiteLLM's venv
(`./dev bench replicas` installs them; SIPP_LITELLM_BIN points elsewhere).

    python bench/replicas.py [--rounds 3] [--per-minute 100] [--seconds 5]
                             [--connections 16] [--window-margin 20] [--no-litellm]
                             [--litellm-limit precheck|routing]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from _redis_server import start_redis
from _stats import spread
from gateway_overhead import (
    BODY,
    GATEWAY_TOML,
    LITELLM,
    LITELLM_KEY,
    MOCK,
    READINESS,
    free_port,
    start_gateway,
    start_litellm,
    start_mock,
    stop_all,
    wrk,
)
from shaping_overhead import LIMITS, REDIS_STATE

SIPP_TARGET_LIMIT = "\n[targets.limits]\nrequests_per_minute = {n}\n"
LITELLM_YAML = """
model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock-model
      api_base: {mock}/v1
      api_key: upstream-key
      rpm: {n}
    model_info:
      id: mock-deployment
router_settings:
  redis_host: 127.0.0.1
  redis_port: {redis_port}
  num_retries: 0
{enforcement}
"""
LITELLM_ENFORCEMENT = {  # --litellm-limit: what makes LiteLLM refuse past the deployment's rpm
    "precheck": '  optional_pre_call_checks: ["enforce_model_rate_limits"]',
    "routing": "  routing_strategy: usage-based-routing-v2",
}
SIPP_HEADERS = {"content-type": "application/json", "authorization": "Bearer bench-token"}
LITELLM_HEADERS = {"content-type": "application/json", "authorization": f"Bearer {LITELLM_KEY}"}
CHAT = json.dumps({**BODY, "model": "mock"}).encode()  # both name the mock's target "mock"
Procs = list[subprocess.Popen[bytes]]


@dataclass
class Round:
    admitted: int
    sent: int
    others: Counter[str]  # answers neither 2xx nor 429, by status or transport error
    seconds: float  # from the first warm-up request to the burst's last answer
    crossed_minute: bool


def _env(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_TOKEN": "bench-token",
        "BENCH_ADMIN": "pw",
        "BENCH_UPSTREAM": "up",
        "BENCH_REDIS_URL": redis_url,
        "SIPP_GATEWAY_LOG": "warning",
    }


def _sipp_replicas(
    tmp: Path, mock: str, redis_url: str, procs: Procs, caller: str = "", target: str = ""
) -> list[str]:
    """Two sipp replicas on the Redis at `redis_url`, with `caller` limits (a TOML line of
    the caller's table) and `target` limits (a table after the target); their public URLs."""
    urls = []
    for name in ("a", "b"):
        public, management = free_port(), free_port()
        toml = GATEWAY_TOML.format(public=public, management=management, mock=mock)
        toml = toml.replace("targets = []", f"targets = []\n{caller}", 1)
        (tmp / f"{name}.toml").write_text(toml + target + REDIS_STATE + READINESS)
        start_gateway(tmp / f"{name}.toml", management, _env(redis_url), procs, ready=True)
        urls.append(f"http://127.0.0.1:{public}/v1/chat/completions")
    return urls


def _litellm_replicas(
    tmp: Path, mock: str, redis_url: str, n: int, enforcement: str, procs: Procs
) -> list[str]:
    port = urlsplit(redis_url).port
    (tmp / "litellm.yaml").write_text(
        LITELLM_YAML.format(mock=mock, n=n, redis_port=port, enforcement=enforcement)
    )
    urls = []
    for _ in range(2):
        port = free_port()
        start_litellm(tmp / "litellm.yaml", port, procs, {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        urls.append(f"http://127.0.0.1:{port}/v1/chat/completions")
    return urls


async def _burst(urls: list[str], headers: dict[str, str], n: int) -> Counter[str]:
    """One request through each replica, then the other `n - len(urls)` at once,
    alternating between them; how many got each status (or transport error)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    clients = [httpx.AsyncClient(timeout=120, limits=limits) for _ in urls]

    async def one(i: int) -> str:
        try:
            r = await clients[i % len(urls)].post(
                urls[i % len(urls)], content=CHAT, headers=headers
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return str(r.status_code)

    try:
        statuses = [await one(i) for i in range(len(urls))]
        statuses += await asyncio.gather(*(one(i) for i in range(len(urls), n)))
    finally:
        for client in clients:
            await client.aclose()
    return Counter(statuses)


def _exactness_round(
    side: str, tmp: Path, mock: str, args: argparse.Namespace, procs: Procs
) -> Round:
    """Start `side`'s Redis and two replicas (added to `procs`), hammer them with 3N
    requests, and stop them again."""
    n = args.per_minute
    try:
        redis_url = start_redis(tmp, procs)
        if side == "sipp":
            urls = _sipp_replicas(tmp, mock, redis_url, procs, target=SIPP_TARGET_LIMIT.format(n=n))
            headers = SIPP_HEADERS
        else:
            enforcement = LITELLM_ENFORCEMENT[args.litellm_limit]
            urls = _litellm_replicas(tmp, mock, redis_url, n, enforcement, procs)
            headers = LITELLM_HEADERS
            left = 60 - time.time() % 60
            if (
                left < args.window_margin
            ):  # LiteLLM's window is the UTC minute: start the round in one
                time.sleep(left + 0.5)
        minute = int(time.time() // 60)
        started = time.monotonic()
        counts = asyncio.run(_burst(urls, headers, 3 * n))
        seconds = time.monotonic() - started
        crossed = int(time.time() // 60) != minute
    finally:
        stop_all(procs)
        procs.clear()
    admitted = sum(v for k, v in counts.items() if k.startswith("2"))
    others = Counter({k: v for k, v in counts.items() if not k.startswith("2") and k != "429"})
    return Round(admitted, 3 * n, others, seconds, crossed)


def _allowance(side: str, r: Round, n: int) -> tuple[float, str]:
    """What the limit itself lets through in this round, and why: sipp's token bucket
    also refills N/60 a second while the round lasts, LiteLLM's window is the UTC minute."""
    if side == "sipp":
        return n + n * r.seconds / 60, "N plus the bucket's refill while the round lasted"
    if r.crossed_minute:
        return 2 * n, "2N: the burst crossed a UTC minute, LiteLLM's window reset"
    return n, "N: one UTC minute window"


def _describe(side: str, r: Round, n: int) -> str:
    allowance, why = _allowance(side, r, n)
    over = max(0, r.admitted - int(allowance))
    line = (
        f"{side} admitted {r.admitted} of {r.sent} = {r.admitted / n:.3f} N in {r.seconds:.1f} s;"
        f" allowance {allowance:.1f} ({why}); admitted beyond it: {over}"
    )
    if r.others:
        line += f"; neither 2xx nor 429: {dict(r.others)}"
    return line


def _exactness(
    tmp: Path, mock: str, args: argparse.Namespace, sides: list[str], procs: Procs
) -> None:
    n = args.per_minute
    print(f"== exactness: requests_per_minute N = {n} on the target, {3 * n} requests per round")
    if "litellm" in sides:
        print(f"LiteLLM's limit: rpm {n} on its deployment, {args.litellm_limit} enforcement")
    ratios: dict[str, list[float]] = {side: [] for side in sides}
    beyond: Counter[str] = Counter()
    failed: dict[str, str] = {}
    for i in range(args.rounds):
        order = sides if i % 2 == 0 else sides[::-1]
        for side in order:
            if side in failed:
                continue
            directory = tmp / f"{side}-{i}"
            directory.mkdir()
            try:
                result = _exactness_round(side, directory, mock, args, procs)
            except SystemExit as exc:
                # a proxy that did not start: said, and the other side still runs
                if side == "sipp":
                    raise
                failed[side] = str(exc)
                print(f"round {i + 1}: {side} could not be run: {exc}")
                continue
            ratios[side].append(result.admitted / n)
            beyond[side] += max(0, result.admitted - int(_allowance(side, result, n)[0]))
            print(f"round {i + 1}: {_describe(side, result, n)}")
    for side in sides:
        if ratios[side]:
            print(
                f"{side:8s} admitted/N {spread(ratios[side], '.3f')}; admitted beyond the "
                f"allowance: {beyond[side]} in {len(ratios[side])} rounds"
            )
        else:
            print(f"{side:8s} not measured: {failed.get(side, 'no round ran')}")


def _sustained(tmp: Path, mock: str, args: argparse.Namespace, procs: Procs) -> None:
    seconds, conns = args.seconds, args.connections
    print(f"== sustained req/s: wrk, {conns} connections, {seconds} s per measurement")
    try:
        redis_url = start_redis(tmp, procs)
        a, b = _sipp_replicas(tmp, mock, redis_url, procs, caller=LIMITS)
        for url in (a, b):  # prove each answers, limited (so Redis is on the path)
            r = httpx.post(url, content=CHAT, headers=SIPP_HEADERS, timeout=30)
            r.raise_for_status()
            assert "x-ratelimit-limit-requests" in r.headers, r.headers
        # one wrk process, two threads of conns/2 connections each: both threads on
        # replica A, or one thread on each replica
        port_a, port_b = (urlsplit(url).port or 80 for url in (a, b))
        ports = {"one": (port_a, port_a), "two": (port_a, port_b)}

        def load(name: str, secs: int) -> float:
            return wrk(a, SIPP_HEADERS, CHAT, secs, conns, threads=2, ports=ports[name])

        direct = f"{mock}/v1/chat/completions"
        mock_headers = {"content-type": "application/json"}
        wrk(direct, mock_headers, CHAT, 1, conns, threads=2)  # warm-ups
        load("one", 1)
        load("two", 1)
        rps: dict[str, list[float]] = {"mock": [], "one": [], "two": []}
        for i in range(args.rounds):
            order = ["one", "two"] if i % 2 == 0 else ["two", "one"]
            for name in order:
                rps[name].append(load(name, seconds))
            rps["mock"].append(wrk(direct, mock_headers, CHAT, seconds, conns, threads=2))
            print(
                f"round {i + 1}: one replica {rps['one'][-1]:.0f} req/s, two replicas "
                f"{rps['two'][-1]:.0f} req/s, mock alone {rps['mock'][-1]:.0f} req/s"
            )
    finally:
        stop_all(procs)
        procs.clear()
    ratio = [t / o for t, o in zip(rps["two"], rps["one"], strict=True)]
    print(f"one replica  + Redis {spread(rps['one'], '.0f', 'req/s')}")
    print(f"two replicas + Redis {spread(rps['two'], '.0f', 'req/s')}")
    print(f"mock alone (ceiling) {spread(rps['mock'], '.0f', 'req/s')}")
    print(f"ratio two/one {spread(ratio, '.2f')}  (cores: {os.cpu_count()}, shared by all)")


def _stop_on_sigterm() -> None:
    """SIGTERM ends the bench like Ctrl-C: through the `finally` that stops its processes."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-minute", type=int, default=100, help="the limit N")
    parser.add_argument("--seconds", type=int, default=5, help="per wrk measurement")
    parser.add_argument("--connections", type=int, default=16, help="wrk's, in total (even)")
    parser.add_argument(
        "--window-margin",
        type=float,
        default=20,
        help="seconds a LiteLLM round needs left in the UTC minute, else it waits",
    )
    parser.add_argument("--no-litellm", action="store_true", help="sipp's side only")
    parser.add_argument(
        "--litellm-limit",
        choices=sorted(LITELLM_ENFORCEMENT),
        default="precheck",
        help="LiteLLM's rpm enforcement: the enforce_model_rate_limits pre-call check "
        "(default) or the usage-based-routing-v2 strategy",
    )
    parser.add_argument("--skip-sustained", action="store_true")
    parser.add_argument("--skip-exactness", action="store_true")
    args = parser.parse_args()
    if args.per_minute < 2 or args.connections < 2 or args.connections % 2:
        parser.error("--per-minute must be at least 2, --connections even and at least 2")
    if not args.skip_sustained and not shutil.which("wrk"):
        raise SystemExit("needs wrk: run it as `./dev bench replicas`")
    sides = ["sipp"]
    if args.no_litellm:
        pass
    elif LITELLM.exists():
        sides.append("litellm")
    else:
        print(f"LiteLLM not measured: no proxy at {LITELLM} (`./dev bench replicas` installs it)")
    _stop_on_sigterm()
    mock_procs: Procs = []
    procs: Procs = []
    tmp = Path(tempfile.mkdtemp(prefix="sipp-bench-replicas-"))
    try:
        mock = start_mock(MOCK, mock_procs)
        if not args.skip_exactness:
            _exactness(tmp, mock, args, sides, procs)
        if not args.skip_sustained:
            directory = tmp / "sustained"
            directory.mkdir()
            _sustained(directory, mock, args, procs)
    finally:
        stop_all(procs)
        stop_all(mock_procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
