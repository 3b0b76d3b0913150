"""Choosing a semantic-cache threshold from a labelled set, with the numbers shown.

The shipped set (`calibration_pairs.jsonl`, beside this module) holds pairs of a new
request and a cached one, each labelled `hit` (a paraphrase: the cached answer is
right) or `miss` (a negation, antonym, changed number or entity, or a different
intent: serving the cached answer would be wrong). `sipp-gateway cache calibrate`
embeds both sides with an embedding target and, per threshold, counts what a
semantic cache would do with and without the guard:

* precision: served hits that were right / all served hits
* recall: right pairs served / all `hit` pairs
* false-hit rate: `miss` pairs served / all `miss` pairs

It recommends the lowest threshold whose false-hit rate (guard on) is within the
target: the most hits for the wrong answers one accepts.

One JSON object a line: {"query": str, "cached": str, "expect": "hit"|"miss",
"kind": str}; `kind` (paraphrase, negation, antonym, number, entity, intent, ...) only
groups the false hits in the report.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..._errors import InvalidConfigError
from ..config import GatewayConfig, LocalTarget
from .guard import guard_rejects

__all__ = [
    "DEFAULT_PAIRS",
    "LabelledPair",
    "PairScore",
    "ThresholdRow",
    "calibrate",
    "embed_with_target",
    "embedding_target",
    "format_report",
    "load_pairs",
    "recommend",
    "thresholds",
]

DEFAULT_PAIRS = Path(__file__).with_name("calibration_pairs.jsonl")
MAX_PAIRS = 100_000  # a labelled set is hand-written; anything bigger is a wrong file


@dataclass(frozen=True)
class LabelledPair:
    query: str
    cached: str
    expect_hit: bool
    kind: str


@dataclass(frozen=True)
class PairScore:
    pair: LabelledPair
    similarity: float
    guard_rejects: bool


@dataclass(frozen=True)
class ThresholdRow:
    """What a cache at `threshold` does to the set, with the guard on or off."""

    threshold: float
    guard: bool
    true_hits: int  # `hit` pairs served
    false_hits: int  # `miss` pairs served
    positives: int
    negatives: int
    false_hit_kinds: tuple[tuple[str, int], ...]

    @property
    def precision(self) -> float:
        served = self.true_hits + self.false_hits
        return self.true_hits / served if served else 1.0

    @property
    def recall(self) -> float:
        return self.true_hits / self.positives if self.positives else 0.0

    @property
    def false_hit_rate(self) -> float:
        return self.false_hits / self.negatives if self.negatives else 0.0


def load_pairs(path: str | os.PathLike[str] | None = None) -> list[LabelledPair]:
    """The labelled pairs of `path` (default: the shipped set); every bad line is named."""
    source = Path(path) if path is not None else DEFAULT_PAIRS
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"cannot read labelled pairs {source}: {exc}") from None
    pairs: list[LabelledPair] = []
    problems: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            query, cached, expect = row["query"], row["cached"], row["expect"]
            kind = row.get("kind", "hit" if expect == "hit" else "miss")
            if not (
                isinstance(query, str)
                and query.strip()
                and isinstance(cached, str)
                and cached.strip()
            ):
                raise ValueError("query and cached must be non-blank strings")
            if expect not in ("hit", "miss") or not isinstance(kind, str):
                raise ValueError('expect must be "hit" or "miss"; kind a string')
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            problems.append(f"{source}:{number}: {exc}")
            continue
        pairs.append(LabelledPair(query, cached, expect == "hit", kind))
    if len(pairs) > MAX_PAIRS:
        problems.append(f"{source}: more than {MAX_PAIRS} pairs")
    if problems:
        raise InvalidConfigError("; ".join(problems[:10]))
    if not any(p.expect_hit for p in pairs) or all(p.expect_hit for p in pairs):
        raise InvalidConfigError(f"{source}: needs both hit and miss pairs")
    return pairs


def thresholds(low: float = 0.70, high: float = 0.99, step: float = 0.01) -> list[float]:
    if not 0 < step <= 1 or not -1 <= low <= high <= 1:
        raise InvalidConfigError("thresholds need -1 <= low <= high <= 1 and 0 < step <= 1")
    count = math.floor((high - low) / step + 1e-9) + 1
    return [round(low + i * step, 4) for i in range(count)]


def calibrate(
    pairs: Sequence[LabelledPair],
    query_vectors: npt.ArrayLike,
    cached_vectors: npt.ArrayLike,
    grid: Sequence[float],
) -> tuple[list[PairScore], list[ThresholdRow]]:
    """Per-pair cosine similarity and guard verdict; then one row per (threshold, guard)."""
    a = _unit(query_vectors)
    b = _unit(cached_vectors)
    if a.shape != b.shape or len(a) != len(pairs):
        raise InvalidConfigError("one query and one cached vector per pair")
    sims = np.einsum("ij,ij->i", a, b)
    scores = [
        PairScore(p, float(s), guard_rejects(p.query, p.cached) is not None)
        for p, s in zip(pairs, sims)
    ]
    positives = sum(p.expect_hit for p in pairs)
    negatives = len(pairs) - positives
    rows = []
    for threshold in grid:
        for guard in (True, False):
            served = [
                s for s in scores if s.similarity >= threshold and not (guard and s.guard_rejects)
            ]
            kinds = Counter(s.pair.kind for s in served if not s.pair.expect_hit)
            rows.append(
                ThresholdRow(
                    threshold,
                    guard,
                    sum(s.pair.expect_hit for s in served),
                    sum(not s.pair.expect_hit for s in served),
                    positives,
                    negatives,
                    tuple(sorted(kinds.items())),
                )
            )
    return scores, rows


def recommend(rows: Sequence[ThresholdRow], target_false_hit_rate: float) -> ThresholdRow | None:
    """The lowest threshold (guard on) whose false-hit rate is within the target."""
    meeting = [r for r in rows if r.guard and r.false_hit_rate <= target_false_hit_rate]
    return min(meeting, key=lambda r: r.threshold, default=None)


def format_report(
    rows: Sequence[ThresholdRow],
    best: ThresholdRow | None,
    target_false_hit_rate: float,
    *,
    model: str,
    pair_count: int,
) -> str:
    on = {r.threshold: r for r in rows if r.guard}
    off = {r.threshold: r for r in rows if not r.guard}
    any_row = rows[0]
    lines = [
        f"{pair_count} pairs ({any_row.positives} should hit, {any_row.negatives} must not) "
        f"embedded with {model}",
        "",
        "          |           guard on                   |           guard off",
        "threshold | precision recall false-hit-rate (n) | precision recall false-hit-rate (n)",
    ]
    for t in sorted(on):
        lines.append(f"{t:9.2f} | {_cells(on[t])} | {_cells(off[t])}")
    lines.append("")
    if best is None:
        lines.append(
            f"no threshold up to {max(on):.2f} keeps the false-hit rate within "
            f"{target_false_hit_rate:.3f}: do not enable the semantic cache with this model"
        )
        return "\n".join(lines)
    off_best = off[best.threshold]
    lowest = (
        " (the lowest tried: lower --min-threshold to look further)"
        if best.threshold == min(on)
        else ""
    )
    lines.append(
        f"recommended threshold: {best.threshold:.2f}{lowest} "
        f"(guard on: false-hit rate {best.false_hit_rate:.4f} <= {target_false_hit_rate:.4f}, "
        f"recall {best.recall:.3f}, precision {best.precision:.3f}; "
        f"without the guard: false-hit rate {off_best.false_hit_rate:.4f}, recall {off_best.recall:.3f})"
    )
    for label, row in (("guard on", best), ("guard off", off_best)):
        kinds = ", ".join(f"{k} {n}" for k, n in row.false_hit_kinds) or "none"
        lines.append(f"false hits at {best.threshold:.2f}, {label}: {kinds}")
    return "\n".join(lines)


def _cells(row: ThresholdRow) -> str:
    return f"{row.precision:9.3f} {row.recall:6.3f} {row.false_hit_rate:14.4f} {row.false_hits:3d}"


def embedding_target(config: GatewayConfig, name: str | None) -> LocalTarget:
    """The local target that embeds for the cache. `name` comes from the command line;
    a config-level default (`[targets.cache] embedding_target`) would fill it here."""
    if name is None:
        raise InvalidConfigError("name the embedding target (--embedding-target NAME)")
    for target in config.targets:
        if target.name == name:
            if not isinstance(target, LocalTarget):
                raise InvalidConfigError(
                    f"target {name!r} is a {target.type} target; calibration embeds with a local target"
                )
            return target
    names = ", ".join(t.name for t in config.targets if isinstance(t, LocalTarget)) or "none"
    raise InvalidConfigError(f"no target named {name!r} (local targets: {names})")


def embed_with_target(
    target: LocalTarget,
    texts: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> npt.NDArray[np.float32]:
    """Each text's embedding from `target`'s GGUF, loaded through the library's client
    with the target's runtime settings (as `sipp-gateway serve` would load it)."""
    from ..._client import SippClient
    from ..._descriptors import LocalModelDescriptor

    out = np.empty((len(texts), 0), dtype=np.float32)
    with SippClient() as client:
        ref = client.add(
            target.name, LocalModelDescriptor(os.path.abspath(target.model), target.runtime)
        )
        batch = 32  # in flight at once: the engine batches them over its slots
        rows: list[list[float]] = []
        for start in range(0, len(texts), batch):
            runs = [client.embed(t, endpoint=ref) for t in texts[start : start + batch]]
            rows.extend(run.result().values for run in runs)
            if progress is not None:
                progress(len(rows), len(texts))
        if rows:
            out = np.asarray(rows, dtype=np.float32)
    return out


def _unit(vectors: npt.ArrayLike) -> npt.NDArray[np.float32]:
    m = np.asarray(vectors, dtype=np.float32)
    if m.ndim != 2:
        raise InvalidConfigError("expected a matrix of vectors")
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: npt.NDArray[np.float32] = m / norms
    return out
