"""Encoder-decoder (T5) query tokens/s: sipp vs a raw llama-cpp-python encode/decode loop.

local_decode.py run on the tiny random-weight T5 the tests generate
(tests/make_tiny_t5.py), or --model, with T5 prompts and defaults; its raw loop encodes
when the model has an encoder. Each side runs in its own process, one llama context per process (two in one
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

import sys
from pathlib import Path

import local_decode

PROMPT = "summarize: Trains leave the station every hour, except on Sunday mornings."
WARMUP_PROMPT = "translate English to German: Hello, world."


def _tiny_t5() -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from make_tiny_t5 import generate

    return generate()


def main() -> None:
    given = sys.argv[1:]
    # One thread: the tiny model's matrices are too small for a second to pay off.
    defaults = ["--tokens", "256", "--threads", "1", "--ctx", "512"]
    defaults += ["--prompt", PROMPT, "--warmup-prompt", WARMUP_PROMPT]
    if "--model" not in given and "-h" not in given and "--help" not in given:
        defaults += ["--model", str(_tiny_t5())]
    local_decode.main(defaults + given, description=__doc__)  # later flags win


if __name__ == "__main__":
    main()
