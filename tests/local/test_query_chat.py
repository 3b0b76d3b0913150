"""Text generation on the real default model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sipp import (
    AsyncSippClient,
    ChatMessage,
    ContextRuntimeConfig,
    EndpointRef,
    InvalidRequestError,
    LocalModelDescriptor,
    LocalTextOptions,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
)

PROMPT = "The three primary colors are"
GREEDY = SippTextOptions(max_tokens=24, temperature=0)
Client = tuple[SippClient, EndpointRef]


def test_query_returns_text_usage_and_local_stats(text_client: Client) -> None:
    client, ref = text_client
    response = client.query(PROMPT, endpoint=ref, options=GREEDY).result()
    assert response.text.strip()
    assert response.finish_reason in ("stop", "length")
    assert response.usage is not None and response.local_stats is not None
    usage, stats = response.usage, response.local_stats
    assert usage.output_tokens == stats.generated_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert stats.prompt_tokens == usage.input_tokens > 0
    assert stats.prefill_ms > 0 and stats.decode_ms > 0 and stats.tokens_per_second > 0


def test_greedy_output_is_identical_across_sync_async_and_streaming(
    text_client: Client, smollm_path: Path
) -> None:
    client, ref = text_client
    sync_text = client.query(PROMPT, endpoint=ref, options=GREEDY).result().text

    run = client.query(PROMPT, endpoint=ref, options=GREEDY, emit_tokens=True)
    batches = list(run)
    streamed = "".join(b.text for b in batches)
    assert streamed == run.result().text == sync_text
    assert [b.sequence for b in batches] == list(range(len(batches)))

    async def via_async() -> tuple[str, str]:
        async with AsyncSippClient() as aclient:
            aref = await aclient.add(
                "a",
                LocalModelDescriptor(
                    smollm_path, NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=2048))
                ),
            )
            final = await aclient.query(PROMPT, endpoint=aref, options=GREEDY)
            arun = aclient.query(PROMPT, endpoint=aref, options=GREEDY, emit_tokens=True)
            pieces = [b.text async for b in arun]
            assert (await arun.result()).text == "".join(pieces)
            return final.text, "".join(pieces)

    async_text, async_streamed = asyncio.run(via_async())
    assert async_text == async_streamed == sync_text


def test_max_tokens_gives_length(text_client: Client) -> None:
    client, ref = text_client
    response = client.query(
        "Count: 1, 2, 3,", endpoint=ref, options=SippTextOptions(max_tokens=3, temperature=0)
    ).result()
    assert response.finish_reason == "length"
    assert response.usage is not None and response.usage.output_tokens == 3


def test_stop_string_never_appears_and_finishes_with_stop(text_client: Client) -> None:
    client, ref = text_client
    free = client.query(PROMPT, endpoint=ref, options=GREEDY).result().text
    words = free.split()
    assert len(words) >= 3, free
    stop = " " + words[2]  # a stop in the middle of the greedy answer, likely spanning tokens
    run = client.query(
        PROMPT,
        endpoint=ref,
        options=SippTextOptions(max_tokens=24, temperature=0, stop=[stop]),
        emit_tokens=True,
    )
    streamed = "".join(b.text for b in run)
    response = run.result()
    assert response.finish_reason == "stop"
    assert stop not in response.text
    assert streamed == response.text
    assert free.startswith(response.text)


def test_seeded_sampling_is_reproducible(text_client: Client) -> None:
    client, ref = text_client
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(seed=1234, top_k=50))
    opts = SippTextOptions(max_tokens=20, temperature=1.0)
    a = client.query(PROMPT, endpoint=ref, options=opts, local=local).result().text
    b = client.query(PROMPT, endpoint=ref, options=opts, local=local).result().text
    assert a == b


def test_chat_uses_the_model_template_and_answers(text_client: Client) -> None:
    client, ref = text_client
    messages = [
        ChatMessage("system", "Answer in one word."),
        ChatMessage("user", "What color is the sky?"),
    ]
    response = client.chat(messages, endpoint=ref, options=GREEDY).result()
    assert "blue" in response.text.lower()
    # The template wrapped the messages: far more prompt tokens than the raw words.
    assert response.usage is not None and response.usage.input_tokens > 15


def test_chat_accepts_plain_mappings(text_client: Client) -> None:
    client, ref = text_client
    response = client.chat(
        [{"role": "user", "content": "Say hi"}], endpoint=ref, options=GREEDY
    ).result()
    assert response.text


def test_grammar_constrains_output(text_client: Client) -> None:
    client, ref = text_client
    grammar = 'root ::= ("yes" | "no") "."'
    response = client.query(
        "Is water wet? Answer:",
        endpoint=ref,
        options=SippTextOptions(max_tokens=8, temperature=0.7),
        local=LocalTextOptions(grammar=grammar),
    ).result()
    assert response.text in ("yes.", "no.")


def test_json_schema_output_parses_and_matches(text_client: Client) -> None:
    client, ref = text_client
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    response = client.chat(
        [ChatMessage("user", "Give me a person as JSON with a name and an age.")],
        endpoint=ref,
        options=SippTextOptions(max_tokens=80, temperature=0),
        local=LocalTextOptions(json_schema=schema),
    ).result()
    value = json.loads(response.text)
    jsonschema.validate(value, schema)


def test_json_schema_strings_hold_no_raw_control_characters(text_client: Client) -> None:
    # JSON wants a line break in a string escaped; the schema converter let a raw one in,
    # and a model pushed toward newlines (token 198 is "\n" in SmolLM2) wrote invalid JSON.
    client, ref = text_client
    schema = {"type": "object", "properties": {"poem": {"type": "string", "maxLength": 40}}}
    response = client.chat(
        [ChatMessage("user", "Write a two-line poem about the sea as JSON.")],
        endpoint=ref,
        options=SippTextOptions(max_tokens=60, temperature=0),
        local=LocalTextOptions(
            json_schema=schema, sampling=SamplingRuntimeConfig(logit_bias={198: 4.0})
        ),
    ).result()
    assert response.finish_reason == "stop"
    jsonschema.validate(json.loads(response.text), schema)


@pytest.mark.parametrize(
    ("local", "prompt"),
    [
        (LocalTextOptions(grammar='root ::= "The sky is " [a-z ,]+ "."'), "Describe the sky:"),
        (
            LocalTextOptions(
                json_schema={
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
                # stages before the grammar: a bias and a penalty move the argmax
                sampling=SamplingRuntimeConfig(logit_bias={28: -2.0}, repeat_penalty=1.3),
            ),
            "Give me a person as JSON:",
        ),
        (LocalTextOptions(grammar='root ::= [0-9]+ " apples"'), "How many apples? Answer:"),
    ],
)
def test_greedy_grammar_rows_check_the_argmax_first_with_the_same_tokens(
    text_client: Client, monkeypatch: pytest.MonkeyPatch, local: LocalTextOptions, prompt: str
) -> None:
    # The grammar's pass over every token is skipped when it admits the argmax (15 ms
    # a token on SmolLM2): the tokens must be those of the whole chain.
    from sipp.local import _llama

    client, ref = text_client
    options = SippTextOptions(max_tokens=30, temperature=0)

    def ids() -> tuple[str, list[int]]:
        run = client.query(prompt, endpoint=ref, options=options, local=local, emit_tokens=True)
        tokens = [t for batch in run for t in batch.token_ids]
        return run.result().text, tokens

    whole_chain = 0
    finish = _llama._Candidates.finish

    def counted(self: Any, chain: Any, first: int) -> int | None:
        nonlocal whole_chain
        whole_chain += 1
        return finish(self, chain, first)

    monkeypatch.setattr(_llama._Candidates, "finish", counted)
    fast = ids()
    assert fast[1] and whole_chain < len(fast[1])  # the argmax served some tokens
    monkeypatch.setattr(_llama.Sampler, "fast_grammar", False)
    assert ids() == fast


def test_bad_grammar_is_a_clear_error(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(InvalidRequestError, match="grammar"):
        client.query("x", endpoint=ref, local=LocalTextOptions(grammar="root ::= ( unclosed"))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize(
    ("grammar", "after"),
    [
        ("root ::= [b-a]", 0),  # an empty range: nothing, from the first token
        ("root ::= <[99999]>", 0),  # a token id past the vocabulary
        ('root ::= "yes" [b-a]', 1),  # a dead end once "yes" is written
    ],
)
def test_a_grammar_that_admits_no_token_fails_the_request_only(
    text_client: Client, grammar: str, after: int, temperature: float
) -> None:
    # llama.cpp picks a token all the same (greedy the first, dist the last), and the
    # grammar's accept of it aborted the whole process.
    client, ref = text_client
    run = client.query(
        "Is water wet? Answer:",
        endpoint=ref,
        options=SippTextOptions(max_tokens=8, temperature=temperature),
        local=LocalTextOptions(grammar=grammar),
        emit_tokens=True,
    )
    with pytest.raises(InvalidRequestError, match=f"admits no token after {after} generated"):
        run.result(timeout=120)
    assert client.query(PROMPT, endpoint=ref, options=GREEDY).result().text


def test_logit_bias_that_bans_what_the_grammar_allows_fails_the_request(
    text_client: Client,
) -> None:
    client, ref = text_client
    endpoint = client._registry._endpoints[ref.id]  # type: ignore[attr-defined]
    model = endpoint.loaded.model
    # every token whose text could begin "yes": the grammar's only way forward
    firsts = {
        t for t in range(model.n_vocab) if b"yes".startswith(model.piece(t)) and model.piece(t)
    }
    banned = SamplingRuntimeConfig(logit_bias={t: float("-inf") for t in firsts})
    with pytest.raises(InvalidRequestError, match="admits no token after 0 generated"):
        client.query(
            "Answer:",
            endpoint=ref,
            options=SippTextOptions(max_tokens=4, temperature=0),
            local=LocalTextOptions(grammar='root ::= "yes"', sampling=banned),
        ).result(timeout=120)


def test_streaming_multibyte_text_is_valid_utf8_per_batch(text_client: Client) -> None:
    client, ref = text_client
    run = client.query(
        "Emoji list: 🎉 party, 🍕 pizza, 🚀 rocket, 🌍",
        endpoint=ref,
        options=SippTextOptions(max_tokens=40, temperature=0),
        emit_tokens=True,
    )
    batches = [b.text for b in run]
    final = run.result().text
    assert "".join(batches) == final
    assert all("\ufffd" not in b for b in batches)


def test_cancel_stops_within_a_step_and_keeps_partial_text(text_client: Client) -> None:
    client, ref = text_client
    run = client.query(
        "Count: 1, 2, 3, 4, 5, 6, 7,",
        endpoint=ref,
        options=SippTextOptions(max_tokens=400, temperature=0),
        emit_tokens=True,
    )
    seen: list[str] = []
    ids = 0  # the tokens of the batches seen
    asked = 0  # how many the consumer had seen when it cancelled
    for batch in run:
        seen.append(batch.text)
        ids += len(batch.token_ids)
        if len(seen) == 5:
            asked = ids
            run.cancel("enough")
    response = run.result()
    assert response.finish_reason == "cancelled"
    assert response.text == "".join(seen)
    assert response.usage is not None
    # The engine may have run ahead of this consumer by one stream hold (50 ms): a few
    # tokens at this model's speed, then it stops at its next step.
    assert asked <= response.usage.output_tokens < asked + 40


def test_cancel_from_another_thread_without_streaming(text_client: Client) -> None:
    client, ref = text_client
    run = client.query(
        "Count: 1, 2, 3, 4, 5, 6, 7,",
        endpoint=ref,
        options=SippTextOptions(max_tokens=1500, temperature=0),
    )
    timer = threading.Timer(0.3, run.cancel)
    timer.start()
    response = run.result(timeout=120)
    assert response.finish_reason in ("cancelled", "stop")
    metrics = client.runtime_metrics(ref)
    assert metrics["running"] == 0 and metrics["busy_slots"] == 0


def test_concurrent_greedy_requests_match_solo_output(text_client: Client) -> None:
    client, ref = text_client
    prompts = [PROMPT, "Water boils at", "The largest planet is", "Python is a"]
    solo = [client.query(p, endpoint=ref, options=GREEDY).result().text for p in prompts]
    runs = [client.query(p, endpoint=ref, options=GREEDY) for p in prompts]
    together = [r.result().text for r in runs]
    assert together == solo
