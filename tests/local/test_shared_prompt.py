"""n identical prompts started together are prefilled once; the others copy its KV."""

from __future__ import annotations

import time
from pathlib import Path

from sipp import (
    CacheRuntimeConfig,
    ChatMessage,
    ContextRuntimeConfig,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SchedulerRuntimeConfig,
    SippClient,
    SippTextOptions,
)

from .test_engine import NO_END  # the sibling cannot end its turn early

MESSAGES = [
    ChatMessage("system", "You are a patient teacher who explains things step by step."),
    ChatMessage("user", "Explain why the sky is blue, in two sentences."),
]
GREEDY = SippTextOptions(max_tokens=24, temperature=0)


def _config(**groups: object) -> NativeRuntimeConfig:
    return NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=512, n_parallel=3), **groups)  # type: ignore[arg-type]


def _solo(path: Path, messages: list[ChatMessage]) -> str:
    with SippClient() as client:
        ref = client.add("solo", LocalModelDescriptor(path, _config()))
        return client.chat(messages, endpoint=ref, options=GREEDY).result().text


def test_three_identical_chats_prefill_once(smollm_path: Path) -> None:
    solo = _solo(smollm_path, MESSAGES)
    with SippClient() as client:
        ref = client.add("n3", LocalModelDescriptor(smollm_path, _config()))
        runs = [client.chat(MESSAGES, endpoint=ref, options=GREEDY) for _ in range(3)]
        responses = [r.result() for r in runs]
    assert [r.text for r in responses] == [solo] * 3
    stats = [r.local_stats for r in responses]
    assert all(s is not None for s in stats)
    prompt = stats[0].prompt_tokens  # type: ignore[union-attr]
    shared = [s for s in stats if s.cached_prompt_tokens == prompt - 1]  # type: ignore[union-attr]
    assert len(shared) >= 2, stats


def test_a_longer_prompt_copies_the_shared_part_of_a_running_sibling(smollm_path: Path) -> None:
    """The follow-up shares the first prompt's system turn: it copies that much, prefills
    the rest, and answers as it does alone."""
    follow = [MESSAGES[0], ChatMessage("user", "And why are sunsets red?")]
    solo = _solo(smollm_path, follow)
    # The sibling is still running when the follow-up comes, however slow the machine:
    # the follow-up starts after its first token, and it cannot end its turn early.
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, _config()))
        first = client.chat(
            MESSAGES,
            endpoint=ref,
            options=SippTextOptions(max_tokens=400, temperature=0),
            local=NO_END,
            emit_tokens=True,
        )
        next(iter(first.tokens))
        response = client.chat(follow, endpoint=ref, options=GREEDY).result()
        assert not first.done
        first.cancel()
    assert response.text == solo
    assert response.local_stats is not None
    assert 0 < response.local_stats.cached_prompt_tokens < response.local_stats.prompt_tokens - 1


def test_waiters_prefill_alone_when_the_sibling_is_cancelled(smollm_path: Path) -> None:
    """Small prefill chunks keep the first run prefilling for many steps; it is cancelled
    meanwhile, and the copies that waited for it still answer correctly."""
    long_messages = [MESSAGES[0], ChatMessage("user", " ".join(["Tell me about the sea."] * 40))]
    solo = _solo(smollm_path, long_messages)
    config = _config(scheduler=SchedulerRuntimeConfig(prefill_chunk_size=8))
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        runs = [client.chat(long_messages, endpoint=ref, options=GREEDY) for _ in range(3)]
        # Cancelled once the three are admitted (run 0 prefilling, the others waiting
        # for it), not while the engine still waits for the burst to end.
        while client.runtime_metrics(ref)["steps"] < 2:
            time.sleep(0.005)
        runs[0].cancel()
        assert runs[0].result().finish_reason == "cancelled"
        assert [r.result().text for r in runs[1:]] == [solo, solo]


def test_cache_mode_off_prefills_every_copy(smollm_path: Path) -> None:
    with SippClient() as client:
        config = _config(cache=CacheRuntimeConfig(mode="off"))
        ref = client.add("off", LocalModelDescriptor(smollm_path, config))
        runs = [client.chat(MESSAGES, endpoint=ref, options=GREEDY) for _ in range(3)]
        stats = [r.result().local_stats for r in runs]
    assert [s.cached_prompt_tokens for s in stats if s is not None] == [0, 0, 0]


def test_a_sliding_window_model_shares_too(gemma_path: Path) -> None:
    """Gemma 3's sliding-window cache: the copied cells cover every position, so the
    copies answer exactly as a solo run does. (A prompt long enough to be worth copying:
    MIN_SHARED_TOKENS.)"""
    prompt = "Explain why the sky is blue in the day and why it turns red and orange at sunset."
    with SippClient() as client:
        ref = client.add("solo", LocalModelDescriptor(gemma_path, _config()))
        solo = client.query(prompt, endpoint=ref, options=GREEDY).result().text
    with SippClient() as client:
        ref = client.add("n3", LocalModelDescriptor(gemma_path, _config()))
        runs = [client.query(prompt, endpoint=ref, options=GREEDY) for _ in range(3)]
        responses = [r.result() for r in runs]
    assert [r.text for r in responses] == [solo] * 3
    stats = [r.local_stats for r in responses if r.local_stats is not None]
    last = stats[0].prompt_tokens - 1  # a fresh endpoint: one run prefills, two copy
    assert sorted(s.cached_prompt_tokens for s in stats) == [0, last, last], stats
