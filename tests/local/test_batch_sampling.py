"""The batch sampler against the llama.cpp sampler chain it replaces.

Engine level: the same requests, admitted in one step, produce the same tokens with
every row on its llama.cpp chain (`Engine.batch_sampling = False`, the reference)
and with the batch sampler. Function level: on real logits, seeded draws equal
the chain's draw for draw; the draws follow the analytically computed
distribution; greedy ties and logit biases resolve as llama.cpp's greedy does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from sipp._runtime_config import SAMPLER_NAMES
from sipp.local import _llama
from sipp.local.batch_sampling import (
    RowSampler,
    _expf,
    canonical,
    greedy_token,
    mt19937,
    row_sampler,
    sample_rows,
)

from .test_engine import PROMPTS  # the eight distinct prompts the engine tests batch

GREEDY = SippTextOptions(max_tokens=64, temperature=0)


def _settings(**changes: Any) -> _llama.SamplerSettings:
    base: dict[str, Any] = dict(
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=1.0,
        seed=1234,
        order=SAMPLER_NAMES,
        logit_bias={},
        grammar=None,
    )
    base.update(changes)
    return _llama.SamplerSettings(**base)


# ------------------------------------------------------------------ engine level
@pytest.fixture(params=["smollm", "qwen"])
def model(request: pytest.FixtureRequest, smollm_path: Path, qwen_path: Path) -> Path:
    return smollm_path if request.param == "smollm" else qwen_path


def _together(
    path: Path,
    batch_sampling: bool,
    requests: list[tuple[str, SippTextOptions, LocalTextOptions | None]],
) -> list[tuple[list[int], Any]]:
    """Run `requests` on a fresh endpoint, admitted in one step and queued in the given
    order, so every pass decodes exactly the same batches into the same KV cells. A row's
    place in a batch and its sequence's cells change the float sums it gets (Qwen's greedy
    near-ties then flip, chain against chain too): the worker's first admission waits
    until every request is queued, each queued before the next starts (they reach the
    queue from the client's preparation threads, grammar compiles and all)."""
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=256, n_parallel=8),
        cache=CacheRuntimeConfig(mode="off"),  # both passes prefill whole prompts
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(path, config))
        engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
        engine.batch_sampling = batch_sampling
        engine.sampled_rows_batched = True  # sampled rows too, whatever the vocabulary
        admit = engine._admit

        def admit_all_together() -> Any:
            deadline = time.monotonic() + 120  # a lost request fails the test, not the run
            while len(engine._queue) < len(requests) and time.monotonic() < deadline:
                engine._cond.wait(timeout=1)  # the worker holds the lock; `submit` notifies
            engine._admit = admit
            return admit()

        engine._admit = admit_all_together
        runs = []
        for prompt, options, local in requests:
            runs.append(
                client.query(prompt, endpoint=ref, options=options, local=local, emit_tokens=True)
            )
            deadline = time.monotonic() + 120
            while len(engine._queue) < len(runs) and time.monotonic() < deadline:
                time.sleep(0.005)
        assert engine.batch_sampling is batch_sampling
        out = []
        for run in runs:
            ids = [t for batch in run for t in batch.token_ids]
            out.append((ids, run.result()))
        return out


def test_eight_greedy_prompts_give_the_chains_tokens(model: Path) -> None:
    requests = [(p, GREEDY, None) for p in PROMPTS]
    chain = _together(model, False, requests)
    batched = _together(model, True, requests)
    assert [ids for ids, _ in batched] == [ids for ids, _ in chain]
    assert [r.text for _, r in batched] == [r.text for _, r in chain]
    assert sum(len(ids) for ids, _ in chain) > 8 * 16  # most run well past a few tokens


