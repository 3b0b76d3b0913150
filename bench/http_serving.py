"""Local generation over HTTP: `sipp-gateway serve` against llama.cpp's `llama-server`.

Both serve the same GGUF (SmolLM2-135M Q4_1) on `/v1/chat/completions` with the same
slots (-np), context per slot, batch sizes, threads, flash attention (off unless
--flash-attention on) and weight repacking (off on AMX hosts), prompt caching off on
both sides. llama-server is built by bench/_llama_tools.py from the llama.cpp vendored
in the pinned llama-cpp-python sdist. Requests are chats, greedy, with every
end-of-generation token banned by `logit_bias` (-100, the OpenAI range both accept), so
each generates exactly --tokens tokens (checked from `usage`); non-streamed, or with
--stream streamed (SSE, every event parsed as it arrives, usage in the last one).

Both servers stay up for --per-process rounds and take turns: while one is measured the
other is stopped (SIGSTOP, bench/_turns.py), so a round's figures are seconds apart
rather than a server start apart; the machine's speed drifts over seconds here. Each is
warmed up once after it starts. A round measures each kind twice a side, in the order
A B B A (bench/_turns.py), singles first, then concurrent:
* single: one request; generated tokens / wall time from request out to response in
  (prefill included, as a caller sees it);
* concurrent: --clients requests with distinct prompts sent at once; all generated
  tokens / wall time from the first request out to the last response in.
A side's figure for a round is its two runs together; the side at the ends alternates
by round. Prints each round, then medians with spread and the per-round ratios sipp /
llama-server (> 1: sipp faster), and the ratios of single pairs (a run and the other
side's run next to it) to show what the A B B A order takes out.

    ./dev bench http_serving [--rounds 3] [--tokens 128] [--clients 8] [--stream]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from _eog import eog_tokens
from _llama_tools import ensure_tools, tool_env
from _stats import spread
from _turns import OWN_GROUP, SETTLE_S, abba, combined, hold, resume
from batched_throughput import QUESTIONS
from gateway_overhead import free_port

SYSTEM = "You are a helpful assistant. Answer in plain prose, in as much detail as you can."
N_BATCH = 512
TOKEN = "bench-token"
GATEWAY_TOML = """
public_bind = "127.0.0.1:{public}"
management_bind = "127.0.0.1:{management}"
max_request_bytes = 65536
max_concurrent_requests = 64
allowed_origins = []
admin_password_env = "BENCH_ADMIN"

[security.client_ip]
source = "peer"
trusted_proxy_cidrs = []

[security.rate_limit]
enabled = false
requests_per_minute = 60
burst = 60

[routes]
readiness = "/readyz"

[[tokens]]
env = "BENCH_TOKEN"
caller = "bench"
targets = []

[[targets]]
name = "local"
type = "local"
model = "{model}"
backend = "cpu"
stats = "off"

[targets.runtime.context]
n_ctx = {ctx}
n_parallel = {clients}
n_batch = {batch}
n_ubatch = {batch}
n_threads = {threads}
n_threads_batch = {threads}
flash_attention = {flash}

[targets.runtime.placement]
use_extra_bufts = {extra_bufts}

[targets.runtime.cache]
mode = "off"
"""


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not become ready; see {log}")
        time.sleep(0.25)


@dataclass(frozen=True)
class Server:
    url: str
    proc: subprocess.Popen[bytes]  # leads its process group: held between its turns


@contextmanager
def _running(
    cmd: list[str], env: dict[str, str], url: str, ready: str, log: Path
) -> Iterator[Server]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, **OWN_GROUP)
        try:
            _wait_ready(proc, ready, log)
            yield Server(url, proc)
        finally:
            resume(proc)
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def sipp_server(args: argparse.Namespace, directory: Path) -> Iterator[Server]:
    from sipp.local._llama import cpu_has_amx

    public, management = free_port(), free_port()
    config = directory / "gateway.toml"
    config.write_text(
        GATEWAY_TOML.format(
            public=public,
            management=management,
            model=args.model,
            ctx=args.ctx,
            clients=args.clients,
            batch=N_BATCH,
            threads=args.threads,
            flash=str(args.flash_attention == "on").lower(),
            extra_bufts=str(not cpu_has_amx()).lower(),
        )
    )
    env = {**os.environ, "BENCH_TOKEN": TOKEN, "BENCH_ADMIN": "bench-admin"}
    cmd = [sys.executable, "-m", "sipp.cli.gateway", "serve", "--config", str(config)]
    ready = f"http://127.0.0.1:{management}/readyz"
    url = f"http://127.0.0.1:{public}"
    with _running(cmd, env, url, ready, directory / "sipp-gateway.log") as server:
        yield server


@contextmanager
def llama_server(args: argparse.Namespace, directory: Path) -> Iterator[Server]:
    from sipp.local._llama import cpu_has_amx

    port = free_port()
    cmd = [
        str(ensure_tools() / "llama-server"),
        "-m", str(args.model), "--host", "127.0.0.1", "--port", str(port),
        "-c", str(args.ctx * args.clients), "-np", str(args.clients),
        "-b", str(N_BATCH), "-ub", str(N_BATCH),
        "-t", str(args.threads), "-tb", str(args.threads),
        "-fa", args.flash_attention, "--no-cache-prompt", "--no-webui",
        *(["--no-repack"] if cpu_has_amx() else []),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with _running(cmd, tool_env(), url, url + "/health", directory / "llama-server.log") as server:
        yield server


def warm_up(url: str, bias: dict[str, int]) -> None:
    """A server's first requests: its first decodes and batch shapes."""
    body = {
        "model": "local",
        "messages": [{"role": "user", "content": q} for q in QUESTIONS[:1]],
        "max_tokens": 8,
        "temperature": 0,
        "logit_bias": bias,
    }
    with ThreadPoolExecutor(2) as pool:
        for r in pool.map(
            lambda _: httpx.post(
                f"{url}/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {TOKEN}"},
                timeout=300,
            ),
            range(2),
        ):
            r.raise_for_status()


