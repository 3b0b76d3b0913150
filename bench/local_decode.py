"""Single-stream generation tokens/s: sipp vs a raw llama-cpp-python low-level loop.

Each side runs in its own process, one llama context per process: two contexts in
one process each bring a ggml thread pool and on 2 cores they slow each other
down (docs/architecture.md, traps). The two processes stay up for --per-process
rounds and take turns: the driver tells one to generate, waits for its figure,
then tells the other, while the idle one is stopped (SIGSTOP). The two figures of a
round are thus a second or less apart, so the machine's speed, which drifts over
seconds here, is nearly the same for both; rounds alternate which side goes first,
and fresh processes every --per-process rounds keep one process's luck (where its
memory landed) from deciding the run.

Both sides use the same library build, model, thread count, context size, load
parameters (extra buffer types off on AMX hosts, flash attention off, as sipp
configures a CPU context), the same prompt and the same sampler chain: a logit
bias that bans every end-of-generation token of the vocabulary, then greedy, so
each side generates exactly --tokens tokens. Each process warms up on another
prompt first (sipp with its prefix cache off, so every timed request prefills its
whole prompt, as the raw loop does after clearing its memory).

The figure is wall time: for sipp, `client.query(...).result()` from the call to
the response; for the raw loop, tokenizing and prefilling the prompt, then
`llama_decode` + sampling + `llama_token_to_piece` until --tokens tokens are out.
tokens/s = --tokens / that time. Prints each round, then medians with spread.

    ./dev bench local_decode [--model PATH] [--rounds 7] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from _eog import BAN, eog_tokens
from _stats import spread
from _turns import Child, serve

PROMPT = "Once upon a time, in a small village by the sea, there lived"
WARMUP_PROMPT = "The recipe calls for flour, water and"


class Prompts(NamedTuple):
    timed: str
    warmup: str


@contextlib.contextmanager
def raw_side(
    model_path: Path, n_tokens: int, threads: int, n_ctx: int, eog: list[int], prompts: Prompts
) -> Iterator[Callable[[], dict[str, float]]]:
    """Load once; each call of the yielded function times one generation."""
    import llama_cpp as lc

    from sipp.local._llama import backend_init, cpu_has_amx

    backend_init()  # same llama.cpp init as sipp (routes its log to Python logging)
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = not cpu_has_amx()
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.n_seq_max = 1
    cp.offload_kqv = cp.op_offload = False
    cp.no_perf = True
    cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lc.llama_init_from_model(model, cp)
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    bias = (lc.llama_logit_bias * len(eog))(*[lc.llama_logit_bias(token=t, bias=BAN) for t in eog])
    buf = ctypes.create_string_buffer(64)

    # An encoder-decoder model (T5) encodes the prompt, then decodes from its start token.
    encoder = lc.llama_model_has_encoder(model) and lc.llama_model_has_decoder(model)
    start_token = lc.llama_model_decoder_start_token(model)
    if start_token < 0:
        start_token = lc.llama_vocab_bos(vocab)

    def check(status: int, what: str) -> None:
        if status != 0:
            raise SystemExit(f"{what} failed with status {status}")

    def decode(batch: object) -> None:
        check(lc.llama_decode(ctx, batch), "llama_decode")

    def generate(prompt: str, n: int) -> tuple[int, int]:
        sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(
            sampler, lc.llama_sampler_init_logit_bias(n_vocab, len(eog), bias)
        )
        lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
        data = prompt.encode()
        toks = (lc.llama_token * 256)()
        n_prompt = lc.llama_tokenize(vocab, data, len(data), toks, 256, True, True)
        one = (lc.llama_token * 1)()
        if encoder:
            check(lc.llama_encode(ctx, lc.llama_batch_get_one(toks, n_prompt)), "llama_encode")
            token, generated = start_token, 0
        else:
            decode(lc.llama_batch_get_one(toks, n_prompt))
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            lc.llama_token_to_piece(vocab, token, buf, 64, 0, False)
            generated = 1
        while generated < n:
            one[0] = token
            decode(lc.llama_batch_get_one(one, 1))
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            lc.llama_token_to_piece(vocab, token, buf, 64, 0, False)
            generated += 1
        lc.llama_sampler_free(sampler)
        return n_prompt, generated

    def measure() -> dict[str, float]:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        start = time.perf_counter()
        n_prompt, generated = generate(prompts.timed, n_tokens)
        seconds = time.perf_counter() - start
        return {"prompt_tokens": n_prompt, "generated": generated, "seconds": seconds}

    generate(prompts.warmup, 8)
    try:
        yield measure
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


@contextlib.contextmanager
def sipp_side(
    model_path: Path, n_tokens: int, threads: int, n_ctx: int, eog: list[int], prompts: Prompts
) -> Iterator[Callable[[], dict[str, float]]]:
    """Load once; each call of the yielded function times one `query().result()`."""
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

    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads),
        cache=CacheRuntimeConfig(mode="off"),
    )
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=dict.fromkeys(eog, BAN)))
    with SippClient() as client:
        endpoint = client.add("bench", LocalModelDescriptor(model_path, config))
        warm = SippTextOptions(max_tokens=8, temperature=0)
        client.query(prompts.warmup, endpoint=endpoint, options=warm, local=local).result()
        options = SippTextOptions(max_tokens=n_tokens, temperature=0)

        def measure() -> dict[str, float]:
            start = time.perf_counter()
            response = client.query(
                prompts.timed, endpoint=endpoint, options=options, local=local
            ).result()
            seconds = time.perf_counter() - start
            assert response.usage is not None
            return {
                "prompt_tokens": response.usage.input_tokens,
                "generated": response.usage.output_tokens,
                "seconds": seconds,
            }

        yield measure


SIDES = {"raw": raw_side, "sipp": sipp_side}


def start_side(side: str, args: argparse.Namespace, model_path: Path, eog: list[int]) -> Child:
    cmd = [
        sys.executable,
        __file__,
        "--side", side,
        "--model", str(model_path),
        "--tokens", str(args.tokens),
        "--threads", str(args.threads),
        "--ctx", str(args.ctx),
        "--eog", ",".join(map(str, eog)),
        "--prompt", args.prompt,
        "--warmup-prompt", args.warmup_prompt,
    ]  # fmt: skip
    return Child(side, cmd)


def main(argv: list[str] | None = None, description: str | None = None) -> None:
    """Run the benchmark; `argv` and `description` let another script (t5_query.py) run
    it with its own model, prompts and defaults."""
    parser = argparse.ArgumentParser(
        description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument(
        "--per-process", type=int, default=5, help="rounds before both sides restart"
    )
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--warmup-prompt", default=WARMUP_PROMPT)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--eog", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:  # a child: measures when the driver says so
        eog = [int(t) for t in args.eog.split(",") if t]
        prompts = Prompts(args.prompt, args.warmup_prompt)
        side = SIDES[args.side]
        with side(args.model, args.tokens, args.threads, args.ctx, eog, prompts) as measure:
            serve(measure, sys.stdin)
        return

    from sipp import models as sipp_models
    from sipp.local._llama import cpu_has_amx

    model_path = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    eog = eog_tokens(model_path)
    print(
        f"model={model_path.name} tokens={args.tokens} threads={args.threads} n_ctx={args.ctx} "
        f"extra_bufts={'off (AMX host)' if cpu_has_amx() else 'on'} "
        f"end-of-generation tokens banned on both sides: {eog}; one process per side, "
        f"new ones every {args.per_process} rounds"
    )
    rates: dict[str, list[float]] = {"raw": [], "sipp": []}
    sides: dict[str, Child] = {}
    for i in range(args.rounds):
        if i % args.per_process == 0:
            for side in sides.values():
                side.close()
            sides = {name: start_side(name, args, model_path, eog) for name in SIDES}
        order = ("raw", "sipp") if i % 2 == 0 else ("sipp", "raw")
        got = {name: sides[name].measure() for name in order}
        for name, result in got.items():
            if result["generated"] != args.tokens:
                raise SystemExit(f"{name} generated {result['generated']}, not {args.tokens}")
        if got["raw"]["prompt_tokens"] != got["sipp"]["prompt_tokens"]:
            raise SystemExit(f"the sides tokenized the prompt differently: {got}")
        for side in rates:
            rates[side].append(args.tokens / got[side]["seconds"])
        r, s = rates["raw"][-1], rates["sipp"][-1]
        print(
            f"round {i + 1} ({order[0]} first): raw {r:7.1f} tok/s   sipp {s:7.1f} tok/s   "
            f"ratio {s / r:.3f}",
            flush=True,
        )
    for side in sides.values():
        side.close()
    ratios = [s / r for s, r in zip(rates["sipp"], rates["raw"])]
    print(f"raw  {spread(rates['raw'], unit='tok/s')}")
    print(f"sipp {spread(rates['sipp'], unit='tok/s')}")
    print(f"ratio sipp/raw {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