def test_a_batch_mixing_greedy_sampled_and_constrained_rows_matches_the_chains(
    model: Path,
) -> None:
    favourite = _together(model, False, [(PROMPTS[0], GREEDY, None)])[0][0][0]
    sampled = SippTextOptions(max_tokens=64, temperature=0.9)
    requests: list[tuple[str, SippTextOptions, LocalTextOptions | None]] = [
        (PROMPTS[0], GREEDY, None),
        # The greedy favourite banned and another token pushed: the biased argmax.
        (
            PROMPTS[0],
            GREEDY,
            LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias={favourite: -100.0})),
        ),
        (PROMPTS[1], GREEDY, LocalTextOptions(logprobs=True, top_logprobs=3)),
        (
            "Is the sky blue? Answer:",
            SippTextOptions(max_tokens=8, temperature=0),
            LocalTextOptions(grammar='root ::= "yes" | "no"'),
        ),
        (
            PROMPTS[2],
            GREEDY,
            LocalTextOptions(sampling=SamplingRuntimeConfig(frequency_penalty=0.8)),
        ),
        (PROMPTS[3], sampled, LocalTextOptions(sampling=SamplingRuntimeConfig(seed=11))),
        (
            PROMPTS[4],
            sampled,
            LocalTextOptions(sampling=SamplingRuntimeConfig(seed=12, top_k=5, logit_bias={})),
        ),
        # top_k off: the chain samples this row in both passes.
        (PROMPTS[5], sampled, LocalTextOptions(sampling=SamplingRuntimeConfig(seed=13, top_k=0))),
    ]
    chain = _together(model, False, requests)
    batched = _together(model, True, requests)
    assert [ids for ids, _ in batched] == [ids for ids, _ in chain]
    assert batched[1][0][0] != favourite
    assert batched[3][1].text in ("yes", "no")
    assert batched[2][1].logprobs == chain[2][1].logprobs
    assert batched[2][1].logprobs and len(batched[2][1].logprobs[0].top) == 3


def test_sampled_rows_take_the_batch_sampler_only_on_large_vocabularies(
    smollm_path: Path, qwen_path: Path
) -> None:
    # Measured in the engine (BENCHMARKS.md, session 18): on SmolLM2's 49,152 entries
    # llama.cpp's chain samples a row faster, on Qwen's 151,936 the batch sampler does.
    for path, batched in ((smollm_path, False), (qwen_path, True)):
        with SippClient() as client:
            config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256))
            ref = client.add("m", LocalModelDescriptor(path, config))
            engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
            assert engine.sampled_rows_batched is batched
            assert engine.batch_sampling


def test_settings_past_what_llama_cpp_holds_keep_the_engine_serving(smollm_path: Path) -> None:
    # A min_p that is 0 as a float once took the endpoint down; a top_k past int32 wrapped
    # into llama.cpp's int and meant something else than on the batch sampler.
    sampled = SippTextOptions(max_tokens=24, temperature=0.9)
    requests: list[tuple[str, SippTextOptions, LocalTextOptions | None]] = [
        (
            PROMPTS[0],
            sampled,
            LocalTextOptions(sampling=SamplingRuntimeConfig(seed=21, min_p=1e-46)),
        ),
        (
            PROMPTS[1],
            sampled,
            LocalTextOptions(sampling=SamplingRuntimeConfig(seed=22, top_k=2**40)),
        ),
        (PROMPTS[2], GREEDY, None),
    ]
    chain = _together(smollm_path, False, requests)
    batched = _together(smollm_path, True, requests)
    assert [ids for ids, _ in batched] == [ids for ids, _ in chain]
    assert all(r.text for _, r in batched)


