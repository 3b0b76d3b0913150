"""Encoder-decoder (T5) query tokens/s: sipp vs a raw llama-cpp-python encode/decode loop.

The model is the tiny random-weight T5 the tests generate (tests/make_tiny_t5.py), or
--model. Each side runs in its own process, one llama context per process (two in one
process fight over 2 cores; docs/architecture.md, traps), and rounds alternate which
side goes first.

Both sides use the same library build, model, thread count, context size, load
parameters (extra buffer types off on AMX hosts, flash attention off), the same prompt
and the same sampler chain: a logit bias banning every end-of-generation token, then
greedy, so each side generates exactly --tokens tokens. Each process warms up on
another prompt first.

The figure is wall time: for sipp, `client.query(...).result()` from the call to the
response; for the raw loop, tokenizing the prompt, `llama_encode`, then `llama_decode`
from the decoder-start token + sampling + `llama_token_to_piece` until --tokens tokens
are out. tokens/s = --tokens / that time. The tiny model decodes a token in well under
a millisecond, so this measures the per-token cost around llama.cpp, the worst case for
sipp's share; a real T5 spends far longer inside llama.cpp per token. Prints each
round, then medians with spread.

    ./dev bench t5_query [--model PATH] [--rounds 7] [--tokens 256] [--threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

from _eog import BAN, eog_tokens
from _stats import spread

PROMPT = "summarize: Trains leave the station every hour, except on Sunday mornings."
WARMUP_PROMPT = "translate English to German: Hello, world."


def raw_side(
    model_path: Path, n_tokens: int, threads: int, n_ctx: int, eog: list[int]
) -> dict[str, float]:
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
    start_token = lc.llama_model_decoder_start_token(model)
    if start_token < 0:
        start_token = lc.llama_vocab_bos(vocab)
    bias = (lc.llama_logit_bias * len(eog))(*[lc.llama_logit_bias(token=t, bias=BAN) for t in eog])
    buf = ctypes.create_string_buffer(64)

    def check(status: int, what: str) -> None:
        if status != 0:
            raise SystemExit(f"{what} failed with status {status}")

    def generate(prompt: str, n: int) -> tuple[int, int]:
        sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(
            sampler, lc.llama_sampler_init_logit_bias(n_vocab, len(eog), bias)
        )
        lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
        data = prompt.encode()
        toks = (lc.llama_token * 256)()
        n_prompt = lc.llama_tokenize(vocab, data, len(data), toks, 256, True, True)
        check(lc.llama_encode(ctx, lc.llama_batch_get_one(toks, n_prompt)), "llama_encode")
        one = (lc.llama_token * 1)()
        token, generated = start_token, 0
        while generated < n:
            one[0] = token
            check(lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1)), "llama_decode")
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            lc.llama_token_to_piece(vocab, token, buf, 64, 0, False)
            generated += 1
        lc.llama_sampler_free(sampler)
        return n_prompt, generated

    generate(WARMUP_PROMPT, 8)
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    start = time.perf_counter()
    n_prompt, generated = generate(PROMPT, n_tokens)
    seconds = time.perf_counter() - start
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return {"prompt_tokens": n_prompt, "generated": generated, "seconds": seconds}


def sipp_side(
    model_path: Path, n_tokens: int, threads: int, n_ctx: int, eog: list[int]
) -> dict[str, float]:
    from sipp import (
        ContextRuntimeConfig,
        LocalModelDescriptor,
        LocalTextOptions,
        NativeRuntimeConfig,
        SamplingRuntimeConfig,
        SippClient,
        SippTextOptions,
    )

    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads)
    )
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias=dict.fromkeys(eog, BAN)))
    with SippClient() as client:
        endpoint = client.add("bench", LocalModelDescriptor(model_path, config))
        warm = SippTextOptions(max_tokens=8, temperature=0)
        client.query(WARMUP_PROMPT, endpoint=endpoint, options=warm, local=local).result()
        options = SippTextOptions(max_tokens=n_tokens, temperature=0)
        start = time.perf_counter()
        response = client.query(PROMPT, endpoint=endpoint, options=options, local=local).result()
        seconds = time.perf_counter() - start
    assert response.usage is not None
    return {
        "prompt_tokens": response.usage.input_tokens,
        "generated": response.usage.output_tokens,
        "seconds": seconds,
    }


SIDES = {"raw": raw_side, "sipp": sipp_side}


def run_side(
    side: str, args: argparse.Namespace, model_path: Path, eog: list[int]
) -> dict[str, float]:
    """One measurement of `side` in a fresh process; its last stdout line is the result."""
    cmd = [
        sys.executable,
        __file__,
        "--side", side,
        "--model", str(model_path),
        "--tokens", str(args.tokens),
        "--threads", str(args.threads),
        "--ctx", str(args.ctx),
        "--eog", ",".join(map(str, eog)),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["generated"] != args.tokens:
        raise SystemExit(f"{side} generated {result['generated']} tokens, not {args.tokens}")
    return result


def _tiny_t5() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from make_tiny_t5 import generate

    return generate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=256)
    # One thread: the tiny model's matrices are too small for a second to pay off.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--side", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--eog", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one measurement, printed as JSON
        eog = [int(t) for t in args.eog.split(",") if t]
        measure = SIDES[args.side]
        print(json.dumps(measure(args.model, args.tokens, args.threads, args.ctx, eog)))
        return

    from sipp.local._llama import cpu_has_amx

    model_path = args.model or _tiny_t5()
    eog = eog_tokens(model_path)
    print(
        f"model={model_path.name} tokens={args.tokens} threads={args.threads} n_ctx={args.ctx} "
        f"extra_bufts={'off (AMX host)' if cpu_has_amx() else 'on'} "
        f"end-of-generation tokens banned on both sides: {eog}; one process per side and round"
    )
    rates: dict[str, list[float]] = {"raw": [], "sipp": []}
    for i in range(args.rounds):
        order = ("raw", "sipp") if i % 2 == 0 else ("sipp", "raw")
        got = {side: run_side(side, args, model_path, eog) for side in order}
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
    ratios = [s / r for s, r in zip(rates["sipp"], rates["raw"])]
    print(f"raw  {spread(rates['raw'], unit='tok/s')}")
    print(f"sipp {spread(rates['sipp'], unit='tok/s')}")
    print(f"ratio sipp/raw {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
