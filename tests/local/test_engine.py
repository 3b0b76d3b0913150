"""The engine under concurrency: continuous batching, prefix reuse, snapshots, accounting."""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipp import (
    CacheRuntimeConfig,
    ChatMessage,
    ClientClosedError,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    ExecutionError,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    ObservabilityRuntimeConfig,
    OverloadedError,
    SamplingRuntimeConfig,
    SchedulerRuntimeConfig,
    SippClient,
    SippTextOptions,
)

from .test_decode_failures import FailingDecode

GREEDY = SippTextOptions(max_tokens=20, temperature=0)
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>, <repo_name>) banned:
# every request generates max_tokens.
NO_END = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias={0: -1e30, 2: -1e30, 4: -1e30}))
PROMPTS = [
    "The three primary colors are",
    "Water boils at",
    "The largest planet in the solar system is",
    "Python is a programming language that",
    "The capital of Japan is",
    "Photosynthesis is the process by which",
    "A haiku about autumn:",
    "The speed of light is",
]


def _endpoint(client: SippClient, path: Path, name: str = "m", **groups: object) -> EndpointRef:
    context = groups.pop("context", ContextRuntimeConfig(n_ctx=1024, n_parallel=8))
    config = NativeRuntimeConfig(
        context=context,  # type: ignore[arg-type]
        observability=ObservabilityRuntimeConfig(runtime_metrics=True),
        **groups,  # type: ignore[arg-type]
    )
    return client.add(name, LocalModelDescriptor(path, config))


@pytest.fixture(scope="module")
def eight_slots(smollm_path: Path) -> Iterator[tuple[SippClient, EndpointRef]]:
    client = SippClient()
    yield client, _endpoint(client, smollm_path)
    client.close()


def test_greedy_output_alone_equals_output_beside_seven_others(
    eight_slots: tuple[SippClient, EndpointRef],
) -> None:
    client, ref = eight_slots
    alone = [client.query(p, endpoint=ref, options=GREEDY).result().text for p in PROMPTS]
    runs = [client.query(p, endpoint=ref, options=GREEDY) for p in PROMPTS]
    together = [r.result().text for r in runs]
    assert together == alone
    metrics = client.runtime_metrics(ref)
    assert metrics["busy_slots_per_step"] > 1.5, "requests should have shared steps"


def test_per_request_sampling_inside_one_batch(eight_slots: tuple[SippClient, EndpointRef]) -> None:
    client, ref = eight_slots
    grammar = 'root ::= "yes" | "no"'
    runs = [
        client.query(
            "Is the sky blue? Answer:",
            endpoint=ref,
            options=SippTextOptions(max_tokens=4, temperature=0.9),
            local=LocalTextOptions(grammar=grammar),
        ),
        client.query(PROMPTS[0], endpoint=ref, options=GREEDY),
        client.query(
            PROMPTS[1],
            endpoint=ref,
            options=SippTextOptions(max_tokens=20, temperature=0, stop=[" "]),
        ),
    ]
    constrained, greedy, stopped = (r.result() for r in runs)
    assert constrained.text in ("yes", "no")
    assert greedy.text == client.query(PROMPTS[0], endpoint=ref, options=GREEDY).result().text
    assert " " not in stopped.text and stopped.finish_reason == "stop"