# ------------------------------------------------------------------ function level
class _Logits:
    """A private context holding the logits of a few prompts, and a chain sampler
    reading them (only this test's thread touches it)."""

    def __init__(self, path: Path, prompts: list[str]) -> None:
        amx = _llama.cpu_has_amx()
        self.model = _llama.LlamaModel(path, _llama.ModelParams(0, 0, True, False, not amx))
        self.ctx = _llama.Context(
            self.model,
            _llama.ContextParams(
                n_ctx=512,
                n_batch=256,
                n_ubatch=256,
                n_seq_max=len(prompts),
                n_threads=2,
                n_threads_batch=2,
                embeddings=False,
                pooling=None,
                flash_attention=False,
                offload_kqv=False,
                op_offload=False,
                profiling=False,
            ),
        )
        batch = _llama.Batch(256)
        self.index: list[int] = []
        for seq, prompt in enumerate(prompts):
            tokens = self.model.tokenize(prompt, add_special=True)
            for pos, token in enumerate(tokens):
                i = batch.add(token, pos, seq, pos == len(tokens) - 1)
            self.index.append(i)
        assert self.ctx.decode(batch) == 0
        batch.close()

    def chain_draws(self, s: _llama.SamplerSettings, entry: int, n: int) -> list[int]:
        sampler = _llama.Sampler(self.model, s)
        try:
            return [sampler.sample(self.ctx, self.index[entry]) for _ in range(n)]
        finally:
            sampler.close()

    @contextlib.contextmanager
    def row_set_to(self, entry: int, values: np.ndarray) -> Iterator[None]:
        """Put `values` in llama.cpp's logits buffer in place of `entry`'s row, where
        the chain and the batch sampler both read it, for the `with` block."""
        logits, rows = self.ctx.logits_rows([self.index[entry]])
        row = logits[rows[0]]
        kept = row.copy()
        row[:] = values
        try:
            yield
        finally:
            row[:] = kept

    def fast_draws(self, s: _llama.SamplerSettings, entry: int, n: int) -> list[int]:
        fast = row_sampler(s)
        assert fast is not None
        logits, rows = self.ctx.logits_rows([self.index[entry]])
        return [sample_rows(logits, rows, [fast])[0] for _ in range(n)]

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


@pytest.fixture(scope="module")
def smollm_logits(smollm_path: Path) -> Iterator[_Logits]:
    logits = _Logits(smollm_path, PROMPTS[:4])
    yield logits
    logits.close()


def test_mt19937_is_the_standard_engine() -> None:
    # The C++ standard fixes this value: the 10000th output of a default-seeded mt19937.
    assert int(mt19937(5489).random_raw(10000)[-1]) == 4123659995
    draws = [canonical(mt19937(1)) for _ in range(3)]
    assert draws[0] == draws[1] == draws[2] and 0.0 <= draws[0] < 1.0


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"top_k": 5, "temperature": 1.5},
        {"top_k": 200, "top_p": 0.5, "min_p": 0.0},
        {"top_k": 100, "order": ("top_k", "temperature", "top_p", "min_p"), "temperature": 2.0},
        {"top_k": 1},
        {"top_k": 40, "min_p": 0.2, "top_p": 1.0, "temperature": 0.3},
        {"logit_bias": {13: 12.0, 28: -3.0, 100: 8.5}, "temperature": 1.2},
    ],
)
def test_seeded_draws_equal_the_chains_draw_for_draw(
    smollm_logits: _Logits, changes: dict[str, Any]
) -> None:
    seen: set[int] = set()
    for entry in range(len(smollm_logits.index)):
        for seed in (0, 1, 42, 2**31 + 5):
            s = _settings(seed=seed, **changes)
            chain = smollm_logits.chain_draws(s, entry, 60)
            assert smollm_logits.fast_draws(s, entry, 60) == chain
            seen.update(chain)
    if changes.get("top_k") != 1:
        assert len(seen) > 4  # the draws did spread over several tokens


def _two_finite(row: np.ndarray) -> np.ndarray:
    out = np.full_like(row, -np.inf)
    out[7], out[9] = 1.0, 0.5
    return out


@pytest.mark.parametrize(
    ("changes", "edit"),
    [
        ({"min_p": 1e-46}, None),  # 0 as a float: llama.cpp's min_p does nothing
        ({"top_p": 0.99999999, "min_p": 0.0}, None),  # 1 as a float: nor does top_p
        ({"temperature": 1e-46}, None),  # 0 as a float: only the first best token is left
        ({"temperature": 1e-39}, None),  # logits / t overflow: inf - inf in the draw
        ({"temperature": 1e39}, None),  # inf as a float: every logit becomes 0
        ({"logit_bias": {500: math.inf}, "min_p": 0.0, "top_p": 1.0}, None),
        ({"logit_bias": {500: math.inf, 600: math.inf}}, None),
        ({"top_k": 3}, _two_finite),  # fewer finite logits than k
    ],
)
def test_edge_settings_and_infinite_logits_draw_as_the_chain(
    smollm_logits: _Logits, changes: dict[str, Any], edit: Any
) -> None:
    logits, rows = smollm_logits.ctx.logits_rows([smollm_logits.index[0]])
    values = logits[rows[0]].copy()
    with smollm_logits.row_set_to(0, edit(values) if edit else values):
        for seed in (0, 1, 42):
            s = _settings(seed=seed, **changes)
            assert row_sampler(s) is not None  # the batch sampler takes these rows
            chain = smollm_logits.chain_draws(s, 0, 30)
            assert smollm_logits.fast_draws(s, 0, 30) == chain, (changes, seed)


