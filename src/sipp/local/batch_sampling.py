"""Sampling the rows of one decode step together, straight from llama.cpp's logits.

llama.cpp's `llama_sampler_sample` copies the whole vocabulary (~49k entries for
SmolLM2, ~152k for Qwen) into a candidate array for every row, every step, before
its first sampler even runs. For the common requests this module skips that:

* **greedy** rows (temperature <= 0) without grammar or penalties are argmax'ed
  in one numpy call over a view of the logits buffer (no copy when the rows are
  adjacent). A logit bias is applied on top, exactly as llama.cpp adds it (float32
  `logit += bias`), and ties go to the lowest token id, as llama.cpp's greedy
  sampler picks them. A row with a NaN (a broken model, or a +inf bias on a -inf
  logit) gets llama.cpp's answer too: its greedy sampler never moves to a NaN, so
  the pick is token 0 when that one is NaN, else the best of the other tokens.
* **sampled** rows whose first active stage is `top_k` (k > 0), without grammar or
  penalties, select the k best logits first (a threshold from column maxima, then
  a sort of the few dozen logits above it), then run top_p / min_p / temperature on
  those k in the configured order and draw the token with llama.cpp's own
  arithmetic: float32 softmax pieces from the C library's `expf` and `logf` (the
  ones libllama calls), a float64 running sum, and a uniform double from a Mersenne
  Twister (std::mt19937) seeded like llama.cpp's `dist` sampler. For a fixed seed
  this gives the same token as the llama.cpp chain, draw after draw, infinite
  logits and overflowing temperatures included. Two cases have no llama.cpp answer
  to match, as its partial sort leaves their order unspecified: exact logit ties
  inside the top k (here the lower id comes first) and NaN logits (here counted as
  -inf: never drawn while a finite logit is left).

Rows with a grammar or penalties, or sampled rows with top_k disabled (or not
first), keep the llama.cpp chain: their samplers carry state or need the whole
vocabulary anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ._llama import DEFAULT_SEED, SamplerSettings

__all__ = ["RowSampler", "row_sampler", "sample_rows"]

_TWO_32 = 4294967296.0
_TWO_64 = 18446744073709551616.0
_MT_N = 624
_ROWS = 64  # top-k: the vocabulary seen as a grid of 64 rows (see _top_k)
_SCALAR_BIASES = 16  # up to this many biased tokens, a greedy row checks them as floats
_F32 = struct.Struct("<f")


def mt19937(seed: int) -> np.random.MT19937:
    """A Mersenne Twister in the state `std::mt19937(seed)` starts from (numpy's own
    seeding of MT19937 hashes the seed, so the state is set word by word)."""
    key = np.empty(_MT_N, dtype=np.uint32)
    x = seed & 0xFFFFFFFF
    key[0] = x
    for i in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + i) & 0xFFFFFFFF
        key[i] = x
    gen = np.random.MT19937()
    gen.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": _MT_N}}
    return gen


def canonical(gen: np.random.MT19937) -> float:
    """std::uniform_real_distribution<double>(0, 1) as libstdc++ draws it from a 32-bit
    engine: generate_canonical<double, 53> takes two words, low word first."""
    lo, hi = gen.random_raw(2).tolist()
    value = (float(lo) + float(hi) * _TWO_32) / _TWO_64
    return value if value < 1.0 else math.nextafter(1.0, 0.0)


def _c_float_function(name: str) -> Callable[[float], float] | None:
    """The C library's float function `name` (the one libllama links), or None."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        function = getattr(libm, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_float]
    function.restype = ctypes.c_float
    return function  # type: ignore[no-any-return]


_C_EXPF = _c_float_function("expf")
_C_LOGF = _c_float_function("logf")
# glibc's expf works in double and rounds once to float, its double within 1.69 * 2^-34
# of the true value (e_expf.c). So it rounds as the true value does unless that lies
# within 2^-33 (relative) of a midpoint between two floats, which for a normal float is
# a double whose 29 bits below the float's last one are within 2^21 of 2^28 (its half).
# About one input in 200 is that close; float subnormals are all asked.
_BELOW_FLOAT = np.int64(2**29 - 1)
_HALF_FLOAT_STEP = np.int64(2**28)
_NEAR = np.int64(2**21)
_SUBNORMALS = (2.0**-151 + 2.0**-126) / 2, (2.0**-126 - 2.0**-151) / 2  # centre, half width


