"""Aggregate generated tokens/s with 8 concurrent chat requests.

sipp (one endpoint, 8 slots, continuous batching) vs llama-cpp-python's own
server (`python -m llama_cpp.server`, which serialises requests) on the same
model, threads, prompts and max_tokens, both greedy. The server runs with
llama.cpp extra buffer types off (see bench/_baseline_server.py), as sipp does
on AMX hosts. Rounds alternate; prints each round, medians, spread and the
ratios sipp/server and sipp/C++ (llama-batched-bench's 189 tok/s, 8 sequences,
measured on this machine type with the same model).

    ./dev bench batched_throughput [--rounds 5] [--tokens 128] [--clients 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _stats import spread
from sipp import (
    ChatMessage,
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp import models as sipp_models

CPP_BATCHED_TOKENS_PER_S = 189.0
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>, <reponame>), banned on both sides so
# every request decodes exactly --tokens tokens: equal work, comparable tokens/s.
BAN_EOG = {0: -100.0, 2: -100.0, 4: -100.0}
QUESTIONS = [
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "What makes a good cup of coffee?",
    "Tell me about the history of the printing press.",
    "How do airplanes stay in the air?",
    "Why is the sky blue?",
    "Describe a walk through a forest in autumn.",
    "How does a computer store numbers?",
]


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def sipp_round(client: SippClient, endpoint: EndpointRef, n: int, tokens: int) -> tuple[float, int]:
    opts = SippTextOptions(max_tokens=tokens, temperature=0)
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=BAN_EOG))
    start = time.perf_counter()
    runs = [
        client.chat(
            [ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])],
            endpoint=endpoint,
            options=opts,
            local=local,
        )
        for i in range(n)
    ]
    generated = 0
    for run in runs:
        usage = run.result().usage
        assert usage is not None
        generated += usage.output_tokens
    return time.perf_counter() - start, generated


def server_round(base: str, n: int, tokens: int) -> tuple[float, int]:
    def one(i: int) -> int:
        body = {
            "messages": _messages(i),
            "max_tokens": tokens,
            "temperature": 0,
            "logit_bias": {str(k): v for k, v in BAN_EOG.items()},
        }
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        generated = sum(pool.map(one, range(n)))
    return time.perf_counter() - start, generated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, threads: int, n_ctx: int) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("_baseline_server.py")),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_gpu_layers",
        "0",
        "--verbose",
        "False",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"baseline server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("baseline server did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--flash-attention", choices=["off", "on"], default="off")
    args = parser.parse_args()
    model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    n_ctx = 1024
    print(
        f"model={model.name} clients={args.clients} max_tokens={args.tokens} threads={args.threads}; "
        "baseline server loads with extra buffer types off (AMX crash otherwise)"
    )
    server, base = start_server(model, args.threads, n_ctx * args.clients)
    ours, theirs = [], []
    try:
        config = NativeRuntimeConfig(
            context=ContextRuntimeConfig(
                n_ctx=n_ctx, n_parallel=args.clients, n_threads=args.threads
            )
        )
        with SippClient() as client:
            endpoint = client.add("bench", LocalModelDescriptor(model, config))
            sipp_round(client, endpoint, args.clients, 8)  # warm up both sides
            server_round(base, 1, 8)
            for i in range(args.rounds):
                t_s, n_s = server_round(base, args.clients, args.tokens)
                t_o, n_o = sipp_round(client, endpoint, args.clients, args.tokens)
                theirs.append(n_s / t_s)
                ours.append(n_o / t_o)
                print(
                    f"round {i + 1}: server {n_s / t_s:6.1f} tok/s ({n_s} tok)   "
                    f"sipp {n_o / t_o:6.1f} tok/s ({n_o} tok)   ratio {ours[-1] / theirs[-1]:.2f}"
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratios = [o / t for o, t in zip(ours, theirs)]
    print(f"server {spread(theirs, unit='tok/s')}")
    print(f"sipp   {spread(ours, unit='tok/s')}")
    print(f"ratio sipp/server {spread(ratios, '.2f')}")
    print(
        f"ratio sipp/C++ batched ({CPP_BATCHED_TOKENS_PER_S:.0f} tok/s) median "
        f"{statistics.median(ours) / CPP_BATCHED_TOKENS_PER_S:.2f}"
    )


if __name__ == "__main__":
    main()