def test_a_sampled_row_never_draws_a_nan_while_a_finite_logit_is_left() -> None:
    # llama.cpp's partial sort gives NaN no defined place; here it ranks below -inf.
    n = 49152
    row = np.random.default_rng(5).standard_normal(n).astype(np.float32)
    best = int(np.argmax(row))
    second = int(np.argsort(-row, kind="stable")[1])
    for nan_at in ([best], list(range(0, n, 7)), list(range(n - 5))):
        broken = row.copy()
        broken[nan_at] = np.nan
        for k in (1, 40, 5000):
            fast = row_sampler(_settings(top_k=k, seed=3))
            assert fast is not None
            draws = [sample_rows(broken[None, :], [0], [fast])[0] for _ in range(10)]
            assert not np.isnan(broken[draws]).any(), (len(nan_at), k)
            if k == 1 and nan_at == [best]:
                assert draws == [second] * 10
    fast = row_sampler(_settings(top_k=40, seed=3))
    assert fast is not None
    every = np.full((1, n), np.nan, dtype=np.float32)
    assert 0 <= sample_rows(every, [0], [fast])[0] < n  # a token, not an error


def _c_float_function(name: str) -> Any:
    function = getattr(ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6"), name)
    function.argtypes = [ctypes.c_float]
    function.restype = ctypes.c_float
    return function


def test_softmax_terms_are_the_c_librarys_expf() -> None:
    # libllama's samplers call the C library's expf, which is not correctly rounded:
    # near a midpoint between two floats it may round the other way.
    expf = _c_float_function("expf")
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [rng.uniform(-30.0, 0.0, 300_000), rng.uniform(-105.0, -80.0, 50_000)]  # subnormals
    ).astype(np.float32)
    x[:3] = (0.0, -np.inf, np.nan)
    want = np.array([expf(v) for v in x.tolist()], dtype=np.float32)
    assert _expf(x).view(np.uint32).tolist() == want.view(np.uint32).tolist()
    rounded = np.exp(x.astype(np.float64)).astype(np.float32)
    assert (rounded[3:] != want[3:]).sum() > 10  # so rounding the true value would not do


def _dist(terms: list[float], rnd: float) -> int:
    """llama_sampler_dist_apply's pick, written out: a double running sum of the float
    terms, the first that reaches `rnd` of the total, the last if none does."""
    total = 0.0
    for term in terms:
        total += term
    running = 0.0
    for i, term in enumerate(terms):
        running += term
        if running >= total * rnd:
            return i
    return len(terms) - 1


def _top_p(terms: list[float], top_p: float) -> int:
    """llama_sampler_top_p's kept count, written out in float32 (softmax_impl, then the
    running sum of the probabilities until it reaches p)."""
    total = np.float32(0.0)
    for term in terms:
        total = np.float32(total + np.float32(term))
    running = np.float32(0.0)
    for i, term in enumerate(terms):
        running = np.float32(running + np.float32(np.float32(term) / total))
        if running >= np.float32(top_p):
            return i + 1
    return len(terms)


def _odd_exponents(expf: Any) -> list[float]:
    """Inputs whose C expf is not the correctly rounded value."""
    x = np.random.default_rng(8).uniform(-3.0, 0.0, 300_000).astype(np.float32)
    c = np.array([expf(v) for v in x.tolist()], dtype=np.float32)
    return x[c != np.exp(x.astype(np.float64)).astype(np.float32)].tolist()


