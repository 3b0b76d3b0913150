"""The end-of-generation tokens of a model, for benchmarks that ban them on every side.

With them banned (a logit bias far below any real logit, then greedy), every request
generates exactly the number of tokens asked for, so each side does the same work.
"""

from __future__ import annotations

from pathlib import Path

# Far below any logit, yet finite: it also travels as JSON to an HTTP baseline.
BAN = -1e9


def eog_tokens(model_path: Path) -> list[int]:
    """Every token llama.cpp treats as end-of-generation for this model (vocabulary-only load)."""
    import llama_cpp as lc

    from sipp.local._llama import backend_init

    backend_init()  # routes llama.cpp's log to Python logging
    mp = lc.llama_model_default_params()
    mp.vocab_only = True
    model = lc.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not read the vocabulary of {model_path}")
    vocab = lc.llama_model_get_vocab(model)
    found = [t for t in range(lc.llama_vocab_n_tokens(vocab)) if lc.llama_vocab_is_eog(vocab, t)]
    lc.llama_model_free(model)
    return found
