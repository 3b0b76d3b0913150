"""Run one request through the sync or the async client, the same way."""

from __future__ import annotations

import asyncio
from typing import Any

from sipp import AsyncSippClient, SippClient, TokenBatch
from sipp._descriptors import EndpointDescriptor


def call(
    mode: str, descriptor: EndpointDescriptor, op: str, payload: Any, **kwargs: Any
) -> tuple[Any, list[TokenBatch]]:
    stream = kwargs.get("emit_tokens", False)
    if mode == "sync":
        with SippClient() as client:
            ref = client.add("g", descriptor)
            run = getattr(client, op)(payload, endpoint=ref, **kwargs)
            batches = list(run) if stream else []
            return run.result(timeout=30), batches

    async def main() -> tuple[Any, list[TokenBatch]]:
        async with AsyncSippClient() as client:
            ref = await client.add("g", descriptor)
            run = getattr(client, op)(payload, endpoint=ref, **kwargs)
            batches = [b async for b in run] if stream else []
            return await run.result(), batches

    return asyncio.run(main())
