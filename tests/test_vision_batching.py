"""Image requests in the scheduler: beside text requests, and across turns.

Same tiny model and reference as `test_vision.py`. These cases have no near tie in
their greedy steps (top-2 gaps above 0.08), so batching noise cannot flip a token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sipp import (
    CacheRuntimeConfig,
    ChatMessage,
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    LocalTextOptions,
    MultimodalRuntimeConfig,
    NativeRuntimeConfig,
    SippClient,
    SippTextResponse,
)

from .make_tiny_vision import MMPROJ_NAME, generate
from .test_vision import GREEDY, IMAGES, QUESTIONS, Reference, assert_same_greedy, load_vision

Client = tuple[SippClient, EndpointRef]
CLEAR = [("gradient", QUESTIONS[0]), ("stripes", QUESTIONS[1]), ("stripes", QUESTIONS[0])]


@pytest.fixture(scope="module")
def vision_gguf() -> Path:
    return generate()


@pytest.fixture(scope="module")
def vision(vision_gguf: Path) -> Iterator[Client]:
    client, ref = load_vision(vision_gguf, n_parallel=4, n_ctx=1024)
    yield client, ref
    client.close()


@pytest.fixture(scope="module")
def reference(vision_gguf: Path) -> Iterator[Reference]:
    ref = Reference(vision_gguf)
    yield ref
    ref.close()


def _ask(name: str, question: str) -> list[ChatMessage]:
    return [ChatMessage("user", question, images=(IMAGES[name],))]


def _tokens(client: SippClient, ref: EndpointRef, messages: list[ChatMessage]) -> list[int]:
    run = client.chat(messages, endpoint=ref, options=GREEDY, emit_tokens=True)
    return [t for batch in run for t in batch.token_ids]


def test_image_requests_batch_beside_text_requests(vision: Client) -> None:
    client, ref = vision
    text_only = [ChatMessage("user", "The picture has stripes of red, orange and blue.")]
    jobs = [_ask(*case) for case in CLEAR] + [text_only]
    solo = [_tokens(client, ref, messages) for messages in jobs]
    before = client.runtime_metrics(ref)
    runs = [client.chat(m, endpoint=ref, options=GREEDY, emit_tokens=True) for m in jobs]
    together = [[t for batch in run for t in batch.token_ids] for run in runs]
    after = client.runtime_metrics(ref)
    assert together == solo
    steps = after["steps"] - before["steps"]
    # More than one request was in flight per step on average: they ran together.
    assert (after["busy_slot_steps"] - before["busy_slot_steps"]) / steps > 1.5


def test_identical_image_prompts_prefill_once(vision: Client) -> None:
    client, ref = vision
    messages = _ask(*CLEAR[1])
    runs = [client.chat(messages, endpoint=ref, options=GREEDY) for _ in range(3)]
    responses = [run.result() for run in runs]
    assert len({r.text for r in responses}) == 1
    stats = [r.local_stats for r in responses]
    assert all(s is not None for s in stats)
    prompt = stats[0].prompt_tokens  # type: ignore[union-attr]
    # Waiting siblings copy the shared prefix (the image included) instead of encoding it.
    assert sum(s.cached_prompt_tokens >= prompt - 1 for s in stats) >= 1  # type: ignore[union-attr]


def _turns(name: str, answer: str, follow_up: str) -> list[ChatMessage]:
    return [
        *_ask(name, QUESTIONS[0]),
        ChatMessage("assistant", answer),
        ChatMessage("user", follow_up),
    ]


def _second_turn(
    client: SippClient, ref: EndpointRef, name: str, key: str
) -> tuple[SippTextResponse, SippTextResponse, list[ChatMessage]]:
    local = LocalTextOptions(context_key=key)
    first = client.chat(_ask(name, QUESTIONS[0]), endpoint=ref, options=GREEDY, local=local)
    first_response = first.result()
    messages = _turns(name, first_response.text, "And what colour is it?")
    second = client.chat(messages, endpoint=ref, options=GREEDY, local=local, emit_tokens=True)
    list(second)
    return first_response, second.result(), messages


def test_a_repeated_image_is_reused_across_turns(vision: Client, reference: Reference) -> None:
    client, ref = vision
    first, second, messages = _second_turn(client, ref, "gradient", "conversation-a")
    assert first.local_stats is not None and second.local_stats is not None
    # The whole first prompt (image embeddings included) came from the slot's KV.
    assert second.local_stats.cached_prompt_tokens >= first.local_stats.prompt_tokens - 1
    answer = messages[1].content
    text = (
        f"<|im_start|>user\n<__media__>{QUESTIONS[0]}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        "<|im_start|>user\nAnd what colour is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    expected, expected_lp, gaps = reference.greedy(text, [IMAGES["gradient"]], 16)
    local = LocalTextOptions(context_key="conversation-a", logprobs=True)
    run = client.chat(messages, endpoint=ref, options=GREEDY, local=local, emit_tokens=True)
    batches = list(run)
    tokens = [t for b in batches for t in b.token_ids]
    logprobs = [lp.logprob for b in batches for lp in b.logprobs]
    assert_same_greedy(tokens, logprobs, expected, expected_lp, gaps)


def test_another_image_is_not_taken_for_the_cached_one(vision: Client) -> None:
    client, ref = vision
    expected = client.chat(_ask("checker", QUESTIONS[0]), endpoint=ref, options=GREEDY).result()
    local = LocalTextOptions(context_key="conversation-b")
    client.chat(_ask("gradient", QUESTIONS[0]), endpoint=ref, options=GREEDY, local=local).result()
    other = client.chat(_ask("checker", QUESTIONS[0]), endpoint=ref, options=GREEDY, local=local)
    response = other.result()
    assert response.local_stats is not None
    # Only the text before the image matches; the new image is encoded afresh.
    assert 0 < response.local_stats.cached_prompt_tokens < 10
    assert response.text == expected.text


def test_snapshots_keep_image_prefixes(vision_gguf: Path) -> None:
    """With one slot and snapshot mode, a conversation evicted by another comes back
    from host memory, its image embeddings included."""
    client = SippClient()
    cfg = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_threads=1, n_ctx=1024, n_parallel=1),
        cache=CacheRuntimeConfig(mode="snapshot"),
        multimodal=MultimodalRuntimeConfig(projector_path=str(vision_gguf.parent / MMPROJ_NAME)),
    )
    ref = client.add("snap", LocalModelDescriptor(vision_gguf, cfg))
    try:
        local = LocalTextOptions(context_key="conversation-c")
        first = client.chat(
            _ask("stripes", QUESTIONS[0]), endpoint=ref, options=GREEDY, local=local
        )
        answer = first.result().text
        client.chat(_ask("checker", QUESTIONS[1]), endpoint=ref, options=GREEDY).result()
        messages = _turns("stripes", answer, "Tell me more.")
        second = client.chat(messages, endpoint=ref, options=GREEDY, local=local).result()
        assert second.local_stats is not None and first.result().local_stats is not None
        assert second.local_stats.cached_prompt_tokens >= 98
        assert client.runtime_metrics(ref)["snapshots_restored"] >= 1
    finally:
        client.close()
