"""Weights in huge pages against weights mapped from the file: single-stream decode.

By default sipp reads a model that fits in memory into anonymous memory and collapses
it into 2 MiB transparent huge pages (`sipp.local.huge_pages`); `use_mmap = true` keeps
llama.cpp's mapping of the file in 4 KiB pages. Both sides are the same engine with
the same settings otherwise, each in a child process of its own, loaded once and
stopped while the other measures. A round is four turns in the order A B B A; a turn
is one warm-up token and then one greedy request of exactly --tokens tokens
(end-of-generation tokens banned), timed with `query().result()`. The ratio is
huge/mapped tokens/s per round, with its median's 95 % confidence interval.

    ./dev bench huge_page_weights [--rounds 40] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from _eog import BAN, eog_tokens
from _stats import spread
from _turns import Child, abba, combined, serve
from local_decode import PROMPT, WARMUP_PROMPT

SIDES = {"huge": None, "mapped": True}  # PlacementRuntimeConfig.use_mmap


def side(args: argparse.Namespace) -> None:
    """A child: load the model as `args.side` says, then measure a turn per input line."""
    from sipp import (
        CacheRuntimeConfig,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        LocalTextOptions,
        NativeRuntimeConfig,
        PlacementRuntimeConfig,
        SamplingRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    config = NativeRuntimeConfig(
        placement=PlacementRuntimeConfig(use_mmap=SIDES[args.side]),
        context=ContextRuntimeConfig(
            n_ctx=args.ctx, n_parallel=1, n_threads=args.threads, n_threads_batch=args.threads
        ),
        cache=CacheRuntimeConfig(mode="off"),
    )
    ban = [int(t) for t in args.eog.split(",") if t]
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=dict.fromkeys(ban, BAN)))
    with SippClient() as client:
        ref = client.add("bench", LocalModelDescriptor(args.model, config))

        def chat(prompt: str, tokens: int) -> float:
            opts = SippTextOptions(max_tokens=tokens, temperature=0)
            start = time.perf_counter()
            done = client.query(prompt, endpoint=ref, options=opts, local=local).result()
            assert done.usage is not None and done.usage.output_tokens == tokens
            return time.perf_counter() - start

        chat(WARMUP_PROMPT, 8)
        huge_kb = sum(
            int(line.split()[1])
            for line in Path("/proc/self/smaps_rollup").read_text().splitlines()
            if line.startswith("AnonHugePages:")
        )

        def turn() -> dict[str, Any]:
            chat(WARMUP_PROMPT, 1)  # the first decode after a pause pays for the caches
            return {"tokens": args.tokens, "seconds": chat(PROMPT, args.tokens), "huge_kb": huge_kb}

        serve(turn, sys.stdin)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default model)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--eog", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        side(args)
        return

    from sipp import models as sipp_models

    args.model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    eog = ",".join(str(t) for t in eog_tokens(args.model))
    common = [
        *("--model", str(args.model), "--tokens", str(args.tokens)),
        *("--threads", str(args.threads), "--ctx", str(args.ctx), "--eog", eog),
    ]
    children = {
        name: Child(name, [sys.executable, __file__, "--side", name, *common]) for name in SIDES
    }
    print(
        f"model={args.model.name} tokens={args.tokens} threads={args.threads} "
        f"rounds={args.rounds} (A B B A each)",
        flush=True,
    )
    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    ratios: list[float] = []
    huge_kb: dict[str, int] = {}
    try:
        for i in range(args.rounds):
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in SIDES}
            for name in abba(*(("huge", "mapped") if i % 2 == 0 else ("mapped", "huge"))):
                got = children[name].measure()
                runs[name].append((got["tokens"], got["seconds"]))
                huge_kb[name] = got["huge_kb"]
            for name in SIDES:
                rates[name].append(combined(runs[name]))
            ratios.append(rates["huge"][-1] / rates["mapped"][-1])
            print(
                f"round {i + 1}: huge {rates['huge'][-1]:.1f}  mapped {rates['mapped'][-1]:.1f}"
                f" tok/s  ratio {ratios[-1]:.3f}",
                flush=True,
            )
    finally:
        for child in children.values():
            child.close()
    for name in SIDES:
        print(f"{name:6} {spread(rates[name], unit='tok/s')}  AnonHugePages {huge_kb[name]} kB")
    if huge_kb["huge"] < args.model.stat().st_size // 2048:
        raise SystemExit(
            "the huge side's weights are not in huge pages on this host (THP off, or no "
            "MADV_COLLAPSE): both sides ran on 4 KiB pages"
        )
    print(f"huge / mapped tok/s {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
