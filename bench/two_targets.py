"""Two local targets in one process: does an embedding model slow the chat model?

The semantic cache needs a chat model and an embedding model loaded side by side.
This measures the chat target's single-stream generation tokens/s (the same
request as local_decode.py: greedy, end-of-generation tokens banned, exactly
--tokens tokens, wall time of `query().result()`) in three situations, each in a
fresh process, rotating which goes first:

* `alone`: only the chat model is loaded;
* `idle`:  the embedding model is loaded too (and has embedded once), then idle;
* `busy`:  a second thread embeds texts back to back for the whole timed request
           (its embeddings/s is printed too).

Every context keeps its own ggml thread pool, whose idle workers poll briefly and
then sleep (`sipp.local._llama.ThreadPool`), so an idle model costs no CPU. Two busy
ones take turns on the cores through sipp's process-wide CPU budget
(`sipp.local._llama.CpuBudget`; without it they spun against each other at ggml's
barriers and the chat model fell to a few tokens/s). `--embed-threads` caps the
embedding context's threads (its `n_threads`): 1-thread contexts run side by side.

    ./dev bench two_targets [--rounds 5] [--tokens 128] [--threads 2] [--embed-threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from _eog import BAN, eog_tokens
from _stats import spread
from local_decode import PROMPT, WARMUP_PROMPT

SCENARIOS = ("alone", "idle", "busy")
EMBED_TEXTS = [
    "How do I reset my password?",
    "The invoice for March is attached to this message.",
    "Turn on dark mode in the settings of the mobile app, please.",
    "What is the refund policy for orders shipped outside the country?",
]


def measure(args: argparse.Namespace, eog: list[int]) -> dict[str, float]:
    from sipp import (
        CacheRuntimeConfig,
        ContextRuntimeConfig,
        LocalModelDescriptor,
        LocalTextOptions,
        NativeRuntimeConfig,
        SamplingRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    def config(threads: int, embeddings: bool = False) -> NativeRuntimeConfig:
        context = ContextRuntimeConfig(n_ctx=args.ctx, n_threads=threads, n_threads_batch=threads)
        if embeddings:
            context = ContextRuntimeConfig(
                n_ctx=512, n_threads=threads, n_threads_batch=threads, embeddings=True,
                pooling="mean",
            )  # fmt: skip
        return NativeRuntimeConfig(context=context, cache=CacheRuntimeConfig(mode="off"))

    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=dict.fromkeys(eog, BAN)))
    embedded = 0
    with SippClient() as client:
        chat = client.add("chat", LocalModelDescriptor(args.model, config(args.threads)))
        if args.scenario != "alone":
            embed = client.add(
                "embed",
                LocalModelDescriptor(args.embed_model, config(args.embed_threads, embeddings=True)),
            )
            client.embed(EMBED_TEXTS[0], endpoint=embed).result()
        warm = SippTextOptions(max_tokens=8, temperature=0)
        client.query(WARMUP_PROMPT, endpoint=chat, options=warm, local=local).result()

        stop = threading.Event()

        def embed_until_stopped() -> None:
            nonlocal embedded
            while not stop.is_set():
                client.embed(EMBED_TEXTS[embedded % len(EMBED_TEXTS)], endpoint=embed).result()
                embedded += 1

        worker = threading.Thread(target=embed_until_stopped, daemon=True)
        if args.scenario == "busy":
            worker.start()
            time.sleep(0.2)  # the embedding loop is running before the timed request starts
        options = SippTextOptions(max_tokens=args.tokens, temperature=0)
        start = time.perf_counter()
        response = client.query(PROMPT, endpoint=chat, options=options, local=local).result()
        seconds = time.perf_counter() - start
        embedded_then = embedded
        stop.set()
        if worker.is_alive():
            worker.join()
    assert response.usage is not None
    return {
        "generated": response.usage.output_tokens,
        "seconds": seconds,
        "embeddings_per_s": embedded_then / seconds if args.scenario == "busy" else 0.0,
    }


def run(scenario: str, args: argparse.Namespace, eog: list[int]) -> dict[str, float]:
    cmd = [
        sys.executable, __file__,
        "--scenario", scenario,
        "--model", str(args.model),
        "--embed-model", str(args.embed_model),
        "--tokens", str(args.tokens),
        "--threads", str(args.threads),
        "--embed-threads", str(args.embed_threads),
        "--ctx", str(args.ctx),
        "--eog", ",".join(map(str, eog)),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{scenario} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["generated"] != args.tokens:
        raise SystemExit(f"{scenario} generated {result['generated']} tokens, not {args.tokens}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="chat model (default model)")
    parser.add_argument("--embed-model", type=Path, default=None, help="all-MiniLM-L6-v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--embed-threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--scenario", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--eog", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:  # a child: one measurement, printed as JSON
        print(json.dumps(measure(args, [int(t) for t in args.eog.split(",") if t])))
        return

    from sipp import models as sipp_models

    args.model = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    args.embed_model = args.embed_model or sipp_models.pull("all-minilm-l6-v2")
    eog = eog_tokens(args.model)
    print(
        f"chat={args.model.name} embed={args.embed_model.name} tokens={args.tokens} "
        f"threads={args.threads} embed_threads={args.embed_threads}; one process per run"
    )
    rates: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    embeds: list[float] = []
    for i in range(args.rounds):
        order = SCENARIOS[i % 3 :] + SCENARIOS[: i % 3]
        line = []
        for scenario in order:
            got = run(scenario, args, eog)
            rates[scenario].append(args.tokens / got["seconds"])
            if scenario == "busy":
                embeds.append(got["embeddings_per_s"])
            line.append(f"{scenario} {rates[scenario][-1]:6.1f}")
        print(f"round {i + 1}: " + "   ".join(line) + " tok/s", flush=True)
    for scenario in SCENARIOS:
        print(f"{scenario:5} {spread(rates[scenario], unit='tok/s')}")
    for scenario in ("idle", "busy"):
        ratios = [x / a for x, a in zip(rates[scenario], rates["alone"])]
        print(f"ratio {scenario}/alone {spread(ratios, '.3f')}")
    print(f"embeddings while busy {spread(embeds, unit='/s')}")


if __name__ == "__main__":
    main()
