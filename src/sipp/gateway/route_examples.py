"""A route rule's semantic-match condition: the request's question against example
utterances, by cosine similarity of their embeddings.

The examples are embedded once, at the first request that asks (through the gateway's
own endpoint for the rule's embedding target, like the semantic cache), and kept with
the rule; a failed attempt is retried by the next request. The question (the last user
message, or the prompt) is embedded once per request and shared with the cache stage
(`PublicCall.embedded`). The condition holds when an example at or above the threshold
survives the guard: nearest first, the first example whose negations and contrast words
agree with the question's (guard.py). Numbers are not compared: an example stands for
an intent, and "refund order 1234" asks what "refund my order" does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .._errors import ContextOverflowError, SippError
from .cache.guard import Signals, guard_rejects, signals
from .cache.semantic_stage import Embedder, EmbeddingFailed

__all__ = ["DEFAULT_EXAMPLES_THRESHOLD", "ExampleMatch", "Examples", "embed_question"]

logger = logging.getLogger("sipp.gateway")
Matrix = npt.NDArray[np.float32]
# all-MiniLM-L6-v2: rewordings of an intent score 0.75 to 0.9 against its examples,
# unrelated requests below 0.55 (a related but other intent, "reset my router" against
# "reset my password", 0.53). Another embedding model needs its own.
DEFAULT_EXAMPLES_THRESHOLD = 0.7


@dataclass(frozen=True, slots=True)
class ExampleMatch:
    similarity: float  # the nearest example's, guard or not (for logs and tuning)
    holds: bool


class _Kept:
    """The examples' unit vectors and guard signals, once embedded."""

    def __init__(self) -> None:
        self.matrix: Matrix | None = None
        self.signals: list[Signals] = []
        self.lock = asyncio.Lock()


@dataclass(frozen=True, slots=True)
class Examples:
    """`examples`, `examples_threshold`, `examples_guard` and the embedding target of a
    rule; `kept` holds their vectors once embedded (not part of the rule's identity)."""

    texts: tuple[str, ...]
    embedding_target: str
    threshold: float = DEFAULT_EXAMPLES_THRESHOLD
    guard: bool = True
    kept: _Kept = field(default_factory=_Kept, compare=False, repr=False)

    async def vectors(self, embed: Embedder) -> Matrix | None:
        """The examples' unit vectors (one row each), embedded at the first call; None
        when no example could be embedded. `EmbeddingFailed` when the target failed."""
        kept = self.kept
        async with kept.lock:  # one request embeds them; the others wait for its rows
            if kept.matrix is None:
                rows, texts = [], []
                for text in self.texts:
                    vector = await embed_question(embed, text)
                    if vector is None:
                        logger.warning(
                            "route example %r is longer than embedding target %s takes; "
                            "it is left out",
                            text[:60],
                            self.embedding_target,
                        )
                        continue
                    rows.append(_unit(vector))
                    texts.append(text)
                kept.matrix = np.vstack(rows) if rows else np.empty((0, 0), np.float32)
                kept.signals = [signals(t) for t in texts]
        return kept.matrix if kept.matrix.size else None

    def match(self, matrix: Matrix, text: str, vector: npt.ArrayLike) -> ExampleMatch:
        """Whether `text` (embedded as `vector`) matches an example."""
        query = _unit(vector)
        if not query.any() or query.shape[0] != matrix.shape[1]:
            return ExampleMatch(0.0, False)
        scores = matrix @ query
        order = np.argsort(-scores)
        best = float(scores[order[0]])
        asked = signals(text) if self.guard else None
        for i in order.tolist():
            if scores[i] < self.threshold:
                break
            if asked is None or not _flips(asked, self.kept.signals[i]):
                return ExampleMatch(best, True)
        return ExampleMatch(best, False)


async def embed_question(embed: Embedder, text: str) -> npt.NDArray[np.float32] | None:
    """`text`'s vector, None when it is longer than the embedding target takes (not the
    target's fault), `EmbeddingFailed` when the target failed."""
    try:
        return await embed(text)
    except ContextOverflowError:
        return None
    except SippError as exc:
        raise EmbeddingFailed(exc.code) from None


def _flips(asked: Signals, example: Signals) -> bool:
    verdict = guard_rejects(asked, example)
    return verdict is not None and verdict.rule != "number"


def _unit(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    v = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(v))
    return v / norm if norm else v
