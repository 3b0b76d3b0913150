"""Embeddings on real models: the default model loaded for embeddings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    EndpointRef,
    LocalEmbedOptions,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    UnsupportedOperationError,
)

Client = tuple[SippClient, EndpointRef]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embed_returns_a_vector_with_metadata(embed_client: Client) -> None:
    client, ref = embed_client
    response = client.embed("Sipp embedding input.", endpoint=ref).result()
    assert response["pooling"] == "mean"
    assert response.normalized is False
    assert response.dimensions == 576 == len(response["values"])
    assert response.usage is not None and response.usage.input_tokens > 0
    assert any(v != 0 for v in response.values)


def test_normalize_gives_unit_length(embed_client: Client) -> None:
    client, ref = embed_client
    response = client.embed(
        "unit length please", endpoint=ref, local=LocalEmbedOptions(normalize=True)
    ).result()
    assert response.normalized
    assert math.isclose(math.sqrt(sum(v * v for v in response.values)), 1.0, rel_tol=1e-5)


def test_concurrent_embeddings_equal_one_at_a_time(embed_client: Client) -> None:
    client, ref = embed_client
    texts = [
        "the cat sat on the mat",
        "quantum chromodynamics",
        "turn on dark mode",
        "bonjour le monde",
        "x",
    ]
    single = [client.embed(t, endpoint=ref).result().values for t in texts]
    runs = [
        client.embed(t, endpoint=ref) for t in texts
    ]  # queued together, decoded in shared batches
    batched = [r.result().values for r in runs]
    for a, b in zip(single, batched):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    metrics = client.runtime_metrics(ref)
    assert metrics["steps"] < metrics["requests"], "embeddings should have shared decodes"


def test_similar_texts_are_closer_than_unrelated(embed_client: Client) -> None:
    client, ref = embed_client
    a, b, c = (
        client.embed(t, endpoint=ref).result().values
        for t in ("I love my dog", "I adore my puppy", "Stock markets fell sharply on Tuesday")
    )
    assert _cos(a, b) > _cos(a, c)


@pytest.mark.parametrize("pooling", ["cls", "last", "none"])
def test_pooling_modes(smollm_path: Path, pooling: str) -> None:
    with SippClient() as client:
        ref = client.add(
            "e",
            LocalModelDescriptor(
                smollm_path,
                NativeRuntimeConfig(
                    context=ContextRuntimeConfig(n_ctx=256, embeddings=True, pooling=pooling)
                ),
            ),
        )
        response = client.embed(
            "three word input", endpoint=ref, local=LocalEmbedOptions(normalize=True)
        ).result()
    assert response.pooling == pooling
    assert response.usage is not None
    rows = response.usage.input_tokens if pooling == "none" else 1
    assert response.token_count == rows
    assert len(response.values) == rows * response.dimensions
    first = response.values[: response.dimensions]
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-5)


def test_embed_on_text_only_load_is_a_clear_error(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(UnsupportedOperationError, match="not loaded for embeddings"):
        client.embed("hello", endpoint=ref)


def test_query_on_embedding_load_is_a_clear_error(embed_client: Client) -> None:
    client, ref = embed_client
    with pytest.raises(UnsupportedOperationError, match="embeddings only"):
        client.query("hello", endpoint=ref)