def test_a_draw_or_a_top_p_cut_on_a_rounding_edge_takes_the_c_librarys_terms() -> None:
    # The batch sampler sums correctly rounded terms first, and asks the C library only
    # when a sum lies that close to its threshold: cases built to land between the two.
    from sipp.local.batch_sampling import _draw, _top_p_keep

    expf = _c_float_function("expf")
    draws = cuts = 0
    for odd in _odd_exponents(expf)[:40]:
        x = np.array([0.0, odd, -1.0, -2.5], dtype=np.float32)
        c_terms = [float(np.float32(expf(v))) for v in x.tolist()]
        rounded = np.exp(x.astype(np.float64)).astype(np.float32).astype(np.float64).tolist()
        # The fraction of the total at which the pick moves past token 1, for each set
        # of terms; a draw between the two picks token 1 with one and token 2 with the other.
        edges = [(ts[0] + ts[1]) / (ts[0] + ts[1] + ts[2] + ts[3]) for ts in (c_terms, rounded)]
        rnd = sum(edges) / 2
        assert _draw(x, rnd) == _dist(c_terms, rnd)
        draws += _dist(c_terms, rnd) != _dist(rounded, rnd)
        for at in range(1, 3):  # a p equal to the larger of the two running sums
            p = max(_top_p_sums(c_terms)[at - 1], _top_p_sums(rounded)[at - 1])
            assert _top_p_keep(x, p) == _top_p(c_terms, p)
            cuts += _top_p(c_terms, p) != _top_p(rounded, p)
    assert (draws, cuts) > (0, 0) and min(draws, cuts) > 0  # some did land on the edge


def _top_p_sums(terms: list[float]) -> list[float]:
    total = np.float32(0.0)
    for term in terms:
        total = np.float32(total + np.float32(term))
    sums, running = [], np.float32(0.0)
    for term in terms:
        running = np.float32(running + np.float32(np.float32(term) / total))
        sums.append(float(running))
    return sums


def test_min_p_takes_the_c_librarys_logf() -> None:
    logf = _c_float_function("logf")
    ps = np.random.default_rng(4).uniform(1e-4, 1.0, 200_000).astype(np.float32)
    c = np.array([logf(v) for v in ps.tolist()], dtype=np.float32)
    off = np.flatnonzero(np.log(ps.astype(np.float64)).astype(np.float32) != c)
    assert len(off) > 0  # values where logf is not the correctly rounded log
    for p in ps[off[:5]].tolist():
        fast = row_sampler(_settings(min_p=p))
        assert fast is not None and fast.log_min_p == np.float32(logf(p))


