"""OpenAI's frequency/presence penalties (and llama.cpp's repeat penalty) on a real model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from sipp import (
    ContextRuntimeConfig,
    EndpointRef,
    InvalidConfigError,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
)

Client = tuple[SippClient, EndpointRef]
# Under greedy decoding SmolLM2 answers this with "la" forty times over.
LOOP = "Repeat after me: la la la la la"
GREEDY = SippTextOptions(max_tokens=40, temperature=0)


def _tokens(client: SippClient, ref: EndpointRef, **sampling: float) -> tuple[str, list[int]]:
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(**sampling)) if sampling else None
    run = client.query(LOOP, endpoint=ref, options=GREEDY, local=local, emit_tokens=True)
    ids = [t for batch in run for t in batch.token_ids]
    return run.result().text, ids


def _top_count(ids: list[int]) -> int:
    return Counter(ids).most_common(1)[0][1]


def test_frequency_penalty_breaks_a_greedy_loop(text_client: Client) -> None:
    client, ref = text_client
    plain, plain_ids = _tokens(client, ref)
    assert _top_count(plain_ids) >= 30, plain  # the premise: unpenalised, it loops
    penalised, ids = _tokens(client, ref, frequency_penalty=2.0)
    assert penalised != plain
    assert _top_count(ids) < _top_count(plain_ids) // 2, penalised
    # A penalty of 0 is the unpenalised chain.
    assert _tokens(client, ref, frequency_penalty=0.0, presence_penalty=0.0)[0] == plain


def test_penalties_set_as_endpoint_defaults(text_client: Client, smollm_path: Path) -> None:
    client, ref = text_client
    per_request, _ = _tokens(client, ref, frequency_penalty=2.0)
    config = NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=2048, n_parallel=1),
        sampling=SamplingRuntimeConfig(frequency_penalty=2.0),
    )
    with SippClient() as other:
        default = other.add("d", LocalModelDescriptor(smollm_path, config))
        assert _tokens(other, default)[0] == per_request
        # A request's own 0 overrides the endpoint's default.
        plain, _ = _tokens(client, ref)
        assert _tokens(other, default, frequency_penalty=0.0)[0] == plain


def test_repeat_penalty_runs_and_curbs_the_loop(text_client: Client) -> None:
    client, ref = text_client
    _, plain_ids = _tokens(client, ref)
    text, ids = _tokens(client, ref, repeat_penalty=1.5)
    assert text and _top_count(ids) < _top_count(plain_ids), text
    # Its window starts over the prompt's last 64 tokens, as in llama.cpp's server: the
    # very first token is already penalised for the prompt's "la".
    assert ids[0] != plain_ids[0]


def test_a_repeat_penalty_of_zero_is_refused() -> None:
    # llama.cpp would divide every positive logit it covers by it
    with pytest.raises(InvalidConfigError, match="repeat_penalty must be > 0"):
        SamplingRuntimeConfig(repeat_penalty=0.0)


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), "1", True])
def test_penalties_outside_openais_range_are_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidConfigError, match=f"SamplingRuntimeConfig.{field} must be"):
        SamplingRuntimeConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-2.0, 2.0, 0, 1.25])
def test_penalties_inside_the_range_are_accepted(value: float) -> None:
    config = SamplingRuntimeConfig(frequency_penalty=value, presence_penalty=value)
    assert (config.frequency_penalty, config.presence_penalty) == (value, value)
