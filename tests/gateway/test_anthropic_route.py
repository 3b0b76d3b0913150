"""`POST /v1/messages` (Anthropic's Messages API) on a real `sipp-gateway serve`, driven by
the official `anthropic` SDK: local and provider targets, streaming in Anthropic's event
order, its error envelope, and the same tokens, allowlists and limits as every route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from sipp import ChatMessage, LocalModelDescriptor, SippClient, SippTextOptions

from .test_server import LIMITED, TOKEN, Gateway, running_gateway

SYSTEM = "You answer in one short sentence."
ASK = [{"role": "user", "content": "What colour is the sky?"}]
# Anthropic's SDK 2.x dropped temperature from its signature; older clients still send it.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(smollm_path, tmp_path_factory.mktemp("anthropic")) as gw:
        yield gw


@pytest.fixture()
def client(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=gateway.public, api_key=TOKEN, max_retries=0, timeout=120)
    yield c
    c.close()


def _library(smollm_path: Path, max_tokens: int) -> Any:
    with SippClient() as sipp:
        ref = sipp.add("l", LocalModelDescriptor(smollm_path))
        return sipp.chat(
            [ChatMessage("system", SYSTEM), ChatMessage("user", ASK[0]["content"])],
            endpoint=ref,
            options=SippTextOptions(max_tokens=max_tokens, temperature=0),
        ).result()


def test_messages_create_matches_the_library(
    client: anthropic.Anthropic, smollm_path: Path
) -> None:
    message = client.messages.create(
        model="local", system=SYSTEM, messages=ASK, max_tokens=12, extra_body=GREEDY
    )
    direct = _library(smollm_path, 12)
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == direct.text  # type: ignore[union-attr]
    assert message.stop_reason == ("max_tokens" if direct.finish_reason == "length" else "end_turn")
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        direct.usage.input_tokens,
        direct.usage.output_tokens,
    )


def test_a_stop_sequence_is_reported_as_such(
    client: anthropic.Anthropic, smollm_path: Path
) -> None:
    direct = _library(smollm_path, 12)
    stop = direct.text.split()[1]  # a word the greedy answer reaches after its first
    stops = ["never-in-this-answer", stop]
    ask = {"model": "local", "system": SYSTEM, "messages": ASK, "max_tokens": 12}
    message = client.messages.create(**ask, stop_sequences=stops, extra_body=GREEDY)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert message.content[0].text == direct.text[: direct.text.index(stop)]  # type: ignore[union-attr]
    with client.messages.stream(**ask, stop_sequences=stops, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    plain = client.messages.create(**ask, extra_body=GREEDY)
    assert plain.stop_sequence is None and plain.stop_reason != "stop_sequence"
    # A stop at the very first word: no text, one empty text block either way.
    first = direct.text.split()[0]
    empty = client.messages.create(**ask, stop_sequences=[first], extra_body=GREEDY)
    with client.messages.stream(**ask, stop_sequences=[first], extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    assert [b.model_dump() for b in streamed.content] == [b.model_dump() for b in empty.content]
    assert [(b.type, b.text) for b in empty.content] == [("text", "")]  # type: ignore[union-attr]


def test_stream_helper_and_event_order(client: anthropic.Anthropic, gateway: Gateway) -> None:
    whole = client.messages.create(
        model="local", system=SYSTEM, messages=ASK, max_tokens=10, extra_body=GREEDY
    )
    with client.messages.stream(
        model="local", system=SYSTEM, messages=ASK, max_tokens=10, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens

    with httpx.stream(
        "POST",
        f"{gateway.public}/v1/messages",
        json={"model": "local", "messages": ASK, "max_tokens": 5, "stream": True},
        headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    deltas = names[2:-3]
    assert names[:2] == ["message_start", "content_block_start"] and deltas
    assert set(deltas) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_provider_target_and_bearer_token(gateway: Gateway) -> None:
    bearer = anthropic.Anthropic(base_url=gateway.public, auth_token=TOKEN, max_retries=0)
    message = bearer.messages.create(model="mock-openai", messages=ASK, max_tokens=5)
    assert message.content[0].text == "from the provider"  # type: ignore[union-attr]
    bearer.close()


def test_top_k_reaches_the_local_sampler(client: anthropic.Anthropic, smollm_path: Path) -> None:
    message = client.messages.create(
        model="local",
        system=SYSTEM,
        messages=ASK,
        max_tokens=12,
        extra_body={"temperature": 1.0, "top_k": 1},  # older API fields, not in SDK 2.x
    )
    # top_k=1 leaves one candidate: whatever the temperature, the greedy answer
    assert message.content[0].text == _library(smollm_path, 12).text  # type: ignore[union-attr]


def test_errors_are_anthropic_exceptions_with_its_envelope(gateway: Gateway) -> None:
    def sdk(key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=gateway.public, api_key=key, max_retries=0)

    with pytest.raises(anthropic.AuthenticationError):
        sdk("wrong").messages.create(model="local", messages=ASK, max_tokens=5)
    with pytest.raises(anthropic.PermissionDeniedError):
        sdk(LIMITED).messages.create(model="mock-openai", messages=ASK, max_tokens=5)
    with pytest.raises(anthropic.NotFoundError):
        sdk(TOKEN).messages.create(model="nope", messages=ASK, max_tokens=5)
    with pytest.raises(anthropic.BadRequestError, match="top_k"):
        sdk(TOKEN).messages.create(
            model="mock-openai", messages=ASK, max_tokens=5, extra_body={"top_k": 3}
        )
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        sdk(TOKEN).messages.create(
            model="local",
            messages=ASK,
            max_tokens=5,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    with pytest.raises(anthropic.BadRequestError, match="image"):
        sdk(TOKEN).messages.create(
            model="local",
            max_tokens=5,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AA=="},
                        }
                    ],
                }
            ],
        )


@pytest.mark.parametrize(
    "body, headers, status",
    [
        ({"model": "local", "messages": ASK}, {}, 400),  # max_tokens is required
        ({"model": "local", "messages": ASK, "max_tokens": 5}, {"anthropic-version": None}, 400),
        ({"model": "local", "messages": [], "max_tokens": 5}, {}, 400),
        ({"model": "local", "messages": ASK, "max_tokens": 5, "temperature": 1.5}, {}, 400),
        ({"model": "local", "messages": ASK, "max_tokens": 5, "thinking": {}}, {}, 400),
        ({"model": "local", "messages": ASK, "max_tokens": 5}, {"x-api-key": "bad"}, 401),
    ],
)
def test_raw_refusals_use_the_envelope(
    gateway: Gateway, body: dict[str, Any], headers: dict[str, Any], status: int
) -> None:
    sent = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01", **headers}
    r = httpx.post(
        f"{gateway.public}/v1/messages",
        content=json.dumps(body),
        headers={k: v for k, v in sent.items() if v is not None},
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()
    assert error["type"] == "error" and isinstance(error["error"]["message"], str)
    expected = "invalid_request_error" if status == 400 else "authentication_error"
    assert error["error"]["type"] == expected


def test_structured_output_and_cache_hints(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["blue", "grey"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    message = client.messages.create(
        model="local",
        system=[{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        messages=ASK,
        max_tokens=20,
        output_config={"format": {"type": "json_schema", "schema": schema}},
        cache_control={"type": "ephemeral", "ttl": "5m"},
        extra_body=GREEDY,
    )
    jsonschema.validate(json.loads(message.content[0].text), schema)  # type: ignore[union-attr]
