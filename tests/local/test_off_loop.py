"""CPU-bound preparation never runs on the caller's event loop, and KV snapshot
copies never run under the engine lock that `submit` takes.

The async client (and so the gateway) hands template rendering, tokenizing and
grammar compilation to the endpoint's preparation thread; errors from there still
arrive as the same typed errors, through the run."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sipp import (
    AsyncSippClient,
    CacheRuntimeConfig,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    InvalidRequestError,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp.local import _llama

GREEDY = SippTextOptions(max_tokens=4, temperature=0)


def _endpoint(client: SippClient | AsyncSippClient, ref: EndpointRef) -> Any:
    return client._registry._endpoints[ref.id]


def _record_threads(fn: Callable[..., Any], seen: list[int]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(threading.get_ident())
        return fn(*args, **kwargs)

    return wrapper


def test_async_calls_prepare_off_the_loop_and_keep_typed_errors(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256, n_parallel=2))
        async with AsyncSippClient() as client:
            ref = await client.add("m", LocalModelDescriptor(smollm_path, config))
            endpoint = _endpoint(client, ref)
            tokenized: list[int] = []
            rendered: list[int] = []
            compiled: list[int] = []
            model, template = endpoint.loaded.model, endpoint.loaded.chat_template
            monkeypatch.setattr(model, "tokenize", _record_threads(model.tokenize, tokenized))
            monkeypatch.setattr(template, "render", _record_threads(template.render, rendered))
            monkeypatch.setattr(
                _llama,
                "json_schema_to_grammar",
                _record_threads(_llama.json_schema_to_grammar, compiled),
            )
            schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
            chat = await client.chat(
                [{"role": "user", "content": "Hi"}],
                endpoint=ref,
                options=GREEDY,
                local=LocalTextOptions(json_schema=schema),
            )
            query = await client.query("The sky is", endpoint=ref, options=GREEDY)
            assert chat.finish_reason in ("stop", "length") and query.text
            # Preparation errors are the same typed errors, raised by the run.
            with pytest.raises(ContextOverflowError, match="per slot"):
                await client.query("word " * 400, endpoint=ref, options=GREEDY)
            with pytest.raises(InvalidRequestError, match="grammar"):
                await client.query(
                    "x", endpoint=ref, local=LocalTextOptions(grammar="root ::= nothing")
                )
            assert len(tokenized) == 4 and rendered and compiled
            assert loop_thread not in tokenized + rendered + compiled

    asyncio.run(main())


def test_async_embed_tokenizes_off_the_loop(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        loop_thread = threading.get_ident()
        config = NativeRuntimeConfig(
            context=ContextRuntimeConfig(n_ctx=64, embeddings=True, pooling="mean")
        )
        async with AsyncSippClient() as client:
            ref = await client.add("e", LocalModelDescriptor(smollm_path, config))
            model = _endpoint(client, ref).loaded.model
            tokenized: list[int] = []
            monkeypatch.setattr(model, "tokenize", _record_threads(model.tokenize, tokenized))
            assert len((await client.embed("red apples", endpoint=ref)).values) == model.n_embd
            with pytest.raises(ContextOverflowError, match="embeds at most"):
                await client.embed("word " * 200, endpoint=ref)
            assert len(tokenized) == 2 and loop_thread not in tokenized

    asyncio.run(main())


def test_snapshot_copies_run_outside_the_engine_lock(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=512, n_parallel=1),
        cache=CacheRuntimeConfig(mode="snapshot"),
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        engine = _endpoint(client, ref)._engine
        held: list[bool] = []

        def spy(name: str) -> None:
            real = getattr(engine.ctx, name)

            def wrapper(*args: Any) -> Any:
                held.append(engine._cond._is_owned())  # does this (worker) thread hold it?
                return real(*args)

            monkeypatch.setattr(engine.ctx, name, wrapper)

        spy("seq_state")
        spy("set_seq_state")
        first = "A long story about a lighthouse keeper and the sea. " * 4
        second = "A recipe for bread with flour, water, yeast and salt. " * 4
        for prompt in (first, second, first):  # save first, save second + restore first
            client.query(prompt, endpoint=ref, options=GREEDY).result()
        metrics = client.runtime_metrics(ref)
        assert metrics["snapshots_restored"] >= 1
        assert len(held) >= 3 and not any(held)