def _expf(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """expf of each element as the C library computes it (x <= 0 or NaN: softmax terms):
    the true value rounded to float, through float64, except near a midpoint, where the
    C function itself is asked. (About 12 us for 40 terms, against 2 us for rounding.)"""
    exact = np.exp(x.astype(np.float64))
    out: npt.NDArray[np.float32] = exact.astype(np.float32)
    if _C_EXPF is None:
        return out
    hard = np.abs((exact.view(np.int64) & _BELOW_FLOAT) - _HALF_FLOAT_STEP) <= _NEAR
    hard |= np.abs(exact - _SUBNORMALS[0]) < _SUBNORMALS[1]
    if hard.any():
        for i in np.flatnonzero(hard).tolist():
            out[i] = _C_EXPF(float(x[i]))
    return out


def _logf(x: float) -> np.float32:
    out: np.float32 = np.float32(_C_LOGF(x) if _C_LOGF is not None else math.log(x))
    return out


@dataclass(eq=False)
class RowSampler:
    """How one request's rows are sampled without the llama.cpp chain."""

    greedy: bool
    bias_tokens: npt.NDArray[np.intp]
    bias_values: npt.NDArray[np.float32]
    top_k: int = 0
    stages: tuple[str, ...] = ()  # what runs on the top-k survivors, in order
    # float32, as llama.cpp's samplers hold them
    top_p: np.float32 = field(default_factory=lambda: np.float32(1.0))
    log_min_p: np.float32 = field(default_factory=lambda: np.float32(-np.inf))  # logf(min_p)
    temperature: np.float32 = field(default_factory=lambda: np.float32(1.0))
    rng: np.random.MT19937 | None = None
    bias_set: frozenset[int] = field(init=False)
    # (token, bias as the float32 llama.cpp adds), ascending ids
    bias_pairs: tuple[tuple[int, float], ...] = field(init=False)
    # Every bias <= 0 (a ban list, the common case): none can lift a token over the winner.
    lowers_only: bool = field(init=False)

    def __post_init__(self) -> None:
        self.bias_set = frozenset(int(t) for t in self.bias_tokens)
        self.bias_pairs = tuple(zip(self.bias_tokens.tolist(), self.bias_values.tolist()))
        self.lowers_only = all(b <= 0.0 for _, b in self.bias_pairs)  # False for a NaN

    def biased(self, row: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The row as llama.cpp's logit_bias sampler leaves it (a copy if it changes)."""
        if not len(self.bias_tokens):
            return row
        out: npt.NDArray[np.float32] = row.copy()
        with np.errstate(over="ignore", invalid="ignore"):  # to inf or NaN, as in C
            np.add.at(out, self.bias_tokens, self.bias_values)
        return out


def row_sampler(s: SamplerSettings) -> RowSampler | None:
    """The chain-free sampler for these settings, or None when only the chain has
    their exact semantics (grammar, penalties, top_k off or not the first stage)."""
    if s.grammar is not None or s.repeat_penalty != 1.0:
        return None
    if s.frequency_penalty or s.presence_penalty:
        return None
    items = sorted(s.logit_bias.items())
    tokens = np.array([t for t, _ in items], dtype=np.intp)
    values = np.array([b for _, b in items], dtype=np.float32)
    if s.temperature <= 0.0:
        return RowSampler(True, tokens, values)
    # llama.cpp's samplers hold p as a float and skip themselves on its float value
    # (top_p at >= 1, min_p at <= 0): a min_p of 1e-50 is 0 there, and does nothing.
    top_p, min_p = np.float32(s.top_p), np.float32(s.min_p)
    active = [
        stage
        for stage in s.order
        if (stage == "top_k" and s.top_k > 0)
        or (stage == "top_p" and top_p < 1.0)
        or (stage == "min_p" and min_p > 0.0)
        or stage == "temperature"
    ]
    if not active or active[0] != "top_k":
        return None
    seed = int.from_bytes(os.urandom(4), "little") if s.seed == DEFAULT_SEED else s.seed
    with np.errstate(over="ignore"):  # a temperature past float32's range is inf, as in C
        temperature = np.float32(s.temperature)
    return RowSampler(
        False,
        tokens,
        values,
        top_k=s.top_k,
        stages=tuple(active[1:]),
        top_p=top_p,
        log_min_p=_logf(float(min_p)) if min_p > 0.0 else np.float32(-np.inf),
        temperature=temperature,
        rng=mt19937(seed),
    )


def sample_rows(
    logits: npt.NDArray[np.float32], rows: Sequence[int], samplers: Sequence[RowSampler]
) -> list[int]:
    """One token per (row of `logits`, sampler): the step's greedy rows in one argmax."""
    tokens = [0] * len(rows)
    greedy = [i for i, s in enumerate(samplers) if s.greedy]
    if greedy:
        picked = [rows[i] for i in greedy]
        first, last = min(picked), max(picked)
        if picked == list(range(first, last + 1)):
            best = np.argmax(logits[first : last + 1], axis=1).tolist()  # a view: no copy
            found = [best[r - first] for r in picked]
        else:
            found = np.argmax(logits[picked], axis=1).tolist()
        for i, token in zip(greedy, found):
            s = samplers[i]
            tokens[i] = greedy_token(logits[rows[i]], token, s)
    for i, s in enumerate(samplers):
        if not s.greedy:
            tokens[i] = _sample_top_k(s.biased(logits[rows[i]]), s)
    return tokens


def greedy_token(row: npt.NDArray[np.float32], best: int, s: RowSampler) -> int:
    """A greedy row's token, given numpy's argmax of its raw logits (its first NaN, if
    the row holds one)."""
    if s.bias_pairs:
        return _greedy_with_bias(row, best, s)
    win = row.item(best)
    return best if win == win else _greedy_scan(row)


def _greedy_scan(row: npt.NDArray[np.float32]) -> int:
    """llama.cpp's greedy pick: scanning from token 0, the first logit strictly above
    every earlier one. It never moves to a NaN, so it stays on token 0 when that one
    is NaN, and otherwise ends on the first best of the other logits."""
    best = int(np.argmax(row))
    win = row.item(best)
    if win == win:  # numpy's argmax stops at a NaN: there is none
        return best
    first = row.item(0)
    return 0 if first != first else int(np.nanargmax(row))


def _greedy_with_bias(row: npt.NDArray[np.float32], best: int, s: RowSampler) -> int:
    """The argmax after the bias, from the argmax before it: the unbiased winner still
    beats every unbiased token, so only the biased ones can change the answer. When
    the winner is itself biased, the row is searched again.

    A few biased tokens are compared one by one as Python floats: each numpy call costs
    tens of microseconds when a decode has just evicted the caches, a float a fraction
    of one. A long bias list is gathered with numpy."""
    if best in s.bias_set:
        return _greedy_scan(s.biased(row))
    win = row.item(best)
    if s.lowers_only and math.isfinite(win):
        # A finite winner means no NaN or +inf in the row, so a bias <= 0 leaves every
        # biased token at or below it (-inf at worst, never NaN); one that ties it had
        # tied it before, and the argmax took the lowest id of those ties: `best`.
        return best
    if len(s.bias_pairs) > _SCALAR_BIASES:
        moved = row[s.bias_tokens]  # a copy: fancy indexing
        with np.errstate(over="ignore", invalid="ignore"):  # to inf or NaN, as in C
            moved += s.bias_values  # float32, as llama.cpp adds them
        k = int(moved.argmax())  # the lowest id among the biased ties; a NaN first
        top, first_moved = moved.item(k), int(s.bias_tokens[k])
    else:
        first_moved, top = -1, math.nan
        for token, bias in s.bias_pairs:  # ascending ids: the lowest wins a tie
            value = _float32(row.item(token) + bias)
            if first_moved < 0 or value > top or value != value:
                first_moved, top = token, value
                if value != value:  # NaN: numpy's argmax stops at the first one
                    break
    if top < win:
        return best
    if win != win or top != top:  # a NaN in the biased row: the whole scan decides
        return _greedy_scan(s.biased(row))
    return first_moved if top > win else min(best, first_moved)


def _float32(x: float) -> float:
    """`x` rounded to float32. The float32 sum of two float32 values is their double sum
    rounded so: a double holds more than 2 x 24 + 2 bits, so its own rounding never
    changes the second one."""
    try:
        value: float = _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # rounds past the largest float32
        return math.copysign(math.inf, x)
    return value


def _top_k(
    row: npt.NDArray[np.float32], k: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Token ids of the k largest logits, largest first (ties: lower id first), and those
    logits. NaN counts as -inf."""
    n = row.shape[0]
    cols = n // _ROWS
    if cols < 4 * k:
        if np.isnan(row).any():
            row = _nan_lowest(row)
        ids = np.arange(n)
    else:
        # The row as a grid of _ROWS rows: k columns have their maximum at or above the
        # k-th largest column maximum, so at least k logits are, and every token of the
        # top k is at or above it. Only the columns that reach it are searched, and the
        # few hundred logits found are sorted, never the vocabulary. (Maxima down
        # columns: numpy reduces along axis 0 with SIMD, along axis 1 row by row.)
        size = _ROWS * cols
        col_max = row[:size].reshape(_ROWS, cols).max(axis=0)
        # A column's maximum is NaN if the column holds one: the check costs no pass.
        if np.isnan(col_max).any() or (size < n and np.isnan(row[size:]).any()):
            row = _nan_lowest(row)
            col_max = row[:size].reshape(_ROWS, cols).max(axis=0)
        grid = row[:size].reshape(_ROWS, cols)
        floor = np.partition(col_max, cols - k)[cols - k]
        hit = np.flatnonzero(col_max >= floor)
        r, c = np.nonzero(grid[:, hit] >= floor)
        ids = np.concatenate((r * cols + hit[c], np.flatnonzero(row[size:] >= floor) + size))
        ids.sort()
    # Stable on ascending ids: equal logits keep the lower id first.
    ids = ids[np.argsort(-row[ids], kind="stable")[:k]]
    return ids, row[ids]


def _nan_lowest(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.where(np.isnan(values), np.float32(-np.inf), values)
    return out


def _sample_top_k(row: npt.NDArray[np.float32], s: RowSampler) -> int:
    assert s.rng is not None
    ids, vals = _top_k(row, s.top_k)
    # An infinite logit or temperature overflow makes inf - inf: NaN, as in C.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for stage in s.stages:
            if stage == "top_p":
                keep = _top_p_keep(vals - vals[0], float(s.top_p))
                ids, vals = ids[:keep], vals[:keep]
            elif stage == "min_p":
                floor = np.float32(vals[0] + s.log_min_p)
                keep = max(1, int(np.count_nonzero(vals >= floor)))
                ids, vals = ids[:keep], vals[:keep]
            elif stage == "temperature":
                if s.temperature > 0.0:
                    vals = (vals / s.temperature).astype(np.float32, copy=False)
                else:  # 0 as a float (say 1e-46): llama.cpp keeps the first best only
                    vals = np.concatenate((vals[:1], np.full(len(vals) - 1, -np.inf, np.float32)))
        rnd = canonical(s.rng)
        if len(ids) == 1:
            return int(ids[0])
        return int(ids[_draw(vals - vals[0], rnd)])


# Softmax terms are first taken correctly rounded (_rounded_expf), which is cheap. The
# C library's expf is at most one float step (2^-23 of a term) away from that, so the
# sums built from them move by less than the margins below. Only a sum within its margin
# of the threshold it is compared with can decide otherwise; then the terms are taken
# again from _expf (once in thousands of draws).
_STEP = 2.0**-20


def _rounded_expf(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = np.exp(x.astype(np.float64)).astype(np.float32)
    return out


def _top_p_keep(x: npt.NDArray[np.float32], top_p: float) -> int:
    """llama_sampler_top_p on sorted logits (`x`: each minus the first): float32
    softmax, then the shortest prefix whose float32 running sum reaches p (a float32)."""
    for terms in (_rounded_expf, _expf):
        e = terms(x)
        p = e / np.add.accumulate(e, dtype=np.float32)[-1]
        sums = np.add.accumulate(p, dtype=np.float32)
        at = _first_reaching(sums, top_p)
        # A moved term moves the total, every quotient, and each float32 addition after
        # it may round one step (2^-23) otherwise: the sums (at most 1) move by less
        # than 3 steps per term and 5 more, under half this margin.
        if _settled(sums, top_p, at, (len(sums) + 2) * _STEP):
            break
    return min(at + 1, len(sums))


def _draw(x: npt.NDArray[np.float32], rnd: float) -> int:
    """llama_sampler_dist on the survivors (`x`: each minus the first): float32 terms, a
    float64 running sum, and the first whose sum reaches `rnd` of the whole; the last
    when none does (a NaN term)."""
    for terms in (_rounded_expf, _expf):
        sums = np.add.accumulate(terms(x).astype(np.float64))
        target = sums.item(-1) * rnd
        at = _first_reaching(sums, target)
        # Terms move by 2^-23 of themselves at most: sums and target by 2^-23 of the total.
        if _settled(sums, target, at, sums.item(-1) * _STEP):
            break
    return min(at, len(sums) - 1)


def _first_reaching(sums: npt.NDArray[np.floating], target: float) -> int:
    """The index of the first sum at or above `target`, len(sums) if none is: the loop
    llama.cpp runs (a NaN compares as below)."""
    hit = np.flatnonzero(sums >= target)
    return int(hit[0]) if len(hit) else len(sums)


def _settled(sums: npt.NDArray[np.floating], target: float, at: int, margin: float) -> bool:
    """Whether sums that each move by less than `margin` (nondecreasing, as sums of
    terms >= 0 are) would still first reach `target` at `at`. False on a NaN: those
    answers do not depend on rounding, and the second pass gives them unchanged."""
    if at < len(sums) and not sums.item(at) >= target + margin:
        return False
    return at == 0 or sums.item(at - 1) < target - margin
