"""The Chat Completions fields beyond the basics (seed, n, penalties, logit_bias, logprobs,
response_format, user, metadata, store) through a real `sipp-gateway serve`, driven by
the official `openai` SDK: honoured on local targets exactly as the library does them,
passed in OpenAI's spelling to OpenAI-style providers, refused naming field and target
where a target cannot honour them."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from sipp import (
    LocalModelDescriptor,
    LocalTextOptions,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
)

from ..remote.loopback import Action, Request, json_reply
from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import CountingUpstream, add_targets, provider_gateway, text_reply

ANTHROPIC = """
[[targets]]
name = "claude"
type = "anthropic"
model = "claude-test"
api_key_env = "TEST_ANTHROPIC_KEY"
base_url = "{url}"
"""
ASK = [{"role": "user", "content": "Write a short poem about the sea."}]


def _reply(req: Request) -> list[Action]:
    """OpenAI's shape on its paths; Anthropic's on `/v1/messages`."""
    if not req.path.endswith("/messages"):
        return text_reply(req)
    return json_reply(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": '{"ok": true}'}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 4},
        }
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_reply) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    def with_claude(toml: str) -> str:
        return toml + ANTHROPIC.format(url=upstream.url)

    env = {"TEST_ANTHROPIC_KEY": "anthropic-secret"}
    directory = tmp_path_factory.mktemp("fields")
    with provider_gateway(
        smollm_path, directory, upstream, {"up": "up-model"}, with_claude, env
    ) as gw:
        yield gw


@pytest.fixture()
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def library(smollm_path: Path) -> Iterator[Any]:
    """The same model in this process, to check the gateway adds nothing and drops nothing."""
    with SippClient() as sipp:
        ref = sipp.add("l", LocalModelDescriptor(smollm_path))

        def chat(max_tokens: int, local: LocalTextOptions, temperature: float = 0.0) -> str:
            options = SippTextOptions(max_tokens=max_tokens, temperature=temperature)
            return str(sipp.chat(ASK, endpoint=ref, options=options, local=local).result().text)

        yield chat


def test_seed_makes_sampled_choices_reproducible_and_n_gives_distinct_ones(
    client: openai.OpenAI,
) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        completion = client.chat.completions.create(
            model="local", messages=ASK, max_tokens=16, temperature=1.0, seed=seed, n=n
        )
        assert [c.index for c in completion.choices] == list(range(n))
        return [c.message.content or "" for c in completion.choices]

    first = sample(7)
    assert sample(7) == first
    three = sample(7, n=3)
    assert three[0] == first[0]  # choice i samples with seed + i
    assert len(set(three)) == 3
    assert sample(8) == [three[1]]


def test_n_streams_every_choice_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="local",
        messages=ASK,
        max_tokens=8,
        temperature=1.0,
        seed=3,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        usage = chunk.usage or usage
    whole = client.chat.completions.create(
        model="local", messages=ASK, max_tokens=8, temperature=1.0, seed=3, n=2
    )
    assert texts == [c.message.content for c in whole.choices]
    assert all(f in ("stop", "length") for f in finishes)
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens  # the prompt counts once


def test_penalties_and_logit_bias_match_the_library(client: openai.OpenAI, library: Any) -> None:
    completion = client.chat.completions.create(
        model="local",
        messages=ASK,
        max_tokens=24,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        logit_bias={"28": -100},
    )
    sampling = SamplingRuntimeConfig(
        frequency_penalty=1.5, presence_penalty=0.5, logit_bias={28: -100.0}
    )
    expected = library(24, LocalTextOptions(sampling=sampling))
    assert completion.choices[0].message.content == expected
    plain = library(24, LocalTextOptions())
    assert expected != plain  # the fields did something


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "mood": {"type": "string", "enum": ["calm", "stormy"]},
            "rhymes": {"type": "boolean"},
        },
        "required": ["mood", "rhymes"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model="local",
        messages=ASK,
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "poem", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), schema)


def test_the_sdk_parse_helper_gets_its_pydantic_model(client: openai.OpenAI) -> None:
    class Verdict(pydantic.BaseModel):
        answer: bool
        reason: str = pydantic.Field(max_length=40)

    parsed = client.chat.completions.parse(
        model="local",
        messages=[{"role": "user", "content": "Is the sea salty? Answer in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format=Verdict,
    )
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_json_object_output_is_a_json_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Give a JSON object with a key 'color'."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    text = completion.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if completion.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_logprobs_shape_and_greedy_consistency(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="local", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content) == completion.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == completion.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-5)
        assert sum(math.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-5
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    streamed = []
    for chunk in client.chat.completions.create(
        model="local",
        messages=ASK,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    ):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_legacy_completions_stream_logprobs_offsets_run_on_across_chunks(
    client: openai.OpenAI,
) -> None:
    """A streamed chunk may carry several tokens: its `text_offset`s continue from the
    text before it, as the non-streamed answer's do."""
    ask: dict[str, Any] = {"model": "local", "prompt": "Colours:", "max_tokens": 12}
    whole = client.completions.create(**ask, temperature=0, logprobs=2)
    expected = whole.choices[0].logprobs
    assert expected is not None and expected.text_offset and expected.tokens
    tokens: list[str] = []
    offsets: list[int] = []
    for chunk in client.completions.create(**ask, temperature=0, logprobs=2, stream=True):
        lp = chunk.choices[0].logprobs if chunk.choices else None
        if lp is not None and lp.tokens:
            tokens += lp.tokens
            offsets += lp.text_offset or []
    assert tokens == expected.tokens
    assert offsets == expected.text_offset
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_provider_targets_get_the_fields_in_openai_spelling(
    client: openai.OpenAI, upstream: CountingUpstream
) -> None:
    before = len(upstream.calls("/chat/completions"))
    completion = client.chat.completions.create(
        model="up",
        messages=ASK,
        seed=11,
        n=2,
        logit_bias={"50256": -100},
        presence_penalty=0.25,
        frequency_penalty=-0.5,
        response_format={"type": "json_object"},
        user="end-user-9",
        metadata={"team": "search"},
        store=False,
    )
    assert [c.message.content for c in completion.choices] == ["from the provider"] * 2
    bodies = [r.json() for r in upstream.calls("/chat/completions")[before:]]
    assert sorted(b["seed"] for b in bodies) == [11, 12]
    for body in bodies:
        assert body["logit_bias"] == {"50256": -100.0}
        assert (body["presence_penalty"], body["frequency_penalty"]) == (0.25, -0.5)
        assert body["response_format"] == {"type": "json_object"}
        assert not {"user", "metadata", "store", "n"} & set(body)


