"""A llama_decode failure fails only the request that fails on its own.

llama.cpp returns a status from `llama_decode`: 1 (no KV slot) and -1 (invalid batch)
touch nothing; 2 (aborted) and < -1 (fatal) may leave processed ubatches in memory.
The engine rolls every sequence back to its committed tokens and retries halves of
the batch. These tests inject a failure into the real context: any batch holding a
marked token fails with the given status, either before decoding or after the real
decode ran (so the memory holds the batch, as with statuses 2 and < -1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sipp import (
    ContextRuntimeConfig,
    EndpointRef,
    ExecutionError,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    ObservabilityRuntimeConfig,
    SippClient,
    SippTextOptions,
)

LONG = SippTextOptions(max_tokens=120, temperature=0)
COUNTING = "Count: 1, 2, 3,"


class FailingDecode:
    """The real context, except that a batch containing `marker` fails with `status`."""

    def __init__(self, ctx: Any, marker: int, status: int, reach_memory: bool) -> None:
        self._ctx = ctx
        self.marker, self.status, self.reach_memory = marker, status, reach_memory
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def decode(self, batch: Any) -> int:
        if self.marker not in (batch._token[i] for i in range(batch.n)):
            return int(self._ctx.decode(batch))
        if self.reach_memory:
            self._ctx.decode(batch)
        self.failures += 1
        return self.status


def _engine(client: SippClient, ref: EndpointRef) -> Any:
    return client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]


def _add(client: SippClient, path: Path, **context: Any) -> EndpointRef:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(**context),
        observability=ObservabilityRuntimeConfig(runtime_metrics=True),
    )
    return client.add("m", LocalModelDescriptor(path, config))


@pytest.mark.parametrize(
    ("status", "reach_memory"), [(1, False), (-1, False), (2, True), (-3, True)]
)
def test_only_the_failing_request_fails(smollm_path: Path, status: int, reach_memory: bool) -> None:
    with SippClient() as client:
        ref = _add(client, smollm_path, n_ctx=1024, n_parallel=4)
        reference = client.query(COUNTING, endpoint=ref, options=LONG).result().text
        engine = _engine(client, ref)
        marker = engine.model.tokenize(" zebra", add_special=False)[-1]
        failing = FailingDecode(engine.ctx, marker, status, reach_memory)
        engine.ctx = failing
        try:
            survivor = client.query(COUNTING, endpoint=ref, options=LONG, emit_tokens=True)
            next(iter(survivor))  # generating: the next request's prefill shares its batch
            doomed = client.query("A fact about the zebra:", endpoint=ref, options=LONG)
            with pytest.raises(ExecutionError, match=f"status {status}"):
                doomed.result()
            assert survivor.result().text == reference
        finally:
            engine.ctx = failing._ctx
        assert failing.failures == 2  # in the shared batch, then alone
        metrics = client.runtime_metrics(ref)
        assert metrics["decode_retries"] == 1 and metrics["failed"] == 1
        assert metrics["busy_slots"] == 0 and metrics["running"] == 0
        # Nothing of the failed batch lingers in memory: the same request, same answer.
        assert client.query(COUNTING, endpoint=ref, options=LONG).result().text == reference


@pytest.mark.parametrize("reach_memory", [False, True])
def test_only_the_failing_embedding_fails(smollm_path: Path, reach_memory: bool) -> None:
    texts = ["red apples", "a zebra in the grass", "blue water", "green leaves"]
    with SippClient() as client:
        ref = _add(client, smollm_path, n_ctx=512, n_parallel=4, embeddings=True, pooling="mean")
        alone = {t: client.embed(t, endpoint=ref).result().values for t in texts}
        engine = _engine(client, ref)
        marker = engine.model.tokenize(" zebra", add_special=False)[-1]
        failing = FailingDecode(engine.ctx, marker, -1, reach_memory)
        engine.ctx = failing
        try:
            runs = {t: client.embed(t, endpoint=ref) for t in texts}
            for text, run in runs.items():
                if "zebra" in text:
                    with pytest.raises(ExecutionError, match="status -1"):
                        run.result()
                else:
                    got = np.array(run.result().values)
                    np.testing.assert_allclose(got, np.array(alone[text]), atol=1e-4)
        finally:
            engine.ctx = failing._ctx
        metrics = client.runtime_metrics(ref)
        assert metrics["failed"] == 1 and metrics["completed"] == 2 * len(texts) - 1