def test_a_failing_request_does_not_poison_the_batch(
    eight_slots: tuple[SippClient, EndpointRef],
) -> None:
    """Eight requests decode together; one fails mid-generation (its decode fails after it
    has produced a few tokens, with the batch partly written to KV memory, as llama.cpp's
    status 2 leaves it). Only that one fails; the seven that shared its batch finish with
    exactly the text they produce alone."""
    client, ref = eight_slots
    engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
    doomed, others = PROMPTS[3], [p for p in PROMPTS if p != PROMPTS[3]]

    def alone(prompt: str) -> tuple[str, list[int]]:
        run = client.query(prompt, endpoint=ref, options=GREEDY, emit_tokens=True)
        ids = [t for batch in run for t in batch.token_ids]
        return run.result().text, ids

    solo = {p: alone(p) for p in PROMPTS}
    elsewhere = {t for p in others for t in solo[p][1]}
    elsewhere |= {t for p in PROMPTS for t in engine.model.tokenize(p, add_special=True)}
    generated = solo[doomed][1]
    # A token the doomed request generates a few steps in, which no other sequence (and no
    # earlier step of its own) ever puts in a batch: the injected failure hits only there.
    marker = next(
        (t for i, t in enumerate(generated) if i >= 3 and t not in elsewhere | set(generated[:i])),
        None,
    )
    assert marker is not None, f"no marker token in {generated}"
    before = client.runtime_metrics(ref)
    failing = FailingDecode(engine.ctx, marker, 2, reach_memory=True)
    engine.ctx = failing
    try:
        runs = {p: client.query(p, endpoint=ref, options=GREEDY) for p in PROMPTS}
        with pytest.raises(ExecutionError, match="status 2"):
            runs[doomed].result()
        assert {p: runs[p].result().text for p in others} == {p: solo[p][0] for p in others}
    finally:
        engine.ctx = failing._ctx
    assert failing.failures >= 2, "the failure should first hit a batch shared with others"
    after = client.runtime_metrics(ref)
    assert after["failed"] - before["failed"] == 1
    assert after["completed"] - before["completed"] == len(others)
    assert after["busy_slots"] == 0 and after["running"] == 0
    # Nothing of the failed batch lingers: the doomed prompt now gives its solo answer.
    assert client.query(doomed, endpoint=ref, options=GREEDY).result().text == solo[doomed][0]


def test_context_key_follow_up_only_prefills_the_new_suffix(smollm_path: Path) -> None:
    turn1 = [ChatMessage("system", "You are terse."), ChatMessage("user", "Name a fruit.")]
    with SippClient() as client:
        cached = _endpoint(
            client, smollm_path, "cached", context=ContextRuntimeConfig(n_ctx=1024, n_parallel=2)
        )
        plain = _endpoint(
            client,
            smollm_path,
            "plain",
            context=ContextRuntimeConfig(n_ctx=1024, n_parallel=2),
            cache=CacheRuntimeConfig(mode="off"),
        )
        key = LocalTextOptions(context_key="conv-1")
        first = client.chat(turn1, endpoint=cached, options=GREEDY, local=key).result()
        # something else runs on the other slot in between
        client.query("Unrelated prompt about trains", endpoint=cached, options=GREEDY).result()
        turn2 = [*turn1, ChatMessage("assistant", first.text), ChatMessage("user", "Another one?")]
        second = client.chat(turn2, endpoint=cached, options=GREEDY, local=key).result()
        assert second.local_stats is not None and second.usage is not None
        assert second.local_stats.cached_prompt_tokens >= first.usage.input_tokens  # type: ignore[union-attr]
        uncached = client.chat(turn2, endpoint=plain, options=GREEDY).result()
        assert uncached.local_stats is not None and uncached.local_stats.cached_prompt_tokens == 0
        assert second.text == uncached.text


def _snapshot_endpoint(client: SippClient, path: Path, n_ctx: int, **store: int) -> EndpointRef:
    """One slot of `n_ctx`, so every other conversation evicts the last into the store."""
    return _endpoint(
        client,
        path,
        "snap",
        context=ContextRuntimeConfig(n_ctx=n_ctx, n_parallel=1),
        cache=CacheRuntimeConfig(mode="snapshot", **store),  # type: ignore[arg-type]
    )


