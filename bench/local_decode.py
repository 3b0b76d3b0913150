"""Single-stream decode tokens/s: sipp vs a raw llama-cpp-python low-level loop.

Both sides use the same library build, model, thread count, context size,
load parameters (extra buffer types off on AMX hosts, as sipp does) and the
same prompt; both decode greedily. Rounds alternate between the two so that
machine noise hits both alike. Prints each round and the median ratio
sipp / raw with its spread.

    python bench/local_decode.py [--model PATH] [--rounds 7] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import llama_cpp as lc

from _stats import spread
from sipp import (
    ContextRuntimeConfig,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp import models as sipp_models
from sipp.local._llama import backend_init, cpu_has_amx

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def raw_tokens_per_second(model_path: Path, n_tokens: int, threads: int, n_ctx: int) -> float:
    backend_init()  # same llama.cpp init as sipp (routes its log to Python logging)
    mp = lc.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = not cpu_has_amx()
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
    cp.n_threads = cp.n_threads_batch = threads
    cp.n_seq_max = 1
    cp.flash_attn_type = 0  # as sipp configures a CPU context (see README, engine notes)
    ctx = lc.llama_init_from_model(model, cp)
    vocab = lc.llama_model_get_vocab(model)
    data = PROMPT.encode()
    toks = (lc.llama_token * 256)()
    n = lc.llama_tokenize(vocab, data, len(data), toks, 256, True, True)
    sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
    buf = ctypes.create_string_buffer(64)
    lc.llama_decode(ctx, lc.llama_batch_get_one(toks, n))
    one = (lc.llama_token * 1)()
    token = lc.llama_sampler_sample(sampler, ctx, -1)
    generated = 1
    start = time.perf_counter()
    while generated < n_tokens:
        lc.llama_token_to_piece(vocab, token, buf, 64, 0, False)
        one[0] = token
        lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1))
        token = lc.llama_sampler_sample(sampler, ctx, -1)
        generated += 1
    elapsed = time.perf_counter() - start
    lc.llama_sampler_free(sampler)
    lc.llama_free(ctx)
    lc.llama_model_free(model)
    return (generated - 1) / elapsed


def sipp_tokens_per_second(
    client: SippClient, model_path: Path, n_tokens: int, threads: int, n_ctx: int
) -> float:
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=n_ctx, n_threads=threads))
    endpoint = client.add("bench", LocalModelDescriptor(model_path, config))
    # Ban end-of-generation so both sides decode exactly n_tokens.
    response = client.query(
        PROMPT, endpoint=endpoint, options=SippTextOptions(max_tokens=n_tokens, temperature=0)
    ).result()
    stats = response.local_stats
    assert stats is not None
    if stats.generated_tokens < n_tokens:
        print(f"  (sipp stopped early at {stats.generated_tokens} tokens)", file=sys.stderr)
    return stats.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048)
    args = parser.parse_args()
    model_path = args.model or sipp_models.pull(sipp_models.DEFAULT_MODEL)
    print(
        f"model={model_path.name} tokens={args.tokens} threads={args.threads} n_ctx={args.ctx} "
        f"extra_bufts={'off (AMX host)' if cpu_has_amx() else 'on'}"
    )
    raw, ours = [], []
    with SippClient() as client:
        for i in range(args.rounds):
            r = raw_tokens_per_second(model_path, args.tokens, args.threads, args.ctx)
            s = sipp_tokens_per_second(client, model_path, args.tokens, args.threads, args.ctx)
            raw.append(r)
            ours.append(s)
            print(f"round {i + 1}: raw {r:7.1f} tok/s   sipp {s:7.1f} tok/s   ratio {s / r:.3f}")
    ratios = [s / r for s, r in zip(ours, raw)]
    print(f"raw  {spread(raw, unit='tok/s')}")
    print(f"sipp {spread(ours, unit='tok/s')}")
    print(f"ratio sipp/raw {spread(ratios, '.3f')}")


if __name__ == "__main__":
    main()
