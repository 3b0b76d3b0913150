"""Aggregate generated tokens/s with 8 concurrent chat requests, against two baselines.

* sipp: one endpoint with --clients slots (continuous batching), --clients chats at once.
* server: llama-cpp-python's own server (`python -m llama_cpp.server`, which serialises
  requests), the same chats sent at once over HTTP.
* C++: llama.cpp's `llama-batched-bench`, built by bench/_llama_tools.py from the
  llama.cpp the pinned llama-cpp-python vendors, with the same cmake flags as the
  wheel: --clients sequences, each a prompt of the chats' mean token length, then
  --tokens - 1 decode steps of one token per sequence (the first token comes from
  the prompt's logits, as in sipp). It decodes random tokens and does not sample:
  the pure llama.cpp cost of the same batch shapes.

Same model, threads, context per sequence, batch sizes, flash attention (off unless
--flash-attention on, on every side), and weight repacking (off on AMX hosts, on
every side). sipp and the server run greedy with every end-of-generation token
banned, so each request generates exactly --tokens tokens; sipp runs with its
prefix cache off so its warm-up leaves it no head start. Every side runs in its own
process and computes only in its turn: sipp and the server stay up for --per-process
rounds, stopped (SIGSTOP) between turns (bench/_turns.py), and llama-batched-bench
runs as a new process each time. Each round runs sipp and C++ twice each, back to back in
the order A B B A (each at the ends in turn), and the server once, before or after them.
With --clients 1 this is the single-stream comparison against `llama-batched-bench` B=1.
tokens/s = generated tokens / wall time from the first request out to the last response
in (for C++: prompt plus generation time); a round's figure for sipp or C++ is its two
runs together. Prints each round, then medians with spread and the ratios sipp/server
and sipp/C++ (per round, and of single neighbouring runs to show what the order takes
out), and for sipp and C++ each phase's time: the prefill (to the last first token) and
the decode after it.

    ./dev bench batched_throughput [--rounds 5] [--tokens 128] [--clients 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from _eog import BAN, eog_tokens
from _llama_tools import ensure_tools, tool_env
from _stats import spread
from _turns import SETTLE_S, Child, abba, combined, serve

# Eight questions whose chat prompts are all 36 tokens under SmolLM2's template, as
# llama-batched-bench's prompts are all `-npp` tokens: with a KV stream per sequence,
# llama.cpp splits a batch into micro-batches that take equally many tokens of each
# sequence, so prompts of unequal length cost extra, smaller micro-batches that
# uniform ones never pay.
QUESTIONS = [
    "Explain how a bicycle works.",
    "Describe the water cycle briefly.",
    "What makes coffee taste good?",
    "Tell me about printing presses.",
    "How does an airplane fly?",
    "Why is the sky blue?",
    "Describe a forest in autumn.",
    "How do computers store numbers?",
]
WARMUP_QUESTION = "List three colours."
# The orders the sides run in, round by round (see main): sipp and C++ twice each, A B B A.
ORDERS = (
    (*abba("sipp", "cpp"), "server"),
    ("server", *abba("cpp", "sipp")),
    (*abba("cpp", "sipp"), "server"),
    ("server", *abba("sipp", "cpp")),
)
N_BATCH = N_UBATCH = 512  # sipp's defaults for a text context; given to every side


def _question(i: int) -> str:
    return QUESTIONS[i % len(QUESTIONS)]


# ---------------------------------------------------------------- sipp (child process)
@contextlib.contextmanager
def sipp_side(args: argparse.Namespace, eog: list[int]) -> Iterator[Callable[[], dict[str, Any]]]:
    """Load once; each call of the yielded function times one burst of chats."""
    from sipp import (
        CacheRuntimeConfig,
        ChatMessage,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        LocalTextOptions,
        NativeRuntimeConfig,
        PlacementRuntimeConfig,
        SamplingRuntimeConfig,
        SippClient,
        SippTextOptions,
    )
    from sipp.local._llama import cpu_has_amx

    config = NativeRuntimeConfig(
        placement=PlacementRuntimeConfig(use_extra_bufts=not cpu_has_amx()),
        context=ContextRuntimeConfig(
            n_ctx=args.ctx,
            n_parallel=args.clients,
            n_batch=N_BATCH,
            n_ubatch=N_UBATCH,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attention=args.flash_attention == "on",
        ),
        cache=CacheRuntimeConfig(mode="off"),
    )
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=dict.fromkeys(eog, BAN)))
    with SippClient() as client:
        endpoint = client.add("bench", LocalModelDescriptor(args.model, config))

        def chats(question: Any, tokens: int) -> dict[str, Any]:
            opts = SippTextOptions(max_tokens=tokens, temperature=0)
            start = time.perf_counter()
            runs = [
                client.chat(
                    [ChatMessage("user", question(i))], endpoint=endpoint, options=opts, local=local
                )
                for i in range(args.clients)
            ]
            done = [run.result() for run in runs]
            seconds = time.perf_counter() - start
            usages = [r.usage for r in done if r.usage is not None]
            stats = [r.local_stats for r in done if r.local_stats is not None]
            return {
                "seconds": seconds,
                "prompt_tokens": [u.input_tokens for u in usages],
                "generated": [u.output_tokens for u in usages],
                # The two phases, as llama-batched-bench reports them: from the engine's
                # taking the requests to the last first token, then on to the last token.
                "prefill_s": max(st.queue_ms + st.prefill_ms for st in stats) / 1000,
                "decode_s": max(st.decode_ms for st in stats) / 1000,
            }

        chats(lambda i: WARMUP_QUESTION, 8)
        yield lambda: chats(_question, args.tokens)


# ---------------------------------------------------------------- llama-cpp-python server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_side(args: argparse.Namespace, eog: list[int]) -> Iterator[Callable[[], dict[str, Any]]]:
    """Start the server once; each call of the yielded function times one burst."""
    from sipp.local._llama import cpu_has_amx

    port = _free_port()
    launcher = "_baseline_server.py" if cpu_has_amx() else None
    cmd = [
        sys.executable,
        *([str(Path(__file__).with_name(launcher))] if launcher else ["-m", "llama_cpp.server"]),
        "--model", str(args.model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(args.ctx * args.clients),
        "--n_batch", str(N_BATCH),
        "--n_ubatch", str(N_UBATCH),
        "--n_threads", str(args.threads),
        "--n_threads_batch", str(args.threads),
        "--n_gpu_layers", "0",
        "--flash_attn", str(args.flash_attention == "on"),
        "--verbose", "False",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"baseline server exited with {proc.returncode}")
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("baseline server did not start in 180 s")
            time.sleep(0.5)
        bias = {str(t): BAN for t in eog}

        def one(question: str, tokens: int) -> tuple[int, int]:
            body = {
                "messages": [{"role": "user", "content": question}],
                "max_tokens": tokens,
                "temperature": 0,
                "logit_bias": bias,
            }
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=900)
            r.raise_for_status()
            usage = r.json()["usage"]
            return int(usage["prompt_tokens"]), int(usage["completion_tokens"])

        def measure() -> dict[str, Any]:
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                usages = list(
                    pool.map(lambda i: one(_question(i), args.tokens), range(args.clients))
                )
            seconds = time.perf_counter() - start
            return {
                "seconds": seconds,
                "prompt_tokens": [p for p, _ in usages],
                "generated": [g for _, g in usages],
            }

        one(WARMUP_QUESTION, 8)
        yield measure
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ---------------------------------------------------------------- llama-batched-bench
def cpp_side(args: argparse.Namespace, prompt_tokens: int) -> dict[str, Any]:
    from sipp.local._llama import cpu_has_amx

    tool = ensure_tools() / "llama-batched-bench"
    cmd = [
        str(tool),
        "-m", str(args.model),
        "-c", str(args.ctx * args.clients),
        "-b", str(N_BATCH),
        "-ub", str(N_UBATCH),
        "-t", str(args.threads),
        "-tb", str(args.threads),
        "-ngl", "0",
        "-fa", args.flash_attention,
        "-no-kvu",  # one KV stream per sequence, as sipp's slots
        "-npp", str(prompt_tokens),
        "-ntg", str(args.tokens - 1),
        "-npl", str(args.clients),
        "--output-format", "jsonl",
        *(["--no-repack"] if cpu_has_amx() else []),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), check=False)
    rows = [
        json.loads(line)
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith('{"n_kv_max"')
    ]
    if done.returncode != 0 or len(rows) != 1:
        raise SystemExit(f"llama-batched-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    row = rows[0]
    return {
        "seconds": float(row["t"]),
        "prompt_tokens": [prompt_tokens] * args.clients,
        "generated": [args.tokens] * args.clients,  # tg decode steps + the prompt's token
        "prefill_s": float(row["t_pp"]),
        "decode_s": float(row["t_tg"]),
    }


# ---------------------------------------------------------------- driver
def start_child(side: str, args: argparse.Namespace, eog: list[int], tokens: int) -> Child:
    cmd = [
        sys.executable,
        __file__,
        "--side", side,
        "--model", str(args.model),
        "--tokens", str(tokens),
        "--clients", str(args.clients),
        "--threads", str(args.threads),
        "--ctx", str(args.ctx),
        "--flash-attention", args.flash_attention,
        "--eog", ",".join(map(str, eog)),
    ]  # fmt: skip
    return Child(side, cmd)


def _rate(result: dict[str, Any]) -> float:
    return sum(result["generated"]) / result["seconds"]


def checked(
    side: str, result: dict[str, Any], args: argparse.Namespace, tokens: int
) -> dict[str, Any]:
    if result["generated"] != [tokens] * args.clients:
        raise SystemExit(f"{side} generated {result['generated']}, not {tokens} per request")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--flash-attention", choices=["off", "on"], default="off")
    parser.add_argument(
        "--per-process", type=int, default=3, help="rounds before sipp and the server restart"
    )
    parser.add_argument("--side", choices=["sipp", "server"], help=argparse.SUPPRESS)
    parser.add_argument("--eog", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: measures when the driver says so
        eog = [int(t) for t in args.eog.split(",") if t]
        side = sipp_side if args.side == "sipp" else server_side
        with side(args, eog) as measure:
            serve(measure, sys.stdin)
        return

    from sipp import models as sipp_models
    from sipp.local._llama import cpu_has_amx

    args.model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    tools = ensure_tools()
    eog = eog_tokens(args.model)
    # The chats' prompt lengths under the model's template, for the C++ side's prompts.
    probe_side = start_child("sipp", args, eog, 1)
    probe = checked("sipp", probe_side.measure(), args, 1)["prompt_tokens"]
    probe_side.close()
    pp = round(sum(probe) / len(probe))
    print(
        f"model={args.model.name} clients={args.clients} tokens={args.tokens} "
        f"threads={args.threads} n_ctx/seq={args.ctx} flash_attention={args.flash_attention} "
        f"repack={'off (AMX host)' if cpu_has_amx() else 'on'}; end-of-generation tokens {eog} "
        f"banned; chat prompts {min(probe)}-{max(probe)} tokens, C++ prompts {pp}; "
        f"C++ tools from {tools}"
    )
    sides = ("sipp", "server", "cpp")
    rates: dict[str, list[float]] = {s: [] for s in sides}  # a round's runs together
    runs: dict[str, list[float]] = {"sipp": [], "cpp": []}  # each run; k-th runs neighbour
    phases: dict[str, list[tuple[float, float]]] = {"sipp": [], "cpp": []}  # prefill, decode s
    children: dict[str, Child] = {}
    for i in range(args.rounds):
        if i % args.per_process == 0:
            for child in children.values():
                child.close()
            children = {s: start_child(s, args, eog, args.tokens) for s in ("sipp", "server")}
        # sipp and C++ always run back to back, the server before or after them: the
        # goal's ratio compares figures taken seconds apart, not across the server's turn
        # (15 s with 8 chats), over which this host's speed drifts. Each restart starts one
        # order further on, so the side that runs right after the children restart changes
        # from one restart to the next, for any --per-process (with C++ always there it ran
        # at a median 91 against 108-112 tok/s elsewhere, B=1).
        order = ORDERS[(i % args.per_process + i // args.per_process) % len(ORDERS)]
        got: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        for side in order:
            if side == "cpp":
                time.sleep(SETTLE_S)
                result = cpp_side(args, pp)
            else:
                result = checked(side, children[side].measure(), args, args.tokens)
            got[side].append(result)
            if side in runs:
                runs[side].append(_rate(result))
        for side in sides:
            rates[side].append(combined([(sum(r["generated"]), r["seconds"]) for r in got[side]]))
        for side in phases:
            phases[side].append(
                (sum(r["prefill_s"] for r in got[side]), sum(r["decode_s"] for r in got[side]))
            )
        (sp, sd), (cp, cd) = phases["sipp"][-1], phases["cpp"][-1]
        print(
            f"round {i + 1} ({' > '.join(order)}): "
            + "   ".join(f"{s} {' '.join(f'{_rate(r):6.1f}' for r in got[s])} tok/s" for s in sides)
            + f"   sipp/server {rates['sipp'][-1] / rates['server'][-1]:.2f}"
            + f"   sipp/C++ {rates['sipp'][-1] / rates['cpp'][-1]:.3f}"
            + f"   (prefill sipp {sp:.2f} s, C++ {cp:.2f} s; decode sipp {sd:.2f} s, C++ {cd:.2f} s)",
            flush=True,
        )
    for child in children.values():
        child.close()
    print(f"server {spread(rates['server'], unit='tok/s')}")
    print(f"C++    {spread(rates['cpp'], unit='tok/s')}")
    print(f"sipp   {spread(rates['sipp'], unit='tok/s')}")
    pairs = list(zip(rates["sipp"], rates["server"], rates["cpp"]))
    print(f"ratio sipp/server {spread([s / v for s, v, _ in pairs], '.2f')}")
    print(f"ratio sipp/C++    {spread([s / c for s, _, c in pairs], '.3f')}")
    neighbours = [s / c for s, c in zip(runs["sipp"], runs["cpp"], strict=True)]
    print(f"  of single neighbouring runs {spread(neighbours, '.3f')}")
    # Where the ratio comes from: each phase's C++ time over sipp's (> 1: sipp faster).
    both = list(zip(phases["sipp"], phases["cpp"]))
    print(f"  prefill, C++ s / sipp s {spread([c[0] / s[0] for s, c in both], '.2f')}")
    print(f"  decode,  C++ s / sipp s {spread([c[1] / s[1] for s, c in both], '.2f')}")


if __name__ == "__main__":
    main()
