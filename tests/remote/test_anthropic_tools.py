"""Tool calling on Anthropic endpoints, against a loopback server speaking the Messages
wire format: `tools`/`tool_choice` as Anthropic documents them, assistant `tool_use`
and user `tool_result` blocks, tool calls in responses and in streamed
`input_json_delta`s, a full tool loop, and malformed tool-use frames."""

from __future__ import annotations

from typing import Any

import pytest

from sipp import (
    ChatMessage,
    FunctionTool,
    InvalidRequestError,
    NamedToolChoice,
    ProviderDescriptor,
    RemoteError,
    SippTextOptions,
    ToolCall,
    ToolCallDelta,
)

from .anthropic_wire import (
    block_delta,
    block_start,
    block_stop,
    event,
    message,
    message_end,
    message_start,
)
from .harness import call
from .loopback import LoopbackServer, Request, json_reply, sse_reply
from .openai_wire import MODES

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = FunctionTool(name="get_weather", description="Current weather.", parameters=SCHEMA)
CLOCK = FunctionTool(name="get_time")
TOOLS = SippTextOptions(tools=[WEATHER, CLOCK])
TOOLS_JSON = [
    {"name": "get_weather", "description": "Current weather.", "input_schema": SCHEMA},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
ASK = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather and time in Paris?")]
PARALLEL = message(
    [
        {"type": "text", "text": "Checking both."},
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
    ],
    stop_reason="tool_use",
    output_tokens=40,
)


def _descriptor(server: LoopbackServer, case: str = "") -> ProviderDescriptor:
    return ProviderDescriptor(
        "anthropic",
        "claude-test",
        api_key="ak-test",
        base_url=server.url + "/v1",
        static_headers={"x-case": case} if case else {},
    )


@pytest.mark.parametrize("mode", MODES)
def test_request_and_parallel_tool_use_response(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        response, _ = call(mode, _descriptor(server), "chat", ASK, options=TOOLS)
        body = server.requests[0].json()
    assert body == {
        "model": "claude-test",
        "max_tokens": 1024,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Weather and time in Paris?"}],
        "tools": TOOLS_JSON,
    }
    assert response.tool_calls == (
        ToolCall("toolu_a", "get_weather", '{"city": "Paris"}'),
        ToolCall("toolu_b", "get_time", "{}"),
    )
    assert (response.text, response.finish_reason, response.usage.output_tokens) == (
        "Checking both.",
        "tool_calls",
        40,
    )


CHOICES: list[tuple[Any, bool | None, dict[str, Any] | None]] = [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    (NamedToolChoice("get_time"), None, {"type": "tool", "name": "get_time"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
    (
        NamedToolChoice("get_weather"),
        False,
        {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ),
    ("none", False, {"type": "none"}),
    (None, True, None),
]


@pytest.mark.parametrize("mode", MODES)
def test_tool_choice_and_disable_parallel_tool_use(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        for choice, parallel, _ in CHOICES:
            options = SippTextOptions(
                tools=[WEATHER, CLOCK], tool_choice=choice, parallel_tool_calls=parallel
            )
            call(mode, _descriptor(server), "chat", ASK, options=options)
        sent = [r.json().get("tool_choice") for r in server.requests]
    assert sent == [wire for _, _, wire in CHOICES]


@pytest.mark.parametrize("mode", MODES)
def test_tool_loop(mode: str) -> None:
    """Call -> both results in one user turn of tool_result blocks -> the answer."""

    def handler(req: Request) -> list[Any]:
        if len(req.json()["messages"]) > 1:
            return json_reply(message([{"type": "text", "text": "Sunny, 12:00."}]))
        return json_reply(PARALLEL)

    with LoopbackServer(handler) as server:
        d = _descriptor(server)
        first, _ = call(mode, d, "chat", ASK, options=TOOLS)
        conversation = [
            *ASK,
            ChatMessage("assistant", first.text, tool_calls=first.tool_calls),
            ChatMessage("tool", "sunny", tool_call_id="toolu_a"),
            ChatMessage("tool", "12:00", tool_call_id="toolu_b"),
            ChatMessage("user", "Thanks."),
        ]
        answer, _ = call(mode, d, "chat", conversation, options=TOOLS)
        second = server.requests[1].json()
    assert second["system"] == "Be brief." and second["tools"] == TOOLS_JSON
    assert second["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking both."},
                {
                    "type": "tool_use",
                    "id": "toolu_a",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "12:00"},
            ],
        },
        {"role": "user", "content": "Thanks."},
    ]
    assert (answer.text, answer.finish_reason, answer.tool_calls) == ("Sunny, 12:00.", "stop", ())


@pytest.mark.parametrize("mode", MODES)
def test_call_without_text_sends_only_tool_use(mode: str) -> None:
    with LoopbackServer(
        lambda req: json_reply(message([{"type": "text", "text": "ok"}]))
    ) as server:
        turns = [
            ChatMessage("user", "Time?"),
            ChatMessage("assistant", "", tool_calls=(ToolCall("toolu_1", "get_time", "{}"),)),
            ChatMessage("tool", "12:00", tool_call_id="toolu_1"),
        ]
        call(mode, _descriptor(server), "chat", turns, options=TOOLS)
        sent = server.requests[0].json()["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}],
    }


# A text block, then two tool_use blocks as Anthropic streams them: an empty
# partial_json first, then fragments; the second call takes no input at all.
TOOL_STREAM = [
    message_start(30),
    block_start(0, {"type": "text", "text": ""}),
    block_delta(0, {"type": "text_delta", "text": "Checking."}),
    block_stop(0),
    block_start(1, {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}),
    block_delta(1, {"type": "input_json_delta", "partial_json": ""}),
    event("ping", {"type": "ping"}),
    block_delta(1, {"type": "input_json_delta", "partial_json": '{"city": '}),
    block_delta(1, {"type": "input_json_delta", "partial_json": '"Paris"}'}),
    block_stop(1),
    block_start(2, {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}),
    block_delta(2, {"type": "input_json_delta", "partial_json": ""}),
    block_stop(2),
    *message_end("tool_use", 52),
]


@pytest.mark.parametrize("mode", MODES)
def test_streamed_tool_use(mode: str) -> None:
    with LoopbackServer(lambda req: sse_reply(TOOL_STREAM)) as server:
        response, batches = call(
            mode, _descriptor(server), "chat", ASK, options=TOOLS, emit_tokens=True
        )
    assert [(b.text, b.tool_calls) for b in batches] == [
        ("Checking.", ()),
        ("", (ToolCallDelta(0, "toolu_a", "get_weather"),)),
        ("", (ToolCallDelta(0, arguments='{"city": '),)),
        ("", (ToolCallDelta(0, arguments='"Paris"}'),)),
        ("", (ToolCallDelta(1, "toolu_b", "get_time"),)),
        ("", (ToolCallDelta(1, arguments="{}"),)),
    ]
    assert [b.sequence for b in batches] == list(range(6))
    deltas = [d for b in batches for d in b.tool_calls]
    for index, made in enumerate(response.tool_calls):
        assert "".join(d.arguments for d in deltas if d.index == index) == made.arguments
    assert response.tool_calls == (
        ToolCall("toolu_a", "get_weather", '{"city": "Paris"}'),
        ToolCall("toolu_b", "get_time", "{}"),
    )
    assert (response.text, response.finish_reason) == ("Checking.", "tool_calls")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (30, 52)


@pytest.mark.parametrize("mode", MODES)
def test_refused_before_sending(mode: str) -> None:
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        d = _descriptor(server)
        for arguments in ('["Paris"]', "not json", "null"):
            turns = [
                ChatMessage("user", "Weather?"),
                ChatMessage(
                    "assistant", "", tool_calls=(ToolCall("toolu_x", "get_weather", arguments),)
                ),
                ChatMessage("tool", "sunny", tool_call_id="toolu_x"),
            ]
            with pytest.raises(InvalidRequestError, match="'toolu_x' \\(get_weather\\)"):
                call(mode, d, "chat", turns, options=TOOLS)
        with pytest.raises(InvalidRequestError, match="cannot override typed fields"):
            call(mode, d, "chat", ASK, provider_options={"tool_choice": {"type": "any"}})
        odd = FunctionTool(name="odd", parameters={"type": "object", "default": b"x"})
        with pytest.raises(InvalidRequestError, match="'odd' parameters: a bytes is not JSON"):
            call(mode, d, "chat", ASK, options=SippTextOptions(tools=[odd]))
        assert server.requests == []


MALFORMED_RESPONSES: dict[str, dict[str, Any]] = {
    "no id": message([{"type": "tool_use", "name": "get_time", "input": {}}], "tool_use"),
    "input not an object": message(
        [{"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": "{}"}], "tool_use"
    ),
    "claims tool use but has none": message([{"type": "text", "text": "hm"}], "tool_use"),
}
_TOOL = {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {}}
MALFORMED_FRAMES: dict[str, list[bytes]] = {
    "tool_use without a name": [block_start(0, {"type": "tool_use", "id": "t", "input": {}})],
    "input_json_delta on a text block": [
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "input_json_delta", "partial_json": "{}"}),
    ],
    "partial_json not a string": [
        block_start(0, _TOOL),
        block_delta(0, {"type": "input_json_delta", "partial_json": {}}),
    ],
    "tool_use block without an index": [
        event("content_block_start", {"type": "content_block_start", "content_block": _TOOL})
    ],
    "claims tool use but has none": [
        block_start(0, {"type": "text", "text": ""}),
        block_delta(0, {"type": "text_delta", "text": "hm"}),
        block_stop(0),
    ],
}


@pytest.mark.parametrize("mode", MODES)
def test_malformed_tool_use(mode: str) -> None:
    def handler(req: Request) -> list[Any]:
        case = req.headers["x-case"]
        if req.json().get("stream"):
            return sse_reply(
                [message_start(), *MALFORMED_FRAMES[case], *message_end("tool_use", 3)]
            )
        return json_reply(MALFORMED_RESPONSES[case])

    with LoopbackServer(handler) as server:
        for case in MALFORMED_RESPONSES:
            with pytest.raises(RemoteError, match=r"tool[ _](call|use)") as info:
                call(mode, _descriptor(server, case), "chat", ASK, options=TOOLS)
            assert info.value.code == "upstream", case
        for case in MALFORMED_FRAMES:
            with pytest.raises(RemoteError, match=r"tool[ _](call|use)|block index") as info:
                call(mode, _descriptor(server, case), "chat", ASK, options=TOOLS, emit_tokens=True)
            assert info.value.code == "upstream", case


@pytest.mark.parametrize("mode", MODES)
def test_query_with_tools_uses_messages(mode: str) -> None:
    # Anthropic's query is a Messages call too, so tools go with it.
    with LoopbackServer(lambda req: json_reply(PARALLEL)) as server:
        response, _ = call(mode, _descriptor(server), "query", "Time?", options=TOOLS)
        body = server.requests[0].json()
    assert body["tools"] == TOOLS_JSON and body["messages"] == [
        {"role": "user", "content": "Time?"}
    ]
    assert response.finish_reason == "tool_calls" and len(response.tool_calls) == 2
