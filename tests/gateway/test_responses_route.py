"""`POST /v1/responses` (OpenAI's Responses API) on a real `sipp-gateway serve`, driven by
the official `openai` SDK: local and provider targets, streams in OpenAI's event order,
structured output, a full function-calling loop through a loopback OpenAI upstream, and
refusals in OpenAI's envelope naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from sipp import ChatMessage, LocalModelDescriptor, SippClient, SippTextOptions

from ..remote.loopback import Action, Request, Reset, json_reply, sse_reply
from ..remote.openai_wire import chunk
from .test_server import TOKEN, Gateway, running_gateway, without_prefix_reuse
from .upstreams import CountingUpstream, add_targets

SYSTEM = "You answer in one short sentence."
QUESTION = "What colour is the sky?"
GREEDY: dict[str, Any] = {"temperature": 0, "max_output_tokens": 60}  # ends with "stop"

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CLOCK = {"type": "function", "name": "get_time", "parameters": None, "strict": False}
ASK_TOOLS = "What is the weather and the time in Paris?"
PREAMBLE, ANSWER = "Let me check.", "It is sunny in Paris at noon."
CALLS = [
    {
        "id": "call_a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]
USAGE = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}


def _tool_upstream(req: Request) -> list[Action]:
    """An OpenAI upstream that calls both tools, then answers once it has their results;
    model `broken` starts a stream and resets the connection."""
    body = req.json()
    answered = body["messages"][-1]["role"] == "tool"
    if body["model"] == "broken":
        return [*sse_reply([chunk({"role": "assistant", "content": "Par"})]), Reset()]
    if body["model"] == "interleaved":  # call 0 resumes after call 1 began
        start = [
            {
                "index": i,
                "id": c["id"],
                "type": "function",
                "function": {**c["function"], "arguments": ""},
            }
            for i, c in enumerate(CALLS)
        ]
        late = [{"index": 0, "function": {"arguments": "{}"}}]
        return sse_reply(
            [
                chunk({"tool_calls": start}),
                chunk({"tool_calls": late}),
                chunk({}, "tool_calls"),
                b"data: [DONE]\n\n",
            ]
        )
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER}
        if not answered:
            message = {"role": "assistant", "content": PREAMBLE, "tool_calls": CALLS}
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": "stop" if answered else "tool_calls",
        }
        return json_reply(
            {
                "id": "c",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [choice],
                "usage": USAGE,
            }
        )
    if answered:
        frames = [chunk({"role": "assistant", "content": ANSWER}), chunk({}, "stop")]
    else:
        frames = [
            chunk({"role": "assistant", "content": "Let me "}),
            chunk({"content": "check."}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_a",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 1,
                            "id": "call_b",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        }
                    ]
                }
            ),
            chunk({}, "tool_calls"),
        ]
    usage = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    usage |= {"choices": [], "usage": USAGE}
    return sse_reply(
        [*frames, b"data: " + json.dumps(usage).encode() + b"\n\n", b"data: [DONE]\n\n"]
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_tool_upstream) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    def with_tools(toml: str) -> str:
        targets = {"tools": "gpt-tools", "broken": "broken", "interleaved": "interleaved"}
        return add_targets(toml, upstream.url, targets, "TEST_PROVIDER_TOKEN")

    with running_gateway(smollm_path, tmp_path_factory.mktemp("responses"), with_tools) as gw:
        yield gw
    assert "unexpected error" not in gw.stderr


@pytest.fixture()
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture()
def fresh_client(smollm_path: Path, tmp_path: Path) -> Iterator[openai.OpenAI]:
    """A gateway that prefills every prompt whole, as the fresh library endpoint it is
    compared with does: reused KV from earlier turns could tip a near tie (see
    `without_prefix_reuse`)."""
    with running_gateway(smollm_path, tmp_path, without_prefix_reuse) as gw:
        c = openai.OpenAI(base_url=gw.public + "/v1", api_key=TOKEN, max_retries=0, timeout=120)
        yield c
        c.close()


def _library(smollm_path: Path, messages: list[ChatMessage], max_tokens: int = 60) -> Any:
    with SippClient() as sipp:
        ref = sipp.add("l", LocalModelDescriptor(smollm_path))
        return sipp.chat(
            messages,
            endpoint=ref,
            options=SippTextOptions(max_tokens=max_tokens, temperature=0),
        ).result()


def test_create_matches_the_library(client: openai.OpenAI, smollm_path: Path) -> None:
    response = client.responses.create(
        model="local", instructions=SYSTEM, input=QUESTION, metadata={"run": "1"}, **GREEDY
    )
    direct = _library(smollm_path, [ChatMessage("system", SYSTEM), ChatMessage("user", QUESTION)])
    assert direct.finish_reason == "stop"
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "completed" and response.error is None
    [item] = response.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert [part.type for part in item.content] == ["output_text"]
    assert item.content[0].text == response.output_text == direct.text  # type: ignore[union-attr]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        direct.usage.input_tokens,
        direct.usage.output_tokens,
    )
    assert response.usage.total_tokens == direct.usage.total_tokens
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    # the same prompt again: the engine reuses its prefix's KV, reported as cached tokens
    again = client.responses.create(model="local", instructions=SYSTEM, input=QUESTION, **GREEDY)
    assert again.usage is not None
    assert 0 < again.usage.input_tokens_details.cached_tokens < again.usage.input_tokens
    # the request's settings come back, as OpenAI echoes them
    assert (response.model, response.instructions, response.max_output_tokens) == (
        "local",
        SYSTEM,
        60,
    )
    assert (response.temperature, response.tools, response.tool_choice) == (0, [], "auto")
    assert response.parallel_tool_calls is True and response.store is False
    assert response.metadata == {"run": "1"} and response.text is not None
    assert response.text.format.type == "text"


def test_stream_events_concatenate_to_the_same_answer(
    client: openai.OpenAI, gateway: Gateway
) -> None:
    whole = client.responses.create(model="local", instructions=SYSTEM, input=QUESTION, **GREEDY)
    with client.responses.stream(
        model="local", instructions=SYSTEM, input=QUESTION, **GREEDY
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == final.output_text
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.id == events[0].response.id  # type: ignore[union-attr]
    kinds = [e.type for e in events]
    deltas = kinds[4:-4]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert deltas and set(deltas) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))

    with httpx.stream(
        "POST",
        f"{gateway.public}/v1/responses",
        json={"model": "local", "input": QUESTION, "max_output_tokens": 3, "stream": True},
        headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "resp-stream-1"},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    # every frame names its event, and its data's type says the same
    names, datas = lines[0::2], lines[1::2]
    assert all(n.startswith("event: ") and d.startswith("data: ") for n, d in zip(names, datas))
    for name, data in zip(names, datas):
        assert json.loads(data[6:])["type"] == name[7:]
    last = json.loads(datas[-1][6:])
    assert last["type"] == "response.incomplete" and last["response"]["id"] == "resp_resp-stream-1"


def test_input_items_and_roles(fresh_client: openai.OpenAI, smollm_path: Path) -> None:
    client = fresh_client
    first = client.responses.create(model="local", instructions=SYSTEM, input=QUESTION, **GREEDY)
    follow_up = "And at night?"
    items: list[Any] = [
        {"role": "developer", "content": SYSTEM},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
        *first.output,  # the SDK sends its output items back as they came
        {"role": "user", "content": follow_up},
    ]
    response = client.responses.create(model="local", input=items, **GREEDY)
    direct = _library(
        smollm_path,
        [
            ChatMessage("system", SYSTEM),
            ChatMessage("user", QUESTION),
            ChatMessage("assistant", first.output_text),
            ChatMessage("user", follow_up),
        ],
    )
    assert response.output_text == direct.text
    assert response.usage is not None and response.usage.input_tokens == direct.usage.input_tokens


def test_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="local", input=QUESTION, max_output_tokens=2, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 2
    assert response.output[0].status == "incomplete"  # type: ignore[union-attr]

    stream = client.responses.create(
        model="local", input=QUESTION, max_output_tokens=2, temperature=0, stream=True
    )
    events = list(stream)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == response.output_text


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"type": "string", "enum": ["blue", "grey"]}},
    "required": ["colour"],
    "additionalProperties": False,
}


class Sky(pydantic.BaseModel):
    colour: Literal["blue", "grey"]


def test_structured_output(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="local",
        instructions=SYSTEM,
        input=QUESTION,
        text={"format": {"type": "json_schema", "name": "sky", "schema": SCHEMA, "strict": True}},
        **GREEDY,
    )
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.text is not None and response.text.format.type == "json_schema"
    assert response.text.format.name == "sky"  # type: ignore[union-attr]

    parsed = client.responses.parse(
        model="local", instructions=SYSTEM, input=QUESTION, text_format=Sky, **GREEDY
    )
    assert isinstance(parsed.output_parsed, Sky)

    loose = client.responses.create(
        model="local", input=QUESTION, text={"format": {"type": "json_object"}}, **GREEDY
    )
    assert isinstance(json.loads(loose.output_text), dict)


def test_structured_output_reaches_a_provider_as_its_response_format(
    client: openai.OpenAI, upstream: CountingUpstream
) -> None:
    fmt = {
        "type": "json_schema",
        "name": "sky",
        "description": "The sky's colour.",
        "schema": SCHEMA,
        "strict": True,
    }
    client.responses.create(model="tools", input=QUESTION, text={"format": fmt})
    sent = _sent(upstream)
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "sky",
            "schema": SCHEMA,
            "description": "The sky's colour.",
            "strict": True,
        },
    }
    client.responses.create(model="tools", input=QUESTION, text={"format": {"type": "json_object"}})
    assert _sent(upstream)["response_format"] == {"type": "json_object"}


def test_provider_target(client: openai.OpenAI) -> None:
    response = client.responses.create(model="mock-openai", input="hi")
    assert response.output_text == "from the provider" and response.status == "completed"
    assert response.usage is not None and response.usage.total_tokens == 6
    with client.responses.stream(model="mock-openai", input="hi") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "from the provider"


def _sent(upstream: CountingUpstream) -> dict[str, Any]:
    body: dict[str, Any] = upstream.calls("/chat/completions")[-1].json()
    return body


@pytest.mark.parametrize("streamed", [False, True])
def test_function_call_loop(
    client: openai.OpenAI, upstream: CountingUpstream, streamed: bool
) -> None:
    request: dict[str, Any] = {
        "model": "tools",
        "instructions": "Use the tools.",
        "tools": [WEATHER, CLOCK],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
    }
    conversation: list[Any] = [{"role": "user", "content": ASK_TOOLS}]
    if streamed:
        with client.responses.stream(input=conversation, **request) as stream:
            events = list(stream)
            first = stream.get_final_response()
        kinds = [e.type for e in events]
        assert kinds == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        fragments = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert fragments == ['{"city": ', '"Paris"}', "{}"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
    else:
        first = client.responses.create(input=conversation, **request)
    assert first.status == "completed" and first.output_text == PREAMBLE
    assert [item.type for item in first.output] == ["message", "function_call", "function_call"]
    calls = [item for item in first.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}', "completed"),
        ("call_b", "get_time", "{}", "completed"),
    ]
    assert first.tools[0].name == "get_weather" and first.tool_choice == "auto"
    sent = _sent(upstream)
    assert sent["messages"] == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": ASK_TOOLS},
    ]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather", "get_time"]
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["parameters"]
    assert sent["tools"][0]["function"]["strict"] is True
    assert sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True

    conversation += [
        *first.output,
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": "12:00"},
    ]
    if streamed:
        with client.responses.stream(input=conversation, **request) as stream:
            second = stream.get_final_response()
    else:
        second = client.responses.create(input=conversation, **request)
    assert second.output_text == ANSWER
    assert [item.type for item in second.output] == ["message"]
    sent = _sent(upstream)
    assert sent["messages"][2:] == [
        {
            "role": "assistant",
            "content": PREAMBLE,
            "tool_calls": CALLS,
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "12:00"},
    ]


def test_calls_without_text_and_a_named_choice(
    client: openai.OpenAI, upstream: CountingUpstream
) -> None:
    conversation: list[Any] = [
        {"role": "user", "content": ASK_TOOLS},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "12:00"}],
        },
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
    ]
    response = client.responses.create(
        model="tools",
        input=conversation,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
    )
    assert response.output_text == ANSWER
    assert response.tool_choice.type == "function"  # type: ignore[union-attr]
    sent = _sent(upstream)
    # consecutive function_call items are one assistant turn
    assert sent["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{}"},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    }
    assert [m["tool_call_id"] for m in sent["messages"][2:]] == ["call_b", "call_a"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}
    assert sent["parallel_tool_calls"] is False


def test_a_failure_mid_stream_is_an_error_event(client: openai.OpenAI) -> None:
    with client.responses.stream(model="broken", input="hi") as stream:
        events = list(stream)
    assert events[-1].type == "error"
    assert events[-1].code == "upstream" and events[-1].param is None  # type: ignore[union-attr]
    assert isinstance(events[-1].message, str)  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.completed" not in [e.type for e in events]


def test_a_call_resumed_after_the_next_began_is_an_error_event(client: openai.OpenAI) -> None:
    # OpenAI's event order closes each call before the next opens: a call that resumes
    # later cannot be streamed faithfully, so the stream says so instead of garbling it.
    with client.responses.stream(model="interleaved", input="hi", tools=[WEATHER, CLOCK]) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds.count("response.output_item.done") == 1 and kinds[-1] == "error"
    assert events[-1].code == "execution"  # type: ignore[union-attr]
    assert "continued after the next one began" in events[-1].message  # type: ignore[union-attr]


IMAGE = {"type": "input_image", "image_url": "data:image/png;base64,AA=="}


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no conversation"),
        ({"conversation": "conv_1"}, "conversation", "keeps no conversation"),
        ({"store": True}, "store", "keeps no conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
        ({"input": [{"role": "user", "content": [IMAGE]}]}, "input", "input_image"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]},
            "input",
            "call_x",
        ),
        ({"truncation": "auto"}, "truncation", "disabled"),
        ({"include": ["reasoning.encrypted_content"]}, "include", "empty"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
        ({"background": True}, "background", "not supported"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}},
            "tool_choice",
            "x",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools", "used twice"),
        ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text", "name"),
        ({"max_output_tokens": 0}, "max_output_tokens", "positive"),
        ({"temperature": 3}, "temperature", "temperature"),
    ],
)
def test_refusals_name_the_field(
    client: openai.OpenAI, gateway: Gateway, extra: dict[str, Any], param: str, words: str
) -> None:
    before = gateway.metric("sipp_local_requests", '{target="local"}')
    body = {"model": "local", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**body)
    assert caught.value.param == param and caught.value.code == "invalid_request"
    assert words in caught.value.message
    assert gateway.metric("sipp_local_requests", '{target="local"}') == before  # nothing ran


def test_other_errors_use_the_openai_envelope(gateway: Gateway) -> None:
    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=gateway.public + "/v1", api_key=key, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        sdk("wrong").responses.create(model="local", input="hi")
    with pytest.raises(openai.NotFoundError):
        sdk(TOKEN).responses.create(model="nope", input="hi")
    r = httpx.post(
        f"{gateway.public}/v1/responses",
        content=b"{not json",
        headers={"authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
