"""A generation cut in the middle of a multi-byte character (by `max_tokens`, or the
context running out) drops the incomplete bytes: no text ends with U+FFFD, and the
streamed text always equals the final text."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SippClient,
    SippTextOptions,
)
from sipp.local.text_stream import TextStream

EMOJI = "🎉🎉🎉"


@pytest.mark.parametrize("cut", range(1, 4))
def test_flush_drops_an_incomplete_trailing_character(cut: int) -> None:
    data = "ok 🎉".encode()
    stream = TextStream()
    streamed = stream.feed(data[: len(data) - 4 + cut]) + stream.flush()
    assert streamed == stream.text == "ok "


def test_flush_keeps_invalid_bytes_that_are_not_a_cut_character() -> None:
    stream = TextStream()
    streamed = stream.feed(b"a\xffb") + stream.flush()
    assert streamed == stream.text == "a\ufffdb"  # garbage mid-text stays visible


@pytest.fixture(scope="module")
def client_ref(smollm_path: Path):  # type: ignore[no-untyped-def]
    with SippClient() as client:
        config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=256, n_parallel=1))
        yield client, client.add("m", LocalModelDescriptor(smollm_path, config))


def test_max_tokens_inside_an_emoji_ends_on_a_whole_character(client_ref) -> None:  # type: ignore[no-untyped-def]
    client, ref = client_ref
    # The grammar forces the emoji, so greedy decoding must spell it byte token by token.
    grammar = f'root ::= "{EMOJI}"'
    full = client.query(
        "Party:",
        endpoint=ref,
        options=SippTextOptions(max_tokens=32, temperature=0),
        local=LocalTextOptions(grammar=grammar),
    ).result()
    assert full.text == EMOJI
    n_tokens = full.usage.output_tokens if full.usage else 0
    # More tokens than characters: some max_tokens below cut inside a character.
    assert n_tokens > len(EMOJI), "each emoji should take several byte tokens"
    for max_tokens in range(1, n_tokens):
        run = client.query(
            "Party:",
            endpoint=ref,
            emit_tokens=True,
            options=SippTextOptions(max_tokens=max_tokens, temperature=0),
            local=LocalTextOptions(grammar=grammar),
        )
        streamed = "".join(batch.text for batch in run)
        result = run.result()
        assert result.finish_reason == "length"
        assert "\ufffd" not in result.text
        assert streamed == result.text
        assert EMOJI.startswith(result.text)
