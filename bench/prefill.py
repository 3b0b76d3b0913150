"""Prefill tokens/s: sipp against llama.cpp's own tools, on the same prompt shapes.

Two shapes, each at the same context size on every side:

* `8x40`: 8 distinct prompts of exactly 40 tokens arriving together (one client
  call each, back to back), 8 slots of --ctx tokens. Against `llama-batched-bench
  -npl 8 -npp 40` (its prompt phase: 8 sequences decoded in one batch).
* `1x1500`: one prompt of exactly 1,500 tokens, 1 slot of --ctx tokens. Against
  `llama-batched-bench -npl 1 -npp 1500` and `llama-bench -p 1500`.

sipp's figure is wall time from the first `query()` to the last response with
`max_tokens=1`: tokenizing, every prefill decode, and sampling the first token.
It also reports how many decode steps the engine took (the fewest `n_batch`
allows is ceil(prompt tokens / n_batch)). The tools report their own prompt time.
Same model, threads, n_batch/n_ubatch (512/512), flash attention off, repacking
off on AMX hosts, one KV stream per sequence. Every side runs in its own process,
one llama context per process; rounds rotate the order of the sides. Prints each
round, then medians with spread and the ratios sipp / tool.

    python bench/prefill.py [--model PATH] [--rounds 5] [--threads 2] [--ctx 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _llama_tools import ensure_tools, tool_env
from _stats import spread

N_BATCH = N_UBATCH = 512
SHAPES = {"8x40": (8, 40), "1x1500": (1, 1500)}
WORDS = [
    "river",
    "stone",
    "garden",
    "window",
    "bread",
    "music",
    "paper",
    "cloud",
    "winter",
    "light",
    "table",
    "green",
    "horse",
    "summer",
    "letter",
    "mountain",
    "silver",
    "market",
    "orange",
    "bridge",
    "forest",
    "candle",
]


def exact_prompts(model_path: Path, count: int, length: int) -> list[str]:
    """`count` distinct texts that tokenize (as sipp tokenizes a prompt) to `length` tokens."""
    import llama_cpp as lc

    from sipp.local._llama import backend_init

    backend_init()
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    vocab = lc.llama_model_get_vocab(model)
    buf = (lc.llama_token * 8192)()

    def n_tokens(text: str) -> int:
        data = text.encode()
        return int(lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, True))

    prompts = []
    for i in range(count):
        words: list[str] = [f"Note {i}:"]
        j = i
        while n_tokens(" ".join(words)) < length:
            words.append(WORDS[j % len(WORDS)])
            j += 1
        while n_tokens(" ".join(words)) > length:  # a last word of two tokens: swap it
            words[-1] = WORDS[j % len(WORDS)]
            j += 1
        prompts.append(" ".join(words))
    lc.llama_model_free(model)
    return prompts


# ---------------------------------------------------------------- sipp (child process)
def sipp_side(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    from sipp import (
        CacheRuntimeConfig,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        NativeRuntimeConfig,
        ObservabilityRuntimeConfig,
        PlacementRuntimeConfig,
        SippClient,
        SippTextOptions,
    )
    from sipp.local._llama import cpu_has_amx

    config = NativeRuntimeConfig(
        placement=PlacementRuntimeConfig(use_extra_bufts=not cpu_has_amx()),
        context=ContextRuntimeConfig(
            n_ctx=args.ctx,
            n_parallel=len(prompts),
            n_batch=N_BATCH,
            n_ubatch=N_UBATCH,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            flash_attention=False,
        ),
        cache=CacheRuntimeConfig(mode="off"),  # the warm-up leaves no prefix behind
        observability=ObservabilityRuntimeConfig(runtime_metrics=True),
    )
    opts = SippTextOptions(max_tokens=1, temperature=0)
    with SippClient() as client:
        ref = client.add("bench", LocalModelDescriptor(args.model, config))
        warm = [f"Warm-up {i}: {p}" for i, p in enumerate(prompts)]
        for run in [client.query(p, endpoint=ref, options=opts) for p in warm]:
            run.result()
        steps = client.runtime_metrics(ref)["steps"]
        start = time.perf_counter()
        runs = [client.query(p, endpoint=ref, options=opts) for p in prompts]
        usages = [run.result().usage for run in runs]
        seconds = time.perf_counter() - start
        steps = client.runtime_metrics(ref)["steps"] - steps
    return {
        "seconds": seconds,
        "prompt_tokens": [u.input_tokens for u in usages if u is not None],
        "steps": steps,
    }


def run_sipp(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--side", "sipp", "--model", str(args.model),
        "--threads", str(args.threads), "--ctx", str(args.ctx),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, input=json.dumps(prompts), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"sipp side failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- llama.cpp tools
def _repack() -> list[str]:
    from sipp.local._llama import cpu_has_amx

    return ["--no-repack"] if cpu_has_amx() else []


def batched_bench(args: argparse.Namespace, count: int, length: int) -> float:
    """Seconds llama-batched-bench takes to prefill `count` prompts of `length` tokens."""
    cmd = [
        str(ensure_tools() / "llama-batched-bench"),
        "-m", str(args.model),
        "-c", str(args.ctx * count),
        "-b", str(N_BATCH), "-ub", str(N_UBATCH),
        "-t", str(args.threads), "-tb", str(args.threads),
        "-ngl", "0", "-fa", "off",
        "-no-kvu",  # one KV stream per sequence, as sipp's slots
        "-npp", str(length), "-ntg", "1", "-npl", str(count),
        "--output-format", "jsonl",
        *_repack(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), check=False)
    rows = [
        json.loads(line)
        for line in (done.stdout + done.stderr).splitlines()
        if line.startswith('{"n_kv_max"')
    ]
    if done.returncode != 0 or len(rows) != 1:
        raise SystemExit(f"llama-batched-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(rows[0]["t_pp"])


def llama_bench(args: argparse.Namespace, length: int) -> float:
    """Seconds llama-bench takes to prefill one prompt of `length` tokens (one repetition)."""
    cmd = [
        str(ensure_tools() / "llama-bench"),
        "-m", str(args.model),
        "-p", str(length), "-n", "0",
        "-b", str(N_BATCH), "-ub", str(N_UBATCH),
        "-t", str(args.threads), "-ngl", "0", "-fa", "off",
        "-r", "1", "-o", "jsonl",
        *(["--repack", "0"] if _repack() else []),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=tool_env(), check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(rows) != 1:
        raise SystemExit(f"llama-bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return float(rows[0]["avg_ns"]) / 1e9


# ---------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--side", choices=["sipp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one measurement, printed as JSON
        print(json.dumps(sipp_side(args, json.loads(sys.stdin.read()))))
        return

    from sipp import models as sipp_models

    args.model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    tools = ensure_tools()
    print(
        f"model={args.model.name} threads={args.threads} n_ctx/seq={args.ctx} "
        f"n_batch=n_ubatch={N_BATCH} flash_attention=off repack={'off' if _repack() else 'on'}; "
        f"C++ tools from {tools}"
    )
    for shape in SHAPES if args.shape == "all" else [args.shape]:
        count, length = SHAPES[shape]
        prompts = exact_prompts(args.model, count, length)
        tokens = count * length
        sides: dict[str, Any] = {
            "sipp": lambda p=prompts: run_sipp(args, p),
            "batched-bench": lambda c=count, n=length: {"seconds": batched_bench(args, c, n)},
        }
        if count == 1:
            sides["llama-bench"] = lambda n=length: {"seconds": llama_bench(args, n)}
        names = list(sides)
        rates: dict[str, list[float]] = {s: [] for s in names}
        steps: list[int] = []
        for i in range(args.rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            for side in order:
                got = sides[side]()
                if side == "sipp":
                    if got["prompt_tokens"] != [length] * count:
                        raise SystemExit(
                            f"sipp prefilled {got['prompt_tokens']}, not {length} each"
                        )
                    steps.append(int(got["steps"]))
                rates[side].append(tokens / got["seconds"])
            print(
                f"[{shape}] round {i + 1} ({' > '.join(order)}): "
                + "   ".join(f"{s} {rates[s][-1]:7.1f} tok/s" for s in names)
                + f"   sipp decode steps {steps[-1]}",
                flush=True,
            )
        fewest = -(-tokens // N_BATCH)
        print(f"[{shape}] {tokens} prompt tokens; fewest decodes n_batch allows: {fewest}")
        for side in names:
            print(f"[{shape}] {side:13s} {spread(rates[side], unit='tok/s')}")
        for side in names[1:]:
            ratios = [s / o for s, o in zip(rates["sipp"], rates[side])]
            print(f"[{shape}] ratio sipp/{side} {spread(ratios, '.2f')}")


if __name__ == "__main__":
    main()
