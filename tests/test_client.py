"""Client contract: add/replace/close, endpoint resolution, the chat template renderer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from sipp import (
    AsyncSippClient,
    ChatMessage,
    ClientClosedError,
    ContextRuntimeConfig,
    EndpointNotFoundError,
    EndpointRef,
    InvalidRequestError,
    LocalModelDescriptor,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp.local import _llama
from sipp.local.model import load_model

SMALL = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256))


def _engine_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("sipp-engine-"))


def test_add_returns_ref_and_readding_replaces_and_frees(smollm_path: Path) -> None:
    before = _engine_threads()
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, SMALL))
        assert ref == EndpointRef("local", "m")
        old_run = client.query(
            "Count: 1, 2,", endpoint=ref, options=SippTextOptions(max_tokens=300, temperature=0)
        )
        ref2 = client.add("m", LocalModelDescriptor(smollm_path, SMALL))
        assert ref2 == ref
        assert _engine_threads() == before + 1  # the old engine thread is gone
        with pytest.raises(ClientClosedError):
            old_run.result(timeout=60)  # the replaced endpoint's run ended, not hung
        assert (
            client.query("Hi", endpoint=ref2, options=SippTextOptions(max_tokens=2)).result().text
            is not None
        )
    assert _engine_threads() == before


def test_endpoint_may_be_omitted_only_when_unambiguous(smollm_path: Path) -> None:
    with SippClient() as client:
        with pytest.raises(EndpointNotFoundError, match="no registered local endpoint"):
            client.query("x")
        client.add("a", LocalModelDescriptor(smollm_path, SMALL))
        assert client.query("Hi", options=SippTextOptions(max_tokens=2)).result() is not None
        client.add("b", LocalModelDescriptor(smollm_path, SMALL))
        with pytest.raises(InvalidRequestError, match="ambiguous"):
            client.query("x")
        with pytest.raises(EndpointNotFoundError, match="no local endpoint 'zzz'"):
            client.query("x", endpoint=EndpointRef("local", "zzz"))
        with pytest.raises(
            EndpointNotFoundError, match="no registered local endpoint supports embed"
        ):
            client.embed("x")


def test_async_client_context_manager_frees_models(smollm_path: Path) -> None:
    before = _engine_threads()

    async def main() -> str:
        async with AsyncSippClient() as client:
            ref = await client.add("m", LocalModelDescriptor(smollm_path, SMALL))
            assert _engine_threads() == before + 1
            response = await client.chat(
                [ChatMessage("user", "Hi")],
                endpoint=ref,
                options=SippTextOptions(max_tokens=4, temperature=0),
            )
            return response.text

    assert asyncio.run(main())
    assert _engine_threads() == before


def test_async_task_cancellation_cancels_the_run(smollm_path: Path) -> None:
    async def main() -> dict[str, float]:
        async with AsyncSippClient() as client:
            ref = await client.add("m", LocalModelDescriptor(smollm_path, SMALL))
            run = client.query(
                "Count: 1, 2, 3,", endpoint=ref, options=SippTextOptions(max_tokens=200)
            )
            task = asyncio.ensure_future(run.result())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            response = await run.result()
            assert response.finish_reason in ("cancelled", "length", "stop")
            return client.runtime_metrics(ref)

    metrics = asyncio.run(main())
    assert metrics["running"] == 0


def test_chat_template_matches_llama_cpp_independent_renderer(smollm_path: Path) -> None:
    loaded = load_model(smollm_path, SMALL)
    try:
        assert loaded.chat_template is not None
        messages = [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Hello!"),
            ChatMessage("assistant", "Hi there."),
            ChatMessage("user", "What is 2+2?"),
        ]
        ours = loaded.chat_template.render(messages, add_generation_prompt=True)
        theirs = loaded.model.apply_builtin_template(
            loaded.chat_template.source, [(m.role, m.content) for m in messages]
        )
        assert ours == theirs
        assert ours.endswith("<|im_start|>assistant\n")
    finally:
        loaded.close()


def test_chat_template_runs_sandboxed() -> None:
    from sipp.local.chat_template import ChatTemplate

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequestError, match="failed to render"):
        evil.render([ChatMessage("user", "x")])
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        raising.render([ChatMessage("user", "x")])


def test_installed_backends_lists_cpu() -> None:
    assert _llama.installed_backends()[0] == "cpu"