def _expected(row: np.ndarray, k: int, top_p: float, temperature: float) -> dict[int, float]:
    """top_k -> top_p -> temperature -> softmax, computed in float64 from the definitions."""
    ids = np.argsort(-row.astype(np.float64), kind="stable")[:k]
    vals = row[ids].astype(np.float64)
    p = np.exp(vals - vals[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1
    ids, vals = ids[:keep], vals[:keep] / temperature
    q = np.exp(vals - vals[0])
    q /= q.sum()
    return {int(t): float(v) for t, v in zip(ids, q)}


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty: the chi-square quantile for a normal quantile z (3.09: 0.999)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_draws_follow_the_analytic_distribution(smollm_logits: _Logits) -> None:
    n = 20_000
    for entry in range(2):
        s = _settings(top_k=40, top_p=0.9, min_p=0.0, temperature=1.3, seed=7 + entry)
        logits, rows = smollm_logits.ctx.logits_rows([smollm_logits.index[entry]])
        expected = _expected(logits[rows[0]], 40, 0.9, 1.3)
        fast = row_sampler(s)
        assert fast is not None
        counts: dict[int, int] = {}
        for _ in range(n):
            token = sample_rows(logits, rows, [fast])[0]
            counts[token] = counts.get(token, 0) + 1
        assert set(counts) <= set(expected)
        big = [t for t, p in expected.items() if p * n >= 5]
        rest = 1.0 - sum(expected[t] for t in big)
        cells = [(counts.get(t, 0), expected[t] * n) for t in big]
        if rest * n >= 5:
            cells.append((n - sum(counts.get(t, 0) for t in big), rest * n))
        chi2 = sum((seen - want) ** 2 / want for seen, want in cells)
        assert len(cells) > 3
        assert chi2 < _chi2_critical(len(cells) - 1), (chi2, len(cells))


def test_a_fixed_seed_reproduces_and_the_default_seed_does_not() -> None:
    row = np.linspace(0.0, 1.0, 1000, dtype=np.float32)[None, :]
    flat = _settings(top_k=1000, top_p=1.0, min_p=0.0, temperature=1.0)

    def draws(s: _llama.SamplerSettings) -> list[int]:
        fast = row_sampler(s)
        assert fast is not None
        return [sample_rows(row, [0], [fast])[0] for _ in range(200)]

    assert draws(flat) == draws(flat)
    assert draws(flat) != draws(_settings(top_k=1000, top_p=1.0, min_p=0.0, seed=99))
    random_seed = _settings(top_k=1000, top_p=1.0, min_p=0.0, seed=_llama.DEFAULT_SEED)
    assert draws(random_seed) != draws(random_seed)


def test_only_the_settings_the_batch_sampler_reproduces_leave_the_chain() -> None:
    greedy = row_sampler(_settings(temperature=0.0, logit_bias={3: 1.0}))
    assert isinstance(greedy, RowSampler) and greedy.greedy
    assert row_sampler(_settings(grammar='root ::= "a"')) is None
    assert row_sampler(_settings(temperature=0.0, repeat_penalty=1.1)) is None
    assert row_sampler(_settings(frequency_penalty=0.5)) is None
    assert row_sampler(_settings(presence_penalty=0.5)) is None
    assert row_sampler(_settings(top_k=0)) is None
    # top_p over the whole vocabulary first: not what top_k survivors would give.
    assert row_sampler(_settings(order=("top_p", "top_k", "min_p", "temperature"))) is None
    sampled = row_sampler(_settings(order=("temperature", "top_k")))
    assert sampled is None  # temperature first: the chain keeps its exact order
    kept = row_sampler(_settings(order=("top_k", "min_p", "temperature")))
    assert kept is not None and kept.stages == ("min_p", "temperature")


def _llama_greedy(row: np.ndarray, bias: dict[int, float]) -> int:
    """llama.cpp's logit_bias then greedy samplers, written out: float32 `logit += bias`,
    then the first index whose logit is strictly above every earlier one."""
    cur = _biased(np.asarray(row, dtype=np.float32), bias)
    selected = 0
    for i in range(1, len(cur)):
        if cur[i] > cur[selected]:
            selected = i
    return selected


def _biased(row: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """A copy of the row after llama.cpp's logit_bias: float32 `logit += bias`, overflow to
    inf and inf - inf to NaN, as in C."""
    out = row.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for token, b in bias.items():
            out[token] = np.float32(out[token] + np.float32(b))
    return out


_VOCAB = 24
_LOGITS = [-3e38, -2.0, 0.0, 0.5, 1.0, 3.0, 3e38]
_BIASES = [-math.inf, -1e30, -2.5, -1.0, 0.0, 5e-8, 0.5, 1.0, 2.0, 2.5, 1e38]


@settings(max_examples=500, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from(_LOGITS), min_size=_VOCAB, max_size=_VOCAB),
        min_size=1,
        max_size=6,
    ),
    biases=st.lists(  # one per row; an empty one leaves its row unbiased
        st.dictionaries(st.integers(0, _VOCAB - 1), st.sampled_from(_BIASES), max_size=20),
        min_size=6,
        max_size=6,
    ),
)
def test_greedy_ties_and_biases_resolve_as_llama_cpp_greedy(
    rows: list[list[float]], biases: list[dict[int, float]]
) -> None:
    # Up to 16 biased tokens are compared as floats, more are gathered with numpy;
    # infinite biases, sums that round (1 + 5e-8 is 1 in float32) and sums that
    # overflow float32, on both.
    logits = np.array(rows, dtype=np.float32)
    samplers, want = [], []
    for r, bias in enumerate(biases[: len(rows)]):
        fast = row_sampler(_settings(temperature=0.0, logit_bias=bias))
        assert fast is not None
        samplers.append(fast)
        want.append(_llama_greedy(logits[r], bias))
    order = list(reversed(range(len(rows))))  # rows need not come in buffer order
    assert sample_rows(logits, order, [samplers[r] for r in order]) == [want[r] for r in order]


@settings(max_examples=500, deadline=None)
@given(
    row=st.lists(
        st.sampled_from([-math.inf, -3e38, -2.0, 0.0, 1.0, 3e38]), min_size=_VOCAB, max_size=_VOCAB
    ),
    # Now and then a NaN or +inf at a drawn place: mostly the winner stays finite, so the
    # shortcut runs, and sometimes it does not, so the full comparison does.
    odd=st.lists(
        st.tuples(st.integers(0, _VOCAB - 1), st.sampled_from([math.inf, math.nan])), max_size=2
    ),
    bias=st.dictionaries(
        st.integers(0, _VOCAB - 1),
        st.sampled_from([-math.inf, -1e30, -2.5, -1.0, -5e-8, -0.0, 0.0]),
        min_size=1,
        max_size=30,
    ),
)
def test_a_ban_list_never_lifts_a_token_over_the_unbiased_winner(
    row: list[float], odd: list[tuple[int, float]], bias: dict[int, float]
) -> None:
    # Biases <= 0 take a shortcut when the winner is finite and unbiased; infinite winners
    # (inf - inf is NaN) and NaN rows take the full comparison. Either way: llama.cpp's
    # greedy pick of the biased row.
    for at, value in odd:
        row[at] = value
    logits = np.array([row], dtype=np.float32)
    fast = row_sampler(_settings(temperature=0.0, logit_bias=bias))
    assert fast is not None and fast.lowers_only
    assert sample_rows(logits, [0], [fast]) == [_llama_greedy(logits[0], bias)]


@pytest.mark.parametrize("n_biased", [1, 17])  # compared as floats; gathered with numpy
def test_a_bias_below_half_a_float32_step_leaves_a_tie(n_biased: int) -> None:
    # 1 + 5e-8 is 1 in float32, so token 2 only ties token 1, and the lower id wins;
    # in double it would win.
    row = np.zeros((1, 40), dtype=np.float32)
    row[0, 1] = row[0, 2] = 1.0
    bias = {2: 5e-8} | {t: -1.0 for t in range(20, 20 + n_biased - 1)}
    assert _llama_greedy(row[0], bias) == 1
    fast = row_sampler(_settings(temperature=0.0, logit_bias=bias))
    assert fast is not None
    assert sample_rows(row, [0], [fast]) == [1]


@settings(max_examples=300, deadline=None)
@given(
    row=st.lists(
        st.sampled_from([math.nan, -math.inf, -1.0, 0.0, 2.0, 3e38]), min_size=20, max_size=20
    ),
    bias=st.dictionaries(
        st.integers(0, 19), st.sampled_from([-math.inf, -1e30, 1.0, 1e38, math.inf]), max_size=20
    ),
)
def test_a_row_with_nan_gets_llama_cpps_greedy_pick(
    row: list[float], bias: dict[int, float]
) -> None:
    # A NaN comes from a broken model, or from a +inf bias on a -inf logit. llama.cpp's
    # greedy sampler never moves to one (token 0 stays picked when it is NaN); so with
    # and without a bias, on the float and the gathered paths.
    logits = np.array([row], dtype=np.float32)
    fast = row_sampler(_settings(temperature=0.0, logit_bias=bias))
    assert fast is not None
    assert sample_rows(logits, [0], [fast]) == [_llama_greedy(logits[0], bias)]
    alone = logits[0]  # the lone request's loop: numpy's argmax first, then the check
    assert greedy_token(alone, int(alone.argmax()), fast) == _llama_greedy(alone, bias)


@pytest.mark.parametrize("n", [100, 1000, 49152, 49153, 151936])
def test_top_k_keeps_the_k_best_logits_lowest_id_first_on_ties(n: int) -> None:
    from sipp.local.batch_sampling import _top_k

    rng = np.random.default_rng(n)
    for scale in (0.1, 2.0, 10.0):
        row = (rng.standard_normal(n) * scale).astype(np.float32)
        row[:5] += 30.0
        row[50:60] = row[3]  # ties inside the top k and at its edge
        row[-3:] = row[4]  # and in the tail past the last full column
        want = np.lexsort((np.arange(n), -row.astype(np.float64)))
        for k in (1, 4, 40, 200, 5000, n):
            ids, vals = _top_k(row, k)
            assert ids.tolist() == want[:k].tolist(), (scale, k)
            assert vals.tolist() == row[want[:k]].tolist()