def test_anthropic_targets_get_structured_output_and_top_k_translated(
    client: openai.OpenAI, upstream: CountingUpstream
) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    completion = client.chat.completions.create(
        model="claude",
        messages=ASK,
        max_tokens=20,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "check", "schema": schema, "strict": True},
        },
    )
    assert json.loads(completion.choices[0].message.content or "") == {"ok": True}
    body = upstream.calls("/messages")[-1].json()
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert body["model"] == "claude-test" and "response_format" not in body


def _refused(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        json={"messages": ASK, **body},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    "target, field, value",
    [
        ("claude", "seed", 1),
        ("claude", "logit_bias", {"1": 1}),
        ("claude", "presence_penalty", 0.5),
        ("claude", "frequency_penalty", 0.5),
        ("claude", "logprobs", True),
        ("up", "logprobs", True),
    ],
)
def test_fields_a_target_cannot_honour_are_refused_naming_both(
    gateway: Gateway, upstream: CountingUpstream, target: str, field: str, value: Any
) -> None:
    before = len(upstream.requests)
    error = _refused(gateway, {"model": target, field: value})
    assert error["param"] == field and f"'{target}'" in error["message"]
    assert len(upstream.requests) == before  # nothing was sent


@pytest.mark.parametrize(
    "field, value",
    [
        ("seed", "7"),
        ("seed", True),
        ("n", 0),
        ("n", 17),
        ("presence_penalty", 2.5),
        ("frequency_penalty", "high"),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"\u00b2": 1}),  # a digit to str.isdigit(), not to int()
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"999999": 5}),  # past the local model's vocabulary
        ("logprobs", "yes"),
        ("top_logprobs", 21),
        ("top_logprobs", 2),  # without logprobs
        ("response_format", {"type": "yaml"}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "a b"}}),
        ("response_format", {"type": "json_schema", "json_schema": {"name": "a", "schema": 1}}),
        ("user", 5),
        ("metadata", {"k": 1}),
        ("metadata", {f"k{i}": "v" for i in range(17)}),
        ("store", True),
        ("store", "no"),
    ],
)
def test_bad_values_are_refused_naming_the_field(gateway: Gateway, field: str, value: Any) -> None:
    assert _refused(gateway, {"model": "local", field: value})["param"] == field


def test_user_and_metadata_are_logged_quoted_never_forwarded(
    smollm_path: Path, tmp_path: Path, upstream: CountingUpstream
) -> None:
    def edit(toml: str) -> str:
        return add_targets(toml, upstream.url, {"up": "up-model"}, None)

    with running_gateway(smollm_path, tmp_path, edit) as gw:
        r = httpx.post(
            f"{gw.public}/v1/chat/completions",
            json={
                "model": "up",
                "messages": ASK,
                "user": 'mallory"\nforged line',
                "metadata": {"team": "search"},
            },
            headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "attr-1"},
            timeout=60,
        )
        assert r.status_code == 200
        unknown = httpx.post(  # refused before attribution: nothing of it is logged
            f"{gw.public}/v1/chat/completions",
            json={"model": "m" * 2000, "messages": ASK, "user": "someone"},
            headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "attr-2"},
            timeout=60,
        )
        assert unknown.status_code == 404
    assert "attr-2" not in gw.stderr
    lines = gw.stderr.splitlines()
    messages = [json.loads(line)["message"] for line in lines if "attr-1" in line]
    assert len(messages) == 1, gw.stderr[-3000:]
    assert '"mallory\\"\\nforged line"' in messages[0] and '{"team": "search"}' in messages[0]
    assert "all-targets" in messages[0]  # the caller's label
    assert sum("forged line" in line for line in lines) == 1
