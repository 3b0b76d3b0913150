"""`n_batch` bounds every step: a batch never takes more tokens than it has room for.

More sequences may generate than one batch holds (`n_batch < n_parallel`); they
take turns. Sizes llama.cpp cannot honour are refused at load with a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    InvalidConfigError,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    ObservabilityRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp.local import _llama

from .test_engine import NO_END
from .test_engine import PROMPTS as ENGINE_PROMPTS

GREEDY = SippTextOptions(max_tokens=8, temperature=0)
PROMPTS = [
    *ENGINE_PROMPTS,  # the eight of test_engine, then eight more
    "My favourite fruit is",
    "The ocean is",
    "Once upon a time",
    "The best way to learn is",
    "In the morning I",
    "Cats are",
    "The moon is",
    "A good book",
]


def test_a_full_batch_raises_instead_of_writing_past_it() -> None:
    batch = _llama.Batch(4)
    try:
        for i in range(4):
            assert batch.add(1, i, 0, False) == i
        with pytest.raises(OverflowError, match="full"):
            batch.add(1, 4, 0, True)
        assert batch.n == 4
        batch.clear()
        assert batch.add(1, 0, 0, True) == 0  # room again after clear
    finally:
        batch.close()


def test_sixteen_sequences_take_turns_in_a_batch_of_eight(smollm_path: Path) -> None:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=128, n_batch=8, n_parallel=16),
        observability=ObservabilityRuntimeConfig(runtime_metrics=True),
    )
    assert len(PROMPTS) == 16
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        alone = [client.query(p, endpoint=ref, options=GREEDY).result().text for p in PROMPTS]
        before = client.runtime_metrics(ref)
        runs = [client.query(p, endpoint=ref, options=GREEDY) for p in PROMPTS]
        together = [r.result(timeout=600) for r in runs]
        # Greedy text matches the solo run; a batch's shape changes float rounding in the
        # quantized matmuls, so one near-tie may flip (the eight-slot test sees none).
        same = sum(r.text == a for r, a in zip(together, alone))
        assert same >= len(PROMPTS) - 1, [(r.text, a) for r, a in zip(together, alone)]
        assert all(r.usage is not None and r.usage.output_tokens > 0 for r in together)
        after = client.runtime_metrics(ref)
        assert after["completed"] == 32 and after["failed"] == 0
        assert after["decode_retries"] == 0  # no batch was ever over n_batch
        busy = after["busy_slot_steps"] - before["busy_slot_steps"]
        assert busy / (after["steps"] - before["steps"]) > 8, "more ran than one batch holds"
        assert after["busy_slots"] == 0 and after["running"] == 0


@pytest.mark.parametrize("n_batch", [1, 2])
def test_a_new_prompt_gets_room_while_generations_fill_the_batch(
    smollm_path: Path, n_batch: int
) -> None:
    # Three generations fill a batch of two every step: a prompt admitted then used to
    # wait for them to end before its first token was prefilled.
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=256, n_batch=n_batch, n_ubatch=n_batch, n_parallel=4)
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        long = SippTextOptions(max_tokens=120, temperature=0)
        runs = [
            client.query(p, endpoint=ref, options=long, local=NO_END, emit_tokens=True)
            for p in PROMPTS[:3]
        ]
        for run in runs:
            next(iter(run))  # generating
        short = client.query(
            "Hi", endpoint=ref, options=SippTextOptions(max_tokens=1, temperature=0)
        ).result(timeout=600)
        assert short.usage is not None and short.usage.output_tokens == 1
        assert not any(run.done for run in runs)
        assert all(r.result(timeout=600).usage.output_tokens == 120 for r in runs)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("context", "fragment"),
    [
        (
            ContextRuntimeConfig(n_ctx=256, n_batch=8, n_ubatch=16),
            r"n_ubatch \(16\) must be <= n_batch \(8\)",
        ),
        (
            ContextRuntimeConfig(n_ctx=256, n_ubatch=1024),
            r"n_ubatch \(1024\) must be <= n_batch \(256\)",
        ),
        (
            ContextRuntimeConfig(n_ctx=64, n_parallel=2, n_batch=512),
            r"n_batch \(512\) exceeds the whole context",
        ),
        (ContextRuntimeConfig(n_ctx=64, n_parallel=257), r"n_parallel must be <= 256"),
        (
            ContextRuntimeConfig(
                n_ctx=256, n_batch=256, n_ubatch=64, embeddings=True, pooling="mean"
            ),
            r"must equal n_batch .* with embeddings=True",
        ),
    ],
)
def test_impossible_batch_sizes_are_refused_at_load(
    smollm_path: Path, context: ContextRuntimeConfig, fragment: str
) -> None:
    with SippClient() as client, pytest.raises(InvalidConfigError, match=fragment):
        client.add("m", LocalModelDescriptor(smollm_path, NativeRuntimeConfig(context=context)))
