"""Tool calling on OpenAI and OpenAI-compatible endpoints, against a loopback server
speaking the chat-completions wire format: the request bodies OpenAI documents, tool
calls in responses and streamed deltas, a full tool loop, and malformed tool calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sipp import (
    ChatMessage,
    FunctionTool,
    GatewayDescriptor,
    InvalidRequestError,
    NamedToolChoice,
    ProviderDescriptor,
    RemoteError,
    SippTextOptions,
    ToolCall,
    ToolCallDelta,
    UnsupportedOperationError,
)

from .harness import call
from .loopback import LoopbackServer, Request, json_reply, sse_reply
from .openai_wire import CHAT, MODES, chunk, completion

WEATHER = FunctionTool(
    name="get_weather",
    description="Current weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    strict=True,
)
CLOCK = FunctionTool(name="get_time")
TOOLS = SippTextOptions(tools=[WEATHER, CLOCK])
WEATHER_JSON = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
CLOCK_JSON = {"type": "function", "function": {"name": "get_time"}}


def _descriptor(server: LoopbackServer, provider: str = "openai") -> ProviderDescriptor:
    return ProviderDescriptor(
        provider,  # type: ignore[arg-type]
        "gpt-test",
        api_key="sk-test",
        base_url=server.url + "/v1",
    )


def _call_json(id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_calls_completion(calls: list[Any], finish: str = "tool_calls") -> dict[str, Any]:
    """A chat completion whose message calls tools, as OpenAI sends it (content null)."""
    body = completion("", completion_tokens=9)
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": calls,
        "refusal": None,
    }
    body["choices"][0]["finish_reason"] = finish
    return body


PARALLEL = _tool_calls_completion(
    [
        _call_json("call_a", "get_weather", '{"city": "Paris"}'),
        _call_json("call_b", "get_time", "{}"),
    ]
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["openai", "openai_compatible"])
def test_request_carries_tools_choice_and_parallel_flag(mode: str, provider: str) -> None:
    options = SippTextOptions(
        tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False
    )
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        response, _ = call(mode, _descriptor(server, provider), "chat", CHAT, options=options)
        body = server.requests[0].json()
    assert body == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "Say something."}],
        "tools": [WEATHER_JSON, CLOCK_JSON],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    assert response.tool_calls == (
        ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_b", "get_time", "{}"),
    )
    assert (response.text, response.finish_reason, response.usage.output_tokens) == (
        "",
        "tool_calls",
        9,
    )


@pytest.mark.parametrize("mode", MODES)
def test_named_tool_choice(mode: str) -> None:
    # A call forced by a named tool_choice finishes with "stop" on OpenAI; it is still
    # a tool-call turn.
    forced = _tool_calls_completion(
        [_call_json("call_a", "get_weather", '{"city": "Oslo"}')], finish="stop"
    )
    options = SippTextOptions(tools=[WEATHER, CLOCK], tool_choice=NamedToolChoice("get_weather"))
    with LoopbackServer(lambda req: json_reply(forced)) as server:
        response, _ = call(mode, _descriptor(server), "chat", CHAT, options=options)
        body = server.requests[0].json()
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "parallel_tool_calls" not in body
    assert response.finish_reason == "tool_calls"
    assert response.tool_calls == (ToolCall("call_a", "get_weather", '{"city": "Oslo"}'),)


@pytest.mark.parametrize("mode", MODES)
def test_tool_loop(mode: str) -> None:
    """Call -> the tool's result as a tool turn -> the model's answer."""

    def handler(req: Request) -> list[Any]:
        if req.json()["messages"][-1]["role"] == "tool":
            return json_reply(completion("Sunny in Paris, 12:00 there."))
        return json_reply(PARALLEL)

    with LoopbackServer(handler) as server:
        d = _descriptor(server)
        first, _ = call(mode, d, "chat", CHAT, options=TOOLS)
        conversation = [
            *CHAT,
            ChatMessage("assistant", first.text, tool_calls=first.tool_calls),
            ChatMessage("tool", '{"sky": "sunny"}', tool_call_id="call_a"),
            {"role": "tool", "content": "12:00", "tool_call_id": "call_b"},
        ]
        answer, _ = call(mode, d, "chat", conversation, options=TOOLS)
        second = server.requests[1].json()
    assert second["messages"] == [
        {"role": "user", "content": "Say something."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                _call_json("call_a", "get_weather", '{"city": "Paris"}'),
                _call_json("call_b", "get_time", "{}"),
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"sky": "sunny"}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
    ]
    assert second["tools"] == [WEATHER_JSON, CLOCK_JSON]
    assert (answer.text, answer.finish_reason, answer.tool_calls) == (
        "Sunny in Paris, 12:00 there.",
        "stop",
        (),
    )


# Two parallel calls as OpenAI streams them: the first delta of each call carries its
# id, type and name with empty arguments; then argument fragments under its index.
TOOL_STREAM = [
    chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
    chunk({}, "tool_calls"),
    b"data: "
    + json.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-test",
            "choices": [],
            "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42},
        }
    ).encode()
    + b"\n\n",
    b"data: [DONE]\n\n",
]


@pytest.mark.parametrize("mode", MODES)
def test_streamed_tool_calls(mode: str) -> None:
    with LoopbackServer(lambda req: sse_reply(TOOL_STREAM)) as server:
        response, batches = call(
            mode, _descriptor(server), "chat", CHAT, options=TOOLS, emit_tokens=True
        )
    deltas = [d for b in batches for d in b.tool_calls]
    assert all(b.text == "" for b in batches) and len(batches) == 5
    assert [(d.index, d.id, d.name) for d in deltas if d.id] == [
        (0, "call_a", "get_weather"),
        (1, "call_b", "get_time"),
    ]
    assert [(d.index, d.arguments) for d in deltas if d.id is None] == [
        (0, '{"ci'),
        (0, 'ty": "Paris"}'),
        (1, "{}"),
    ]
    for index, made in enumerate(response.tool_calls):
        assert "".join(d.arguments for d in deltas if d.index == index) == made.arguments
    assert response.tool_calls == (
        ToolCall("call_a", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_b", "get_time", "{}"),
    )
    assert (response.finish_reason, response.usage.total_tokens) == ("tool_calls", 42)


@pytest.mark.parametrize("mode", MODES)
def test_stream_with_text_then_a_whole_call_in_one_delta(mode: str) -> None:
    # Some compatible servers say something first and send a call whole, repeating its
    # id and name in later deltas.
    whole = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
    }
    frames = [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"tool_calls": [whole]}),
        chunk({"tool_calls": [{**whole, "function": {"name": "get_time", "arguments": ""}}]}),
        chunk({}, "tool_calls"),
        b"data: [DONE]\n\n",
    ]
    with LoopbackServer(lambda req: sse_reply(frames)) as server:
        response, batches = call(
            mode,
            _descriptor(server, "openai_compatible"),
            "chat",
            CHAT,
            options=TOOLS,
            emit_tokens=True,
        )
    assert [(b.text, b.tool_calls) for b in batches] == [
        ("Checking.", ()),
        ("", (ToolCallDelta(0, "call_1", "get_time", '{"tz": "CET"}'),)),
    ]
    assert (response.text, response.finish_reason) == ("Checking.", "tool_calls")
    assert response.tool_calls == (ToolCall("call_1", "get_time", '{"tz": "CET"}'),)


MALFORMED_RESPONSES = {
    "not a list": {"id": "call_a", "type": "function"},
    "no id": [{"type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
    "empty name": [_call_json("call_a", "", "{}")],
    "object arguments": [
        {"id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": {}}}
    ],
    "no function": [{"id": "call_a", "type": "function"}],
    "not a function call": [{"id": "call_a", "type": "custom", "custom": {"name": "x"}}],
    "not an object": ["call_a"],
}


@pytest.mark.parametrize("mode", MODES)
def test_malformed_tool_calls_in_a_response(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        case = req.headers["x-case"]
        if case == "claims calls but has none":
            return json_reply(_tool_calls_completion([]))
        return json_reply(_tool_calls_completion(MALFORMED_RESPONSES[case]))  # type: ignore[arg-type]

    with LoopbackServer(handler) as server:
        for case in [*MALFORMED_RESPONSES, "claims calls but has none"]:
            d = ProviderDescriptor(
                "openai",
                "gpt-test",
                api_key="sk",
                base_url=server.url + "/v1",
                static_headers={"x-case": case},
            )
            with pytest.raises(RemoteError, match=r"tool[ _]call") as info:
                call(mode, d, "chat", CHAT, options=TOOLS)
            assert info.value.code == "upstream", case


MALFORMED_FRAMES = {
    "arguments before id and name": [
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    ],
    "no index": [chunk({"tool_calls": [{"id": "c", "function": {"name": "f"}}]})],
    "negative index": [
        chunk({"tool_calls": [{"index": -1, "id": "c", "function": {"name": "f"}}]})
    ],
    "arguments not a string": [
        chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": {}}}]})
    ],
    "tool_calls not a list": [chunk({"tool_calls": {"index": 0}})],
    "changed id": [
        chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}]}),
        chunk({"tool_calls": [{"index": 0, "id": "c2", "function": {"arguments": "{}"}}]}),
    ],
    "claims calls but has none": [chunk({"content": "hi"}), chunk({}, "tool_calls")],
}


@pytest.mark.parametrize("mode", MODES)
def test_malformed_tool_call_frames(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        frames = MALFORMED_FRAMES[req.headers["x-case"]]
        return sse_reply([*frames, b"data: [DONE]\n\n"])

    with LoopbackServer(handler) as server:
        for case in MALFORMED_FRAMES:
            d = ProviderDescriptor(
                "openai_compatible",
                "m",
                base_url=server.url,
                static_headers={"x-case": case},
            )
            with pytest.raises(RemoteError, match=r"tool[ _]call") as info:
                call(mode, d, "chat", CHAT, options=TOOLS, emit_tokens=True)
            assert info.value.code == "upstream", case


@pytest.mark.parametrize("mode", MODES)
def test_refused_before_sending(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        d = _descriptor(server)
        with pytest.raises(InvalidRequestError, match="tools need chat"):
            call(mode, d, "query", "Say something.", options=TOOLS)
        with pytest.raises(InvalidRequestError, match="cannot override typed fields"):
            call(mode, d, "chat", CHAT, provider_options={"tools": [CLOCK_JSON]})
        nan_schema = FunctionTool(name="f", parameters={"type": "number", "maximum": float("nan")})
        with pytest.raises(InvalidRequestError, match="'f' parameters"):
            call(mode, d, "chat", CHAT, options=SippTextOptions(tools=[nan_schema]))
        set_schema = FunctionTool(name="g", parameters={"enum": {1, 2}})
        with pytest.raises(InvalidRequestError, match="'g' parameters: a set is not JSON"):
            call(mode, d, "chat", CHAT, options=SippTextOptions(tools=[set_schema]))
        assert server.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_gateway_endpoint_still_refuses_tools(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply({})) as server:
        d = GatewayDescriptor("t", server.url)
        with pytest.raises(UnsupportedOperationError, match="tool calling"):
            call(mode, d, "chat", CHAT, options=TOOLS)
        assert server.requests == []
