"""`LocalEmbedOptions(context_key=...)` keeps that key's results: embedding the same
input again under the same key answers from memory, without running the model."""

from __future__ import annotations

import pytest

from sipp import EndpointRef, InvalidRequestError, LocalEmbedOptions, SippClient


def test_context_key_answers_a_repeated_input_without_decoding(
    embed_client: tuple[SippClient, EndpointRef],
) -> None:
    client, ref = embed_client
    key = LocalEmbedOptions(context_key="docs", normalize=True)
    before = client.runtime_metrics(ref)
    first = client.embed("Sipp embedding input.", endpoint=ref, local=key).result()
    again = client.embed("Sipp embedding input.", endpoint=ref, local=key).result()
    after = client.runtime_metrics(ref)
    assert again.values == first.values and again.usage == first.usage
    assert again.normalized and again.dimensions == first.dimensions
    assert after["embed_memo_hits"] - before["embed_memo_hits"] == 1
    assert after["steps"] - before["steps"] == 1  # only the first call decoded
    n_tokens = first.usage.input_tokens if first.usage else 0
    assert after["cached_prompt_tokens"] - before["cached_prompt_tokens"] == n_tokens
    again.values[0] = 42.0  # the caller owns its vector; the memo keeps its own copy
    third = client.embed("Sipp embedding input.", endpoint=ref, local=key).result()
    assert third.values == first.values


def test_other_keys_inputs_and_options_run_the_model(
    embed_client: tuple[SippClient, EndpointRef],
) -> None:
    client, ref = embed_client
    text = "Another embedding input."
    client.embed(text, endpoint=ref, local=LocalEmbedOptions(context_key="a")).result()
    before = client.runtime_metrics(ref)
    for local in (
        LocalEmbedOptions(context_key="b"),  # another key
        LocalEmbedOptions(context_key="a", normalize=True),  # other options
        None,  # no key: never remembered
        None,
    ):
        client.embed(text, endpoint=ref, local=local).result()
    client.embed(text + " More.", endpoint=ref, local=LocalEmbedOptions(context_key="a")).result()
    after = client.runtime_metrics(ref)
    assert after["embed_memo_hits"] == before["embed_memo_hits"]
    assert after["completed"] - before["completed"] == 5


def test_context_key_must_be_a_non_empty_string() -> None:
    with pytest.raises(InvalidRequestError, match="non-empty string"):
        LocalEmbedOptions(context_key="")
