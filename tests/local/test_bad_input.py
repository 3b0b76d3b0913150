"""Each bad input gets a typed error with a clear message, and the process carries on."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sipp import (
    BackendUnavailableError,
    ChatMessage,
    ClientClosedError,
    ContextOverflowError,
    ContextRuntimeConfig,
    EndpointRef,
    InvalidRequestError,
    LocalEmbedOptions,
    LocalModelDescriptor,
    ModelLoadError,
    NativeRuntimeConfig,
    OverloadedError,
    SchedulerRuntimeConfig,
    SippClient,
    SippTextOptions,
    UnsupportedOperationError,
)

Client = tuple[SippClient, EndpointRef]


def test_missing_file(tmp_path: Path) -> None:
    with SippClient() as client, pytest.raises(ModelLoadError, match="model file not found"):
        client.add("m", LocalModelDescriptor(tmp_path / "nope.gguf"))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with SippClient() as client, pytest.raises(ModelLoadError, match="not a file"):
        client.add("m", LocalModelDescriptor(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with SippClient() as client, pytest.raises(ModelLoadError, match="not a GGUF file"):
        client.add("m", LocalModelDescriptor(bogus))


@pytest.mark.parametrize("keep", [4, 64, 1 << 20, 60_000_000])
def test_truncated_gguf(tmp_path: Path, smollm_path: Path, keep: int) -> None:
    truncated = tmp_path / "truncated.gguf"
    with smollm_path.open("rb") as src:
        truncated.write_bytes(src.read(keep))
    with SippClient() as client, pytest.raises(ModelLoadError, match="could not load"):
        client.add("m", LocalModelDescriptor(truncated))


def test_chat_on_a_model_without_template_fails_clearly_but_query_works(gemma_path: Path) -> None:
    with SippClient() as client:
        ref = client.add(
            "g",
            LocalModelDescriptor(
                gemma_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=512))
            ),
        )
        with pytest.raises(UnsupportedOperationError, match=r"no tokenizer\.chat_template"):
            client.chat([ChatMessage("user", "hi")], endpoint=ref)
        response = client.query(
            "Paris is the capital city of",
            endpoint=ref,
            options=SippTextOptions(max_tokens=8, temperature=0),
        ).result()
        assert "France" in response.text


def test_empty_messages_and_wrong_types(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(InvalidRequestError, match="at least one message"):
        client.chat([], endpoint=ref)
    with pytest.raises(InvalidRequestError, match="list of messages"):
        client.chat("hello", endpoint=ref)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="unknown chat role"):
        client.chat([{"role": "robot", "content": "x"}], endpoint=ref)
    with pytest.raises(InvalidRequestError, match="prompt string"):
        client.query(42, endpoint=ref)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="SippTextOptions"):
        client.query("x", endpoint=ref, options={"max_tokens": 3})  # type: ignore[arg-type]


def test_prompt_longer_than_context(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(ContextOverflowError, match="per slot"):
        client.query("word " * 5000, endpoint=ref)
    # The endpoint still serves the next request.
    assert (
        client.query("Hi", endpoint=ref, options=SippTextOptions(max_tokens=2)).result().text
        is not None
    )


LONE_SURROGATE = "a \ud800 b"  # a str Python (and JSON's \\u escapes) allow, UTF-8 does not


def test_text_that_is_not_valid_unicode(text_client: Client, embed_client: Client) -> None:
    client, ref = text_client
    two = SippTextOptions(max_tokens=2)
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        client.query(LONE_SURROGATE, endpoint=ref, options=two)
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        client.chat([ChatMessage("user", LONE_SURROGATE)], endpoint=ref, options=two)
    embedder, embed_ref = embed_client
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        embedder.embed(LONE_SURROGATE, endpoint=embed_ref, local=LocalEmbedOptions())
    assert client.query("Hi", endpoint=ref, options=two).result().text is not None


def test_provider_or_endpoint_options_on_local_endpoint(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(InvalidRequestError, match="provider_options"):
        client.query("x", endpoint=ref, provider_options={"reasoning_effort": "low"})
    with pytest.raises(InvalidRequestError, match="endpoint_options"):
        client.query("x", endpoint=ref, endpoint_options={"a": 1})


def test_unknown_backend_and_missing_backend(
    smollm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIPP_PYTHON_BACKEND", "cuda")
    with SippClient() as client, pytest.raises(BackendUnavailableError, match=r"installed: cpu"):
        client.add("m", LocalModelDescriptor(smollm_path))
    monkeypatch.setenv("SIPP_PYTHON_BACKEND", "tpu")
    with (
        SippClient() as client,
        pytest.raises(BackendUnavailableError, match="choose one of auto, cpu"),
    ):
        client.add("m", LocalModelDescriptor(smollm_path))


def test_explicit_cpu_backend_loads(smollm_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPP_PYTHON_BACKEND", "cpu")
    with SippClient() as client:
        ref = client.add(
            "m",
            LocalModelDescriptor(
                smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256))
            ),
        )
        assert (
            client.query("Hi", endpoint=ref, options=SippTextOptions(max_tokens=2)).result().usage
            is not None
        )


def test_calling_a_closed_client(smollm_path: Path) -> None:
    client = SippClient()
    ref = client.add(
        "m",
        LocalModelDescriptor(
            smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256))
        ),
    )
    client.close()
    with pytest.raises(ClientClosedError):
        client.query("x", endpoint=ref)
    with pytest.raises(ClientClosedError):
        client.add("again", LocalModelDescriptor(smollm_path))
    client.close()  # closing twice is fine


def test_queue_limit_rejects_with_overloaded(smollm_path: Path) -> None:
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=512),
        scheduler=SchedulerRuntimeConfig(max_running_requests=1, max_queued_requests=1),
    )
    with SippClient() as client:
        ref = client.add("m", LocalModelDescriptor(smollm_path, config))
        long = SippTextOptions(max_tokens=200, temperature=0)
        first = client.query("Count: 1, 2, 3,", endpoint=ref, options=long)
        second = client.query("Count: 1, 2, 3,", endpoint=ref, options=long)
        with pytest.raises(OverloadedError, match="queue is full"):
            # one running + one queued is the limit; a third must fail at once
            for _ in range(3):
                client.query("Count: 1, 2, 3,", endpoint=ref, options=long)
        first.cancel()
        second.cancel()
        assert first.result().finish_reason in ("cancelled", "length", "stop")
        assert second.result().finish_reason in ("cancelled", "length", "stop")
        metrics = client.runtime_metrics(ref)
        assert metrics["rejected"] >= 1


def test_close_during_generation_fails_the_run_cleanly(smollm_path: Path) -> None:
    client = SippClient()
    ref = client.add(
        "m",
        LocalModelDescriptor(
            smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=512))
        ),
    )
    run = client.query(
        "Count: 1, 2, 3,",
        endpoint=ref,
        options=SippTextOptions(max_tokens=400, temperature=0),
        emit_tokens=True,
    )
    next(iter(run))
    client.close()
    with pytest.raises(ClientClosedError):
        run.result(timeout=60)


def test_close_waits_for_a_caller_still_tokenizing(smollm_path: Path) -> None:
    """A sync call tokenizes in the caller's thread: close() must not free the model
    under it (that aborted the process inside llama_tokenize)."""
    client = SippClient()
    ref = client.add(
        "m",
        LocalModelDescriptor(
            smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=512))
        ),
    )
    model: Any = client._registry._endpoints[ref.id].loaded.model  # type: ignore[attr-defined]
    tokenize = model.tokenize
    inside, release = threading.Event(), threading.Event()

    def held_tokenize(text: str, **kw: Any) -> list[int]:
        inside.set()
        release.wait(60)
        return tokenize(text, **kw)  # type: ignore[no-any-return]

    model.tokenize = held_tokenize
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(
                client.query("Hi", endpoint=ref, options=SippTextOptions(max_tokens=2)).result()
            )
        except ClientClosedError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert inside.wait(60)
    closer = threading.Thread(target=client.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # held by the caller still inside tokenize
    assert model.ptr is not None
    release.set()
    closer.join(60)
    caller.join(60)
    assert not closer.is_alive() and not caller.is_alive()
    assert model.ptr is None and len(outcome) == 1  # freed after the caller left it
