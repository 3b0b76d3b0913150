"""One embeddings request with many inputs, run without unbounded fan-out.

An endpoint that takes many inputs per call (OpenAI-style providers) gets them
in one upstream request. Any other (local engines, which already share decode
steps across concurrent embeds) gets at most `WINDOW` runs at a time. The first
failure, or the caller going away (the awaiting task is cancelled), cancels
every run still outstanding and starts no more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from .._client import AsyncSippClient
from .._descriptors import EndpointRef
from .._runs import AsyncEmbeddingRun
from .._types import SippEmbeddingResponse

__all__ = ["WINDOW", "embed_all"]

WINDOW = 8  # runs in flight per request on endpoints that embed one input per call

Track = Callable[[AsyncEmbeddingRun], AsyncEmbeddingRun]


async def embed_all(
    client: AsyncSippClient,
    ref: EndpointRef,
    inputs: Sequence[str],
    track: Track,
) -> list[SippEmbeddingResponse]:
    """The embeddings of `inputs`, in order. `track` sees every run as it starts, so
    the request's cleanup can cancel what is left if this coroutine never returns."""
    batch = client._embed_batch(inputs, endpoint=ref)
    if batch is not None:
        runs = [track(run) for run in batch]
        try:
            return [await run for run in runs]
        finally:
            for run in runs:
                if not run.done:
                    run.cancel("another input of the batch failed")
    gate = asyncio.Semaphore(WINDOW)

    async def one(text: str) -> SippEmbeddingResponse:
        async with gate:
            return await track(client.embed(text, endpoint=ref))

    tasks = [asyncio.ensure_future(one(text)) for text in inputs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # a failure or a cancelled caller: start nothing more
            task.cancel()
