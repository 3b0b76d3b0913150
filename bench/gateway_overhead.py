"""Gateway overhead: a loopback OpenAI mock called (a) directly, (b) through
`sipp-gateway` with a provider target, (c) through LiteLLM's proxy configured
for the same mock. Same request, same load tools, same machine, same run.

* latency: an open-loop load generator at a fixed rate (default 200 req/s) for
  a few seconds per round; p50/p99 of each; overhead = via-gateway − direct.
  Percentiles cover the requests that succeeded; failed ones (transport errors,
  timeouts, non-2xx) are counted and printed per path, and the run fails when
  any path's error rate exceeds --max-error-rate (default 0.1 %), since its
  latencies would then describe only the lucky requests.
* throughput: `wrk` (Debian package), 1 thread, 16 connections, closed loop;
  max sustained requests/s.

Everything binds 127.0.0.1 on free ports. LiteLLM runs from its own venv
(`./dev bench gateway_overhead` creates .build/litellm-venv and installs wrk).

    ./dev bench gateway_overhead [--rate 200] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from _stats import percentile, spread

ROOT = Path(__file__).resolve().parents[1]
LITELLM = Path(
    os.environ.get("SIPP_LITELLM_BIN", ROOT / ".build" / "litellm-venv" / "bin" / "litellm")
)
LITELLM_KEY = "sk-bench-" + "0" * 32  # both gateways authenticate a bearer token
BODY = {"model": "MODEL", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}
MOCK = """
import json, sys, time
sys.path.insert(0, {root!r})
from tests.remote.loopback import LoopbackServer, json_reply
BODY = {{"id": "c", "object": "chat.completion", "created": 1, "model": "mock-model", "choices": [{{"index": 0,
    "message": {{"role": "assistant", "content": "hi there"}}, "finish_reason": "stop"}}],
    "usage": {{"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}}}
server = LoopbackServer(lambda req: json_reply(BODY))
print(server.url, flush=True)
time.sleep(10**6)
"""
GATEWAY_TOML = """
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
requests_per_minute = 60
burst = 60
[[tokens]]
env = "BENCH_TOKEN"
caller = "bench"
targets = []
[[targets]]
name = "mock"
type = "openai_compatible"
model = "mock-model"
base_url = "{mock}/v1"
token_env = "BENCH_UPSTREAM"
"""
LITELLM_YAML = """
model_list:
  - model_name: mock
    litellm_params:
      model: openai/mock-model
      api_base: {mock}/v1
      api_key: upstream-key
"""


def start_mock(script: str, procs: list[subprocess.Popen[bytes]]) -> str:
    """Run a loopback mock `script` (formatted with the repository root) in its own process,
    added to `procs`; its URL, the first line it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script.format(root=str(ROOT))], stdout=subprocess.PIPE
    )
    procs.append(proc)
    assert proc.stdout is not None
    return proc.stdout.readline().decode().strip()


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the processes a bench started (last started first), killing any that
    do not exit within 30 s."""
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 120, ok: bool = False
) -> None:
    """Wait until `url` answers at all, or with `ok` answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200 or not ok:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


READINESS = '\n[routes]\nreadiness = "/readyz"\n'  # appended to GATEWAY_TOML: see start_gateway


def start_gateway(
    config: Path,
    management: int,
    env: dict[str, str],
    procs: list[subprocess.Popen[bytes]],
    ready: bool = False,
) -> None:
    """Run `sipp-gateway serve --config config` with `env`, added to `procs`; returns once
    its management port (`management`) answers, and with `ready` (the config ends with
    READINESS) once its targets are ready: before, a request may get 500 "still loading"."""
    gw = subprocess.Popen(
        [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(config)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    procs.append(gw)
    wait_http(f"http://127.0.0.1:{management}/{'readyz' if ready else 'healthz'}", gw, ok=ready)


def start_litellm(
    config: Path, port: int, procs: list[subprocess.Popen[bytes]], env: dict[str, str] | None = None
) -> None:
    """Run LiteLLM's proxy (one worker, master key LITELLM_KEY, no database) with `config`
    on `port`, added to `procs`; returns once it answers. `env` adds variables."""
    lite = subprocess.Popen(
        [
            *(str(LITELLM), "--config", str(config), "--host", "127.0.0.1"),
            *("--port", str(port), "--num_workers", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "LITELLM_LOG": "ERROR",
            "LITELLM_MASTER_KEY": LITELLM_KEY,
            **(env or {}),
        },
    )
    procs.append(lite)
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", lite)


async def open_loop(
    url: str, headers: dict[str, str], body: bytes, rate: float, seconds: float
) -> tuple[list[float], int]:
    """Fire requests on a fixed schedule (not waiting for replies).

    Returns the latencies in ms of the requests that succeeded, and how many failed."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            try:
                r = await client.post(url, content=body, headers=headers)
                r.raise_for_status()
            except httpx.HTTPError:
                errors += 1
                return
            latencies.append((time.perf_counter() - start) * 1000)

        tasks = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies, errors


def wrk(
    url: str,
    headers: dict[str, str],
    body: bytes,
    seconds: int,
    connections: int = 16,
    threads: int = 1,
    ports: tuple[int, ...] = (),
) -> float:
    """Requests/s of `wrk` POSTing `body` to `url`; with `ports`, thread k sends to
    ports[k % len(ports)] on url's host instead (one client process, several servers)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    if ports:
        host = json.dumps(urlsplit(url).hostname)
        lookups = ", ".join(f'wrk.lookup({host}, "{port}")[1]' for port in ports)
        lines += [
            f"local addrs = {{{lookups}}}",
            "local started = 0",
            "function setup(thread)",
            "  thread.addr = addrs[started % #addrs + 1]",
            "  started = started + 1",
            "end",
        ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("\n".join(lines) + "\n")
        script.flush()
        out = subprocess.run(
            [
                *("wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s"),
                *("-s", script.name, url),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors from {url}:\n{out}")
    return float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-error-rate", type=float, default=0.001)
    args = parser.parse_args()
    if not shutil.which("wrk") or not LITELLM.exists():
        raise SystemExit("needs wrk and LiteLLM: run it as `./dev bench gateway_overhead`")
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sipp-bench-"))
    try:
        mock = start_mock(MOCK, procs)

        public, management = free_port(), free_port()
        (tmp / "gw.toml").write_text(
            GATEWAY_TOML.format(public=public, management=management, mock=mock)
        )
        env = {
            **os.environ,
            "BENCH_TOKEN": "bench-token",
            "BENCH_ADMIN": "pw",
            "BENCH_UPSTREAM": "up",
            "SIPP_GATEWAY_LOG": "warning",
        }
        start_gateway(tmp / "gw.toml", management, env, procs)

        lport = free_port()
        (tmp / "litellm.yaml").write_text(LITELLM_YAML.format(mock=mock))
        start_litellm(tmp / "litellm.yaml", lport, procs)

        targets = {
            "direct": (
                f"{mock}/v1/chat/completions",
                {"content-type": "application/json"},
                "mock-model",
            ),
            "sipp": (
                f"http://127.0.0.1:{public}/v1/chat/completions",
                {"content-type": "application/json", "authorization": "Bearer bench-token"},
                "mock",
            ),
            "litellm": (
                f"http://127.0.0.1:{lport}/v1/chat/completions",
                {"content-type": "application/json", "authorization": f"Bearer {LITELLM_KEY}"},
                "mock",
            ),
        }
        bodies = {k: json.dumps({**BODY, "model": v[2]}).encode() for k, v in targets.items()}
        for name, (url, headers, _) in targets.items():  # warm up, and prove each path answers
            r = httpx.post(url, content=bodies[name], headers=headers, timeout=30)
            r.raise_for_status()
            asyncio.run(open_loop(url, headers, bodies[name], 50, 1))

        lat: dict[str, list[float]] = {k: [] for k in targets}
        errors = dict.fromkeys(targets, 0)
        rps: dict[str, list[float]] = {k: [] for k in targets}
        for i in range(args.rounds):
            for name, (url, headers, _) in targets.items():
                ok, failed = asyncio.run(
                    open_loop(url, headers, bodies[name], args.rate, args.seconds)
                )
                lat[name] += ok
                errors[name] += failed
            for name, (url, headers, _) in targets.items():
                rps[name].append(wrk(url, headers, bodies[name], 5))
            print(f"round {i + 1}: " + "  ".join(f"{k} {rps[k][-1]:.0f} req/s" for k in targets))
        sent = args.rounds * int(args.rate * args.seconds)
        for k in targets:
            print(f"{k:8s} errors at {args.rate:.0f} req/s: {errors[k]} of {sent}")
        p50 = {k: statistics.median(v) for k, v in lat.items()}
        p99 = {k: percentile(v, 0.99) for k, v in lat.items()}
        for k in targets:
            print(
                f"{k:8s} at {args.rate:.0f} req/s: p50 {p50[k]:.2f} ms  p99 {p99[k]:.2f} ms   "
                f"max {spread(rps[k], '.0f', 'req/s')}"
            )
        for k in ("sipp", "litellm"):
            print(
                f"{k} overhead over direct: p50 +{p50[k] - p50['direct']:.2f} ms  p99 +{p99[k] - p99['direct']:.2f} ms"
            )
        print(
            f"ratio sipp/litellm sustained req/s {statistics.median(rps['sipp']) / statistics.median(rps['litellm']):.2f}"
            f"   p50 latency {p50['sipp'] / p50['litellm']:.2f}   p99 latency {p99['sipp'] / p99['litellm']:.2f}"
        )
        too_many = [k for k in targets if errors[k] > args.max_error_rate * sent]
        if too_many:
            raise SystemExit(
                f"error rate above {args.max_error_rate:.1%} on {', '.join(too_many)}: "
                "the latency figures above leave those requests out and do not hold"
            )
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
