"""The tool-calling types: validated where they are written, typed errors otherwise, and
refused (never dropped) by an endpoint that cannot honour them."""

from __future__ import annotations

from typing import Any

import pytest

from sipp import (
    ChatMessage,
    FunctionTool,
    GatewayDescriptor,
    InvalidRequestError,
    NamedToolChoice,
    SippClient,
    SippTextOptions,
    SippTextResponse,
    ToolCall,
    UnsupportedOperationError,
)

WEATHER = FunctionTool(
    name="get_weather",
    description="Current weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)


def test_a_tool_round_trip_as_messages() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    turns = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", (call,)),
        ChatMessage("tool", '{"temp_c": 18}', tool_call_id="call_1"),
    ]
    assert ChatMessage.coerce(
        {"role": "assistant", "content": "", "tool_calls": [call.to_dict()]}
    ) == turns[1]
    assert ChatMessage.coerce(
        {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_1"}
    ) == turns[2]
    assert turns[1].to_dict()["tool_calls"] == [
        {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    ]
    response = SippTextResponse("", "tool_calls", tool_calls=(call,))
    assert response["tool_calls"][0]["name"] == "get_weather"


@pytest.mark.parametrize(
    "build",
    [
        lambda: ChatMessage("tool", "18"),  # no tool_call_id
        lambda: ChatMessage("user", "x", tool_call_id="c"),
        lambda: ChatMessage("user", "x", (ToolCall("c", "f", "{}"),)),
        lambda: ChatMessage.coerce({"role": "assistant", "content": "", "tool_calls": "f()"}),
        lambda: ChatMessage.coerce({"role": "assistant", "content": "", "tool_calls": [{"id": 1}]}),
        lambda: ToolCall("", "f", "{}"),
        lambda: ToolCall("c", "f", {"city": "Paris"}),  # arguments are JSON text
        lambda: FunctionTool(name="get weather"),
        lambda: FunctionTool(name="f", parameters="{}"),  # type: ignore[arg-type]
        lambda: SippTextOptions(tools=[WEATHER, WEATHER]),
        lambda: SippTextOptions(tools=[{"name": "f"}]),  # type: ignore[list-item]
        lambda: SippTextOptions(tool_choice="required"),  # no tools
        lambda: SippTextOptions(tools=[WEATHER], tool_choice="always"),  # type: ignore[arg-type]
        lambda: SippTextOptions(tools=[WEATHER], tool_choice=NamedToolChoice("other")),
        lambda: SippTextOptions(parallel_tool_calls=False),  # no tools
    ],
)
def test_bad_tool_values_are_typed_errors(build: Any) -> None:
    with pytest.raises(InvalidRequestError):
        build()


def test_options_keep_tools_as_a_tuple() -> None:
    options = SippTextOptions(tools=[WEATHER], tool_choice=NamedToolChoice("get_weather"))
    assert options.tools == (WEATHER,)


def test_an_endpoint_without_tool_support_refuses_tools_and_tool_turns() -> None:
    with SippClient() as client:
        ref = client.add("g", GatewayDescriptor("t", "http://127.0.0.1:9"))
        with pytest.raises(UnsupportedOperationError, match="tool"):
            client.chat([ChatMessage("user", "hi")], endpoint=ref, options=SippTextOptions(tools=[WEATHER]))
        tool_turn = ChatMessage("tool", "18", tool_call_id="c")
        with pytest.raises(UnsupportedOperationError, match="tool"):
            client.chat([ChatMessage("user", "hi"), tool_turn], endpoint=ref)