def _streamed(http: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    """Read a streamed chat to its end, as a client shows it: every event parsed as it
    arrives. The generated token count comes from the usage event.

    Each stream has a connection of its own, on both sides: llama-server closes its end
    after a stream, and a request sent on that kept connection before the close is seen
    fails with no response (7 of 10 turns did)."""
    usage: dict[str, Any] | None = None
    with http.stream("POST", url, json=body, headers={**headers, "connection": "close"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
    if usage is None:
        raise SystemExit(f"{url} streamed no usage")
    return int(usage["completion_tokens"])


def measure(url: str, kind: str, args: argparse.Namespace, bias: dict[str, int]) -> float:
    """Seconds taken by one turn of `kind` (single or concurrent) against `url`."""
    headers = {"authorization": f"Bearer {TOKEN}"}

    def one(http: httpx.Client, question: str, tokens: int) -> None:
        body = {
            "model": "local",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ],
            "max_tokens": tokens,
            "temperature": 0,
            "logit_bias": bias,
        }
        if args.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            generated = _streamed(http, f"{url}/v1/chat/completions", body, headers)
        else:
            r = http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            r.raise_for_status()
            generated = int(r.json()["usage"]["completion_tokens"])
        if generated != tokens:
            raise SystemExit(f"{url} generated {generated} tokens, not {tokens}")

    clients = [httpx.Client(timeout=900) for _ in range(args.clients)]
    try:
        one(clients[0], "List three colours.", 8)  # this turn's connections
        with ThreadPoolExecutor(args.clients) as pool:
            start = time.perf_counter()
            if kind == "single":
                one(clients[0], QUESTIONS[0], args.tokens)
            else:
                jobs = [
                    pool.submit(one, clients[i], QUESTIONS[i % len(QUESTIONS)], args.tokens)
                    for i in range(args.clients)
                ]
                for job in jobs:
                    job.result()
            return time.perf_counter() - start
    finally:
        for http in clients:
            http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=512, help="context per slot")
    parser.add_argument("--flash-attention", choices=("on", "off"), default="off")
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--per-process", type=int, default=3, help="rounds before both restart")
    parser.add_argument(
        "--stream", action="store_true", help="streamed chats (SSE, usage in the last event)"
    )
    args = parser.parse_args()
    if args.model is None:
        from sipp import models

        args.model = models.pull("smollm2-135m-instruct", verify=False)
    bias = {str(t): -100 for t in eog_tokens(args.model)}
    sides = {"sipp": sipp_server, "llama-server": llama_server}
    kinds = {"single": args.tokens, "concurrent": args.tokens * args.clients}
    # Per side and kind: each round's rate (both runs together), and each run's rate. A
    # side's k-th run and the other side's k-th run are neighbours (A B, then B A).
    rates: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in sides}
    runs: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in sides}
    with tempfile.TemporaryDirectory(prefix="sipp-bench-http-") as tmp:
        up = ExitStack()  # the servers of the current group of rounds
        servers: dict[str, Server] = {}
        try:
            for i in range(args.rounds):
                if i % args.per_process == 0:
                    up.close()
                    up = ExitStack()
                    servers = {
                        name: up.enter_context(run(args, Path(tmp))) for name, run in sides.items()
                    }
                    for server in servers.values():
                        warm_up(server.url, bias)
                        hold(server.proc)
                names = list(sides) if i % 2 == 0 else list(reversed(sides))
                order = abba(*names)
                line = []
                for kind, tokens in kinds.items():
                    taken: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
                    for name in order:
                        resume(servers[name].proc)
                        time.sleep(SETTLE_S)
                        seconds = measure(servers[name].url, kind, args, bias)
                        hold(servers[name].proc)
                        taken[name].append((tokens, seconds))
                        runs[name][kind].append(tokens / seconds)
                    for name in sides:
                        rates[name][kind].append(combined(taken[name]))
                    line.append(
                        f"{kind} "
                        + "  ".join(
                            f"{name} {' '.join(f'{t / s:5.1f}' for t, s in taken[name])}"
                            for name in names
                        )
                        + f"  ratio {rates['sipp'][kind][-1] / rates['llama-server'][kind][-1]:.3f}"
                    )
                print(f"round {i + 1} ({' > '.join(order)}) tok/s: " + "   ".join(line), flush=True)
        finally:
            up.close()
    for name, by_kind in rates.items():
        for kind, values in by_kind.items():
            print(f"{name:12} {kind:10} {spread(values, '.1f', 'tok/s')}")
    for label, by in (("per round", rates), ("per pair: ", runs)):
        for kind in kinds:
            ratios = [
                a / b for a, b in zip(by["sipp"][kind], by["llama-server"][kind], strict=True)
            ]
            print(f"sipp / llama-server {kind:10} {label} {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
