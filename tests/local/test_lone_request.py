"""A request that generates alone takes the engine's lone-job loop (`_generate_alone`):
the same tokens, text, logprobs and accounting as the step loop gives it, and it hands
the engine back as soon as another request arrives or it is cancelled."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipp import (
    CacheRuntimeConfig,
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    ObservabilityRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
)

PROMPT = "Once upon a time, in a small village by the sea, there lived"

# Greedy, greedy with stops and logprobs, seeded draws through the batch sampler (plain
# temperature) and through the llama.cpp chain (a repeat penalty keeps it there).
CASES: dict[str, tuple[SippTextOptions, LocalTextOptions | None]] = {
    "greedy": (SippTextOptions(max_tokens=48, temperature=0), None),
    "stop-logprobs": (
        SippTextOptions(max_tokens=48, temperature=0, stop=[" the sea"]),
        LocalTextOptions(logprobs=True, top_logprobs=3),
    ),
    "seeded-batch-sampler": (
        SippTextOptions(max_tokens=48, temperature=0.9),
        LocalTextOptions(sampling=SamplingRuntimeConfig(seed=7)),
    ),
    "seeded-chain": (
        SippTextOptions(max_tokens=48, temperature=0.9),
        LocalTextOptions(sampling=SamplingRuntimeConfig(seed=7, repeat_penalty=1.3)),
    ),
}


@pytest.fixture(scope="module")
def endpoint(smollm_path: Path) -> Iterator[tuple[SippClient, EndpointRef, Any]]:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=512, n_parallel=2),
        cache=CacheRuntimeConfig(mode="off"),  # every run prefills its whole prompt
        observability=ObservabilityRuntimeConfig(runtime_metrics=True),
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
        # The seeded case's rows on the batch sampler, though SmolLM2's vocabulary would
        # send them to their chains (see test_batch_sampling).
        engine.sampled_rows_batched = True
        yield client, ref, engine


def _run(client: SippClient, ref: EndpointRef, case: str) -> tuple[list[int], Any]:
    options, local = CASES[case]
    run = client.query(PROMPT, endpoint=ref, options=options, local=local, emit_tokens=True)
    ids = [t for batch in run for t in batch.token_ids]
    return ids, run.result()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_lone_loop_gives_what_the_step_loop_gives(
    endpoint: tuple[SippClient, EndpointRef, Any], case: str
) -> None:
    client, ref, engine = endpoint
    engine.lone_loop = False
    try:
        ids, reference = _run(client, ref, case)
    finally:
        engine.lone_loop = True
    before = client.runtime_metrics(ref)["steps"]
    got_ids, got = _run(client, ref, case)
    assert got_ids == ids and ids
    assert got.text == reference.text
    assert got.finish_reason == reference.finish_reason
    assert got.usage == reference.usage
    assert got.logprobs == reference.logprobs
    assert got.stop_sequence == reference.stop_sequence
    # One step for the prompt, then one per token decoded after it, as the step loop counts.
    assert client.runtime_metrics(ref)["steps"] - before == got.usage.output_tokens


def test_a_request_that_arrives_takes_the_engine_back_from_the_lone_loop(
    endpoint: tuple[SippClient, EndpointRef, Any],
) -> None:
    client, ref, _ = endpoint
    long_options = SippTextOptions(max_tokens=200, temperature=0)
    short_prompt = "The capital of Japan is"
    short_options = SippTextOptions(max_tokens=16, temperature=0)
    long_alone = client.query(PROMPT, endpoint=ref, options=long_options).result().text
    short_alone = client.query(short_prompt, endpoint=ref, options=short_options).result().text

    long_run = client.query(PROMPT, endpoint=ref, options=long_options, emit_tokens=True)
    tokens = iter(long_run)
    next(tokens)  # generating alone now
    before = client.runtime_metrics(ref)["busy_slot_steps"]
    steps_before = client.runtime_metrics(ref)["steps"]
    short = client.query(short_prompt, endpoint=ref, options=short_options).result()
    shared = client.runtime_metrics(ref)
    for _ in tokens:
        pass
    assert short.text == short_alone
    assert long_run.result().text == long_alone
    assert long_run.result().usage is not None and long_run.result().usage.output_tokens == 200
    # The newcomer ran beside the long request: steps then held both of them.
    assert shared["busy_slot_steps"] - before > shared["steps"] - steps_before


def test_cancelling_a_lone_request_frees_its_slot(
    endpoint: tuple[SippClient, EndpointRef, Any],
) -> None:
    client, ref, _ = endpoint
    run = client.query(
        PROMPT,
        endpoint=ref,
        options=SippTextOptions(max_tokens=400, temperature=0),
        emit_tokens=True,
    )
    seen: list[str] = []
    for batch in run:
        seen.append(batch.text)
        if len(seen) == 3:
            threading.Thread(target=run.cancel, args=("enough",)).start()
    response = run.result()
    assert response.finish_reason == "cancelled"
    assert response.text == "".join(seen)
    assert response.usage is not None and 3 <= response.usage.output_tokens < 400
    metrics = client.runtime_metrics(ref)
    assert metrics["busy_slots"] == 0 and metrics["running"] == 0
    after = client.query(PROMPT, endpoint=ref, options=SippTextOptions(max_tokens=4, temperature=0))
    assert after.result().usage is not None


@pytest.mark.parametrize("case", ["greedy", "stop-logprobs"])
def test_a_lone_greedy_row_picks_what_its_chain_picks(
    endpoint: tuple[SippClient, EndpointRef, Any], case: str
) -> None:
    # SmolLM2's vocabulary is large enough for a lone greedy row to skip its chain.
    client, ref, engine = endpoint
    assert not engine._small_vocab
    engine.batch_sampling = False  # every row on its llama.cpp chain
    try:
        chain_ids, chain = _run(client, ref, case)
    finally:
        engine.batch_sampling = True
    ids, got = _run(client, ref, case)
    assert ids == chain_ids and got.text == chain.text


def test_steps_are_counted_while_a_request_runs_alone(
    endpoint: tuple[SippClient, EndpointRef, Any],
) -> None:
    client, ref, _ = endpoint
    before = client.runtime_metrics(ref)["steps"]
    run = client.query(
        PROMPT,
        endpoint=ref,
        options=SippTextOptions(max_tokens=300, temperature=0),
        emit_tokens=True,
    )
    seen = 0
    for batch in run:
        seen += len(batch.token_ids)
        if seen >= 20:
            break
    mid = client.runtime_metrics(ref)["steps"] - before
    run.cancel()
    run.result()
    assert mid >= seen  # a step per token so far, not all at the end