def test_snapshot_mode_restores_an_evicted_conversation(smollm_path: Path) -> None:
    conversation = [ChatMessage("user", "Write one sentence about the sea. " * 6)]
    with SippClient() as client:
        ref = _snapshot_endpoint(client, smollm_path, 1024, max_snapshot_entries=4)
        key = LocalTextOptions(context_key="sea")
        first = client.chat(conversation, endpoint=ref, options=GREEDY, local=key).result()
        # the only slot is taken over by another conversation: the first one is snapshotted
        client.chat(
            [ChatMessage("user", "Tell me about mountains, please, in detail.")],
            endpoint=ref,
            options=GREEDY,
            local=LocalTextOptions(context_key="hills"),
        ).result()
        again = client.chat(conversation, endpoint=ref, options=GREEDY, local=key).result()
        metrics = client.runtime_metrics(ref)
        assert metrics["snapshots_saved"] >= 1 and metrics["snapshots_restored"] >= 1
        assert again.local_stats is not None and first.usage is not None
        assert again.local_stats.cached_prompt_tokens == first.usage.input_tokens - 1
        assert again.text == first.text


@pytest.mark.parametrize(
    ("keys", "entries"),
    [
        # one conversation branched: saving branch B supersedes branch A's snapshot,
        # the one about to be restored
        (["talk", "talk", "talk"], 16),
        # a full store: saving B evicts A, the one about to be restored
        (["a", "b", "a"], 1),
    ],
)
def test_restoring_a_snapshot_survives_the_save_that_would_drop_it(
    smollm_path: Path, keys: list[str], entries: int
) -> None:
    branch_a = "Branch A: " + "the quick brown fox jumps over the lazy dog " * 3
    branch_b = "Branch B: " + "a different sentence about trains and rails " * 3
    with SippClient() as client:
        ref = _snapshot_endpoint(client, smollm_path, 256, max_snapshot_entries=entries)
        runs = [
            client.query(
                prompt, endpoint=ref, options=GREEDY, local=LocalTextOptions(context_key=key)
            ).result()
            for prompt, key in zip([branch_a, branch_b, branch_a], keys)
        ]
        first, _, again = runs
        assert again.local_stats is not None and first.usage is not None
        assert again.local_stats.cached_prompt_tokens == first.usage.input_tokens - 1
        assert again.text == first.text
        assert client.runtime_metrics(ref)["snapshots_restored"] == 1
        assert client.query("Hello", endpoint=ref, options=GREEDY).result().text  # still up


def test_snapshot_store_stays_within_its_bounds(smollm_path: Path) -> None:
    with SippClient() as client:
        ref = _snapshot_endpoint(
            client, smollm_path, 512, max_snapshot_entries=2, max_snapshot_bytes=8 << 20
        )
        for i in range(6):
            client.query(
                f"Story number {i}: " + "once upon a time " * 4, endpoint=ref, options=GREEDY
            ).result()
        metrics = client.runtime_metrics(ref)
        assert metrics["snapshots"] <= 2 and metrics["snapshot_bytes"] <= 8 << 20
        assert metrics["snapshots_saved"] >= 3


def test_prefill_chunking_gives_the_same_output(smollm_path: Path) -> None:
    # Chunk size changes llama.cpp's matmul paths, so logits move by float noise: a
    # prompt whose greedy continuation sits on a near-tie can flip (README: numerics).
    sentence = (
        "The old town of Lisbon sits on seven hills above the river Tagus, with narrow streets."
    )
    prompt = (
        "The history of the city: "
        + " ".join([sentence] * 8)
        + " The city of Lisbon is the capital of"
    )
    with SippClient() as client:
        whole = _endpoint(
            client, smollm_path, "whole", context=ContextRuntimeConfig(n_ctx=1024, n_parallel=1)
        )
        chunked = _endpoint(
            client,
            smollm_path,
            "chunked",
            context=ContextRuntimeConfig(n_ctx=1024, n_parallel=1),
            scheduler=SchedulerRuntimeConfig(prefill_chunk_size=16),
        )
        a = client.query(prompt, endpoint=whole, options=GREEDY).result()
        b = client.query(prompt, endpoint=chunked, options=GREEDY).result()
        assert a.text == b.text
        assert (
            client.runtime_metrics(chunked)["steps"] >= client.runtime_metrics(whole)["steps"] + 9
        )


