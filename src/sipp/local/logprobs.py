"""Log probabilities of generated tokens, from the model's raw logits at each step.

Only requests that ask for logprobs come here: a log-softmax over the whole
vocabulary (~49k floats for SmolLM2) is vectorised with numpy, and the top-k uses
`argpartition` so only k entries are sorted.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .._types import TokenLogprob, TopLogprob
from ._llama import LlamaModel

__all__ = ["token_logprob"]


def token_logprob(
    model: LlamaModel, row: npt.NDArray[np.float32], token: int, top: int
) -> TokenLogprob:
    """`token`'s log probability under the distribution `row` (raw logits) and the
    `top` likeliest tokens there, best first."""
    peak = float(row.max())
    # Sum in float64: 49k float32 terms lose digits otherwise.
    log_total = peak + float(np.log(np.exp(row - peak).sum(dtype=np.float64)))
    text, raw = _piece(model, token)
    alternatives: tuple[TopLogprob, ...] = ()
    if top > 0:
        best = np.argpartition(row, -top)[-top:]
        best = best[np.argsort(row[best])[::-1]]
        alternatives = tuple(
            TopLogprob(*_piece(model, int(t)), float(row[t]) - log_total) for t in best
        )
    return TokenLogprob(text, raw, float(row[token]) - log_total, alternatives)


def _piece(model: LlamaModel, token: int) -> tuple[str, tuple[int, ...]]:
    # special=True: an alternative such as the end-of-turn token shows as its name.
    raw = model.piece(token, special=True)
    return raw.decode("utf-8", errors="replace"), tuple(raw)
