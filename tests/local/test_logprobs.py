"""Token log probabilities from a real model: shapes, values, streaming, stop strings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sipp import (
    ChatMessage,
    EndpointRef,
    InvalidRequestError,
    LocalTextOptions,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
    SippTextResponse,
    TokenLogprob,
)
from sipp.local.logprobs import token_logprob

Client = tuple[SippClient, EndpointRef]
PROMPT = "The three primary colors are"
GREEDY = SippTextOptions(max_tokens=16, temperature=0)
TOP5 = LocalTextOptions(logprobs=True, top_logprobs=5)


def _run(
    client: SippClient,
    ref: EndpointRef,
    local: LocalTextOptions | None,
    options: SippTextOptions = GREEDY,
    prompt: str = PROMPT,
) -> tuple[SippTextResponse, list[TokenLogprob], list[int]]:
    """The response plus the logprobs and token ids its streamed batches carried."""
    run = client.query(prompt, endpoint=ref, options=options, local=local, emit_tokens=True)
    streamed: list[TokenLogprob] = []
    ids: list[int] = []
    for batch in run:
        assert len(batch.logprobs) in (0, len(batch.token_ids))
        streamed.extend(batch.logprobs)
        ids.extend(batch.token_ids)
    return run.result(), streamed, ids


def test_greedy_tokens_are_the_top_choice_with_its_logprob(text_client: Client) -> None:
    client, ref = text_client
    response, streamed, ids = _run(client, ref, TOP5)
    assert response.finish_reason == "length"
    assert response.logprobs is not None and response.usage is not None
    assert len(response.logprobs) == response.usage.output_tokens == len(ids)
    assert "".join(lp.token for lp in response.logprobs) == response.text
    for lp in response.logprobs:
        assert len(lp.top) == 5
        assert lp.top[0].token == lp.token and lp.top[0].logprob == lp.logprob
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert 0 < sum(math.exp(t.logprob) for t in lp.top) <= 1 + 1e-6
        assert lp.logprob <= 0
        assert bytes(lp.bytes) == lp.token.encode()
    assert streamed == list(response.logprobs)


def test_logprobs_without_top_report_the_same_values(text_client: Client) -> None:
    client, ref = text_client
    with_top = _run(client, ref, TOP5)[0].logprobs
    plain = _run(client, ref, LocalTextOptions(logprobs=True))[0].logprobs
    assert plain is not None and with_top is not None
    assert all(lp.top == () for lp in plain)
    assert [lp.token for lp in plain] == [lp.token for lp in with_top]
    assert [lp.logprob for lp in plain] == pytest.approx([lp.logprob for lp in with_top], abs=1e-3)


def test_not_requested_means_none_and_empty_batches(text_client: Client) -> None:
    client, ref = text_client
    for local in (None, LocalTextOptions(logprobs=False)):
        response, streamed, ids = _run(client, ref, local)
        assert response.logprobs is None and streamed == []
        assert response.usage is not None and len(ids) == response.usage.output_tokens


def test_values_are_the_models_distribution_not_the_samplers(text_client: Client) -> None:
    """Temperature, top-k and penalties shape the draw, not the reported distribution:
    the first step (same prompt, same logits) reports the same top tokens either way."""
    client, ref = text_client
    greedy = _run(client, ref, TOP5)[0].logprobs
    hot = LocalTextOptions(
        logprobs=True,
        top_logprobs=5,
        sampling=SamplingRuntimeConfig(seed=7, top_k=2, frequency_penalty=2.0),
    )
    sampled = _run(client, ref, hot, SippTextOptions(max_tokens=4, temperature=1.8))[0].logprobs
    assert greedy is not None and sampled is not None
    assert [t.token for t in sampled[0].top] == [t.token for t in greedy[0].top]
    assert [t.logprob for t in sampled[0].top] == pytest.approx(
        [t.logprob for t in greedy[0].top], abs=1e-3
    )


def test_the_end_of_generation_token_is_not_reported(text_client: Client) -> None:
    client, ref = text_client
    local = LocalTextOptions(logprobs=True, top_logprobs=3)
    run = client.chat(
        [ChatMessage("user", "Say hello.")],
        endpoint=ref,
        options=SippTextOptions(max_tokens=200, temperature=0),
        local=local,
    )
    response = run.result()
    assert response.finish_reason == "stop" and response.usage is not None
    assert response.logprobs is not None
    assert len(response.logprobs) == response.usage.output_tokens
    assert "".join(lp.token for lp in response.logprobs) == response.text


def test_a_stop_string_reports_only_tokens_whose_text_was_released(text_client: Client) -> None:
    client, ref = text_client
    full = _run(client, ref, TOP5)[0]
    assert full.logprobs is not None
    # Stop on a string starting inside the greedy answer's fourth token.
    start = sum(len(lp.token) for lp in full.logprobs[:3])
    stop = full.text[start + 1 : start + 4]
    assert stop and stop not in full.text[: start + 1]
    options = SippTextOptions(max_tokens=16, temperature=0, stop=[stop])
    response, streamed, ids = _run(client, ref, TOP5, options)
    assert response.finish_reason == "stop" and response.logprobs is not None
    assert response.text == full.text[: start + 1]
    # The fourth token released one character before the stop: it is reported whole;
    # the tokens of the stop string itself are not.
    assert list(response.logprobs) == list(full.logprobs[:4]) == streamed
    assert len(ids) == 4


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"top_logprobs": 3}, "top_logprobs needs logprobs=True"),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs needs logprobs=True"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be <= 20"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be >= 0"),
        ({"logprobs": True, "top_logprobs": 2.0}, "top_logprobs must be an integer"),
        ({"logprobs": "yes"}, "logprobs must be a bool"),
    ],
)
def test_bad_logprob_options_are_rejected(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        LocalTextOptions(**kwargs)  # type: ignore[arg-type]


def test_log_softmax_matches_a_float64_reference(text_client: Client) -> None:
    """The vectorised maths against a plain float64 computation, on a spread-out row."""
    client, ref = text_client
    model = client._registry._endpoints[ref.id].loaded.model  # type: ignore[attr-defined]
    rng = np.random.default_rng(3)
    row = (rng.standard_normal(model.n_vocab) * 8).astype(np.float32)
    wide = row.astype(np.float64)
    reference = wide - (wide.max() + math.log(np.exp(wide - wide.max()).sum()))
    lp = token_logprob(model, row, 1234, 20)
    assert lp.logprob == pytest.approx(reference[1234], abs=1e-5)
    best = np.argsort(reference)[::-1][:20]
    assert [t.logprob for t in lp.top] == pytest.approx(list(reference[best]), abs=1e-5)
    assert [t.token for t in lp.top] == [model.token_text(int(t)) for t in best]
    assert lp.to_dict()["top"][0] == lp.top[0].to_dict()


EMOJI = "Emoji list: 🎉 party, 🍕 pizza, 🚀 rocket, 🌍"


def test_tokens_split_inside_a_character_arrive_with_the_batch_that_completes_it(
    text_client: Client,
) -> None:
    """An emoji spans several byte tokens; none of them may go missing from the batches."""
    client, ref = text_client
    options = SippTextOptions(max_tokens=40, temperature=0)
    response, streamed, ids = _run(client, ref, None, options, EMOJI)
    assert response.usage is not None
    model = client._registry._endpoints[ref.id].loaded.model  # type: ignore[attr-defined]
    assert b"".join(model.piece(t) for t in ids) == response.text.encode()
    logged, streamed, _ = _run(client, ref, LocalTextOptions(logprobs=True), options, EMOJI)
    assert logged.logprobs is not None and logged.text == response.text
    assert list(logged.logprobs) == streamed
    assert b"".join(bytes(lp.bytes) for lp in logged.logprobs) == response.text.encode()