def test_continuous_batching_off_runs_one_request_at_a_time(smollm_path: Path) -> None:
    with SippClient() as client:
        ref = _endpoint(
            client, smollm_path, scheduler=SchedulerRuntimeConfig(continuous_batching=False)
        )
        runs = [client.query(p, endpoint=ref, options=GREEDY) for p in PROMPTS[:4]]
        for r in runs:
            r.result()
        assert client.runtime_metrics(ref)["busy_slots_per_step"] == 1.0


def test_kv_cache_size_follows_the_documented_formula(
    smollm_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # KV bytes = n_ctx_per_slot * n_parallel * n_layer * 2 (K and V) * n_head_kv * head_dim * 2 (f16)
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims -> 23,040 bytes per token.
    with caplog.at_level(logging.DEBUG, logger="sipp.llama"), SippClient() as client:
        _endpoint(client, smollm_path, context=ContextRuntimeConfig(n_ctx=1024, n_parallel=4))
    sizes = [float(m) for m in re.findall(r"KV buffer size\s*=\s*([0-9.]+) MiB", caplog.text)]
    assert sizes, "llama.cpp did not report its KV buffer"
    assert sum(sizes) == pytest.approx(1024 * 4 * 23_040 / 2**20, rel=0.01)


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS")).split()[1])


def test_thousand_mixed_requests_return_accounting_to_baseline(smollm_path: Path) -> None:
    rng = random.Random(7)
    with SippClient() as client:
        ref = _endpoint(
            client, smollm_path, scheduler=SchedulerRuntimeConfig(max_queued_requests=2000)
        )

        def wave(n: int) -> None:
            runs = []
            for i in range(n):
                prompt = rng.choice(PROMPTS) + " " + str(i)
                opts = SippTextOptions(
                    max_tokens=rng.randint(1, 6), temperature=rng.choice([0, 0.8])
                )
                if i % 10 == 3:
                    with pytest.raises(ContextOverflowError):
                        client.query("x" * 20_000, endpoint=ref)  # rejected up front
                runs.append(
                    client.query(prompt, endpoint=ref, options=opts, emit_tokens=i % 2 == 0)
                )
                if i % 7 == 0:
                    runs[-1].cancel("mixed load")
            for run in runs:
                assert run.result(timeout=120).finish_reason in ("stop", "length", "cancelled")

        wave(200)  # warm up allocator and caches
        baseline = _rss_kib()
        for _ in range(4):
            wave(200)
        growth_mib = (_rss_kib() - baseline) / 1024
        metrics = client.runtime_metrics(ref)
        assert (
            metrics["running"] == 0 and metrics["queue_depth"] == 0 and metrics["busy_slots"] == 0
        )
        assert (
            metrics["completed"] + metrics["cancelled"] + metrics["failed"]
            == metrics["requests"]
            == 1000
        )
        assert growth_mib < 32, f"RSS grew {growth_mib:.1f} MiB over 800 requests"
        # the endpoint still answers exactly as a fresh one would
        assert client.query(PROMPTS[0], endpoint=ref, options=GREEDY).result().text


def test_queue_limit_is_enforced_under_a_burst(smollm_path: Path) -> None:
    with SippClient() as client:
        ref = _endpoint(
            client,
            smollm_path,
            context=ContextRuntimeConfig(n_ctx=512, n_parallel=2),
            scheduler=SchedulerRuntimeConfig(max_queued_requests=3),
        )
        accepted, rejected = [], 0
        lock = threading.Lock()

        def submit() -> None:
            nonlocal rejected
            try:
                run = client.query(
                    "Count: 1, 2, 3,", endpoint=ref, options=SippTextOptions(max_tokens=50)
                )
                with lock:
                    accepted.append(run)
            except OverloadedError:
                with lock:
                    rejected += 1

        threads = [threading.Thread(target=submit) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(accepted) <= 5 and rejected >= 7  # 2 running + 3 queued
        for run in accepted:
            run.result(timeout=120)
        assert client.runtime_metrics(ref)["rejected"] == rejected


def _burst_engine(client: SippClient, ref: EndpointRef) -> Any:
    engine = client._registry._endpoints[ref.id]._engine  # type: ignore[attr-defined]
    # Far longer than the test's pause: the wait ends only when the queue fills every
    # slot (or the client closes), so what follows does not depend on timing.
    engine.burst_gap_s = engine.burst_max_s = 30.0
    return engine


def test_chats_sent_together_are_prefilled_in_one_decode(smollm_path: Path) -> None:
    # The first chat reaches an idle engine well before the other seven (a pause in
    # which it would have started alone): it waits for them, and the eight prompts go
    # into one decode, so eight chats of 4 tokens take 4 steps, not 4 + 4.
    options = SippTextOptions(max_tokens=4, temperature=0)
    with SippClient() as client:
        ref = _endpoint(client, smollm_path, name="burst")
        _burst_engine(client, ref)
        before = client.runtime_metrics(ref)["steps"]
        first = client.query(PROMPTS[0], endpoint=ref, options=options, local=NO_END)
        time.sleep(0.3)
        rest = [client.query(p, endpoint=ref, options=options, local=NO_END) for p in PROMPTS[1:]]
        usages = [run.result().usage for run in [first, *rest]]
        assert [u.output_tokens for u in usages if u is not None] == [4] * 8
        assert client.runtime_metrics(ref)["steps"] - before == 4


def test_closing_ends_the_wait_for_a_burst(smollm_path: Path) -> None:
    client = SippClient()
    ref = _endpoint(client, smollm_path, name="burst")
    engine = _burst_engine(client, ref)
    run = client.query(PROMPTS[0], endpoint=ref, options=GREEDY)
    time.sleep(0.3)  # the engine waits for more
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() hung on an engine waiting for a burst"
    with pytest.raises(ClientClosedError):
        run.result()
    assert not engine._thread.is_alive()


def test_prompts_that_share_a_few_words_are_prefilled_in_the_same_decode(
    smollm_path: Path,
) -> None:
    # "The ..." prompts share a token or two: too few to wait a step for a sibling's KV,
    # so both go into the first decode and two chats of 4 tokens take 4 steps.
    options = SippTextOptions(max_tokens=4, temperature=0)
    context = ContextRuntimeConfig(n_ctx=512, n_parallel=2)
    with SippClient() as client:
        ref = _endpoint(client, smollm_path, name="few", context=context)
        _burst_engine(client, ref)
        runs = [
            client.query(p, endpoint=ref, options=options, local=NO_END)
            for p in ("The capital of Japan is", "The speed of light is")
        ]
        stats = [run.result().local_stats for run in runs]
        assert [s.cached_prompt_tokens for s in stats if s is not None] == [0, 0]
        assert client.runtime_metrics(ref)["steps"] == 4


def test_identical_prompts_sent_together_all_copy_the_first(smollm_path: Path) -> None:
    # Admitted together, the first prefills and the seven others copy its prompt after
    # that one decode (all at once, not one more per step): 4 tokens take 5 steps.
    prompt = " ".join(PROMPTS[:4])  # well over MIN_SHARED_TOKENS
    options = SippTextOptions(max_tokens=4, temperature=0)
    with SippClient() as client:
        ref = _endpoint(client, smollm_path, name="same")
        _burst_engine(client, ref)
        runs = [client.query(prompt, endpoint=ref, options=options, local=NO_END) for _ in range(8)]
        stats = [run.result().local_stats for run in runs]
        cached = [s.cached_prompt_tokens for s in stats if s is not None]
        n = stats[0].prompt_tokens if stats[0] is not None else 0
        assert sorted(cached) == [0] + [n - 1] * 7
        assert client.runtime_metrics(ref)["steps"] == 5


def test_a_lone_chat_waits_for_a_burst_no_longer_than_its_cap(smollm_path: Path) -> None:
    # Gaps far longer than the test: only burst_max_s can end the wait of a lone chat.
    with SippClient() as client:
        ref = _endpoint(client, smollm_path, name="cap")
        engine = _burst_engine(client, ref)
        engine.burst_max_s = 0.05
        got = client.query(PROMPTS[0], endpoint=ref, options=GREEDY).result()
        assert got.usage is not None and got.usage.output_tokens > 0
