"""Tool calling through a real `sipp-gateway serve`, on both wire formats, driven by the
official `openai` and `anthropic` SDKs: a full tool loop against provider targets whose
loopback upstreams answer in OpenAI's and Anthropic's real JSON and SSE."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from ..remote.loopback import Action, Request, json_reply, sse_reply
from .test_server import TOKEN, Gateway
from .upstreams import CountingUpstream, provider_gateway

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGS = '{"city": "Paris"}'
ANSWER = "It is 18 degrees in Paris."


def _sse(events: list[tuple[str | None, Any]], *, done: bool = False) -> list[Action]:
    frames = []
    for name, data in events:
        head = f"event: {name}\n".encode() if name else b""
        frames.append(head + b"data: " + json.dumps(data).encode() + b"\n\n")
    return sse_reply(frames + ([b"data: [DONE]\n\n"] if done else []))


def _openai(req: Request) -> list[Action]:
    """Calls get_weather until a tool result is in the conversation, then answers."""
    body = req.json()
    answered = any(m.get("role") == "tool" for m in body["messages"])
    base = {"id": "c1", "created": 1, "model": body["model"]}
    if body.get("stream"):
        if answered:
            delta: dict[str, Any] = {"content": ANSWER}
            finish = "stop"
        else:
            delta = {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_up1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ]
            }
            finish = "tool_calls"
        chunks = [{"index": 0, "delta": delta, "finish_reason": None}]
        if not answered:
            for piece in ('{"city": ', '"Paris"}'):
                chunks.append(
                    {
                        "index": 0,
                        "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                        "finish_reason": None,
                    }
                )
        chunks.append({"index": 0, "delta": {}, "finish_reason": finish})
        events: list[tuple[str | None, Any]] = [
            (None, {**base, "object": "chat.completion.chunk", "choices": [c]}) for c in chunks
        ]
        usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
        events.append(
            (None, {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
        return _sse(events, done=True)
    if answered:
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER}
        finish = "stop"
    else:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_up1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ARGS},
                }
            ],
        }
        finish = "tool_calls"
    return json_reply(
        {
            **base,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14},
        }
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_openai) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    with provider_gateway(
        smollm_path, tmp_path_factory.mktemp("tools"), upstream, {"up": "up-model"}
    ) as gw:
        yield gw


@pytest.fixture()
def oa(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture()
def an(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    c = anthropic.Anthropic(base_url=gateway.public, api_key=TOKEN, max_retries=0, timeout=120)
    yield c
    c.close()


def test_openai_sdk_tool_loop(oa: openai.OpenAI, upstream: CountingUpstream) -> None:
    first = oa.chat.completions.create(
        model="up",
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "call_up1",
        "get_weather",
        {"city": "Paris"},
    )
    sent = upstream.calls("/chat/completions")[-1].json()
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False

    second = oa.chat.completions.create(
        model="up",
        messages=[
            *ASK,
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'},
        ],
        tools=[WEATHER],
    )
    assert second.choices[0].message.content == ANSWER
    turns = upstream.calls("/chat/completions")[-1].json()["messages"]
    assert turns[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ARGS}
    assert turns[2] == {"role": "tool", "tool_call_id": "call_up1", "content": '{"temp_c": 18}'}


def test_openai_sdk_stream_helper_assembles_the_call(oa: openai.OpenAI) -> None:
    with oa.chat.completions.stream(model="up", messages=ASK, tools=[WEATHER]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.function.name, call.function.arguments) == (
        "call_up1",
        "get_weather",
        ARGS,
    )


def test_anthropic_sdk_tool_loop_on_an_openai_target(
    an: anthropic.Anthropic, upstream: CountingUpstream
) -> None:
    tool = {
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": WEATHER["function"]["parameters"],  # type: ignore[index]
    }
    first = an.messages.create(
        model="up",
        max_tokens=50,
        messages=ASK,
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    assert first.stop_reason == "tool_use"
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.input == {"city": "Paris"}
    sent = upstream.calls("/chat/completions")[-1].json()
    assert sent["tools"] == [WEATHER] and sent["parallel_tool_calls"] is False
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}

    second = an.messages.create(
        model="up",
        max_tokens=50,
        messages=[
            *ASK,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},  # type: ignore[misc]
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": '{"temp_c": 18}'}
                ],
            },
        ],
        tools=[tool],  # type: ignore[list-item]
    )
    assert second.content[0].text == ANSWER  # type: ignore[union-attr]
    turns = upstream.calls("/chat/completions")[-1].json()["messages"]
    assert turns[-1] == {"role": "tool", "tool_call_id": use.id, "content": '{"temp_c": 18}'}

    with an.messages.stream(
        model="up",
        max_tokens=50,
        messages=ASK,
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("tool_use", {"city": "Paris"})
    ]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        (
            {
                "messages": [
                    *ASK,
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
                ]
            },
            "messages",
        ),
        ({"messages": [*ASK, {"role": "tool", "content": "18"}]}, "messages"),
    ],
)
def test_bad_tool_fields_are_400_naming_the_field(
    gateway: Gateway, upstream: CountingUpstream, body: dict[str, Any], param: str
) -> None:
    before = len(upstream.requests)
    r = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        json={"model": "up", "messages": ASK, **body},
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert len(upstream.requests) == before


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tools": [{"name": "f"}]},  # no input_schema
        {"tools": [{"name": "f", "input_schema": {}}, {"name": "f", "input_schema": {}}]},
        {
            "tools": [{"name": "f", "input_schema": {}}],
            "tool_choice": {"type": "tool", "name": "g"},
        },
        {"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "sometimes"}},
    ],
)
def test_bad_anthropic_tool_fields_are_400(gateway: Gateway, extra: dict[str, Any]) -> None:
    r = httpx.post(
        f"{gateway.public}/v1/messages",
        json={"model": "up", "messages": ASK, "max_tokens": 5, **extra},
        headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
