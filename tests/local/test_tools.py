"""Tool calling on real models: Qwen2.5-Coder 0.5B (a Hermes `<tool_call>` template)
and SmolLM2 135M (a template without tools: the generic JSON format).

The models are small, so these check the protocol, not the model's judgement: a forced
call is a well-formed call to an allowed function whose arguments follow its schema;
under `auto` the reply is text or well-formed calls. Generations are kept short."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from sipp import (
    ChatMessage,
    ContextRuntimeConfig,
    EndpointRef,
    FunctionTool,
    InvalidRequestError,
    LocalModelDescriptor,
    LocalTextOptions,
    NamedToolChoice,
    NativeRuntimeConfig,
    SamplingRuntimeConfig,
    SippClient,
    SippTextOptions,
    SippTextResponse,
    ToolCall,
    UnsupportedOperationError,
)
from sipp.local.chat_template import ToolSupport
from sipp.local.tool_plan import plan_tools

Client = tuple[SippClient, EndpointRef]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")
WEATHER = FunctionTool(
    name="get_weather",
    description="Get the current weather for a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city"],
    },
)
TIME = FunctionTool(
    name="get_time",
    description="Get the current local time in a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)
TOOLS = (WEATHER, TIME)
ASK = [ChatMessage("user", "What's the weather in Paris?")]
PAST_CALL = ToolCall("call_0123456789abcdef01234567", "get_weather", '{"city": "Paris"}')
LOOP = [
    *ASK,
    ChatMessage("assistant", "", (PAST_CALL,)),
    ChatMessage("tool", '{"temp_c": 18, "sky": "cloudy"}', tool_call_id=PAST_CALL.id),
]


def _options(**kw: Any) -> SippTextOptions:
    return SippTextOptions(**{"max_tokens": 64, "temperature": 0, "tools": TOOLS, **kw})


def _endpoint(client: SippClient, ref: EndpointRef) -> Any:
    return client._registry._endpoints[ref.id]


def _check_calls(response: SippTextResponse, allowed: tuple[FunctionTool, ...]) -> None:
    """Well-formed calls: fresh ids, allowed names, arguments valid for the schema."""
    schemas = {t.name: t.parameters for t in allowed}
    assert response.tool_calls and response.finish_reason == "tool_calls"
    for call in response.tool_calls:
        assert CALL_ID.match(call.id)
        assert call.name in schemas
        jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert len({c.id for c in response.tool_calls}) == len(response.tool_calls)


def _check_shape(response: SippTextResponse, allowed: tuple[FunctionTool, ...]) -> None:
    """`auto`: either calls (then well-formed) or a text answer."""
    if response.tool_calls:
        _check_calls(response, allowed)
    else:
        assert response.finish_reason in ("stop", "length")
        assert response.text.strip()


@pytest.fixture(scope="module")
def qwen(qwen_path: Path) -> Iterator[Client]:
    client = SippClient()
    config = NativeRuntimeConfig(context=ContextRuntimeConfig(n_ctx=1024, n_parallel=1))
    ref = client.add("qwen", LocalModelDescriptor(qwen_path, config))
    yield client, ref
    client.close()


def test_template_capabilities_are_detected(qwen: Client, text_client: Client) -> None:
    qwen_template = _endpoint(*qwen).loaded.chat_template
    assert qwen_template.tool_support == ToolSupport(True, "hermes")
    assert _endpoint(*text_client).loaded.chat_template.tool_support == ToolSupport(
        False, "generic"
    )


def test_qwen_renders_tools_past_calls_and_results(qwen: Client) -> None:
    rendered = _endpoint(*qwen).loaded.chat_template.render(LOOP, tools=TOOLS)
    assert '"name": "get_time"' in rendered  # the tools block
    # The past call's arguments are an object in the prompt, not a quoted JSON string.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' in rendered
    assert '<tool_response>\n{"temp_c": 18, "sky": "cloudy"}\n</tool_response>' in rendered


def test_qwen_required_without_parallel_calls_makes_exactly_one_valid_call(qwen: Client) -> None:
    client, ref = qwen
    options = _options(tool_choice="required", parallel_tool_calls=False)
    response = client.chat(ASK, endpoint=ref, options=options).result()
    _check_calls(response, TOOLS)
    assert len(response.tool_calls) == 1
    assert response.text == ""


def test_qwen_named_choice_streams_the_call_it_returns(qwen: Client) -> None:
    client, ref = qwen
    # The question is about the weather; the named choice still forces get_time.
    options = _options(tool_choice=NamedToolChoice("get_time"))
    run = client.chat(ASK, endpoint=ref, options=options, emit_tokens=True)
    batches = list(run)
    response = run.result()
    _check_calls(response, (TIME,))
    deltas = [d for b in batches for d in b.tool_calls]
    streamed: dict[int, list[str]] = {}
    for d in deltas:
        if d.index not in streamed:
            assert d.id is not None and d.name is not None  # the first delta of a call
            streamed[d.index] = [d.id, d.name, ""]
        streamed[d.index][2] += d.arguments
    assert [tuple(streamed[i]) for i in sorted(streamed)] == [
        (c.id, c.name, c.arguments) for c in response.tool_calls
    ]
    assert "".join(b.text for b in batches) == response.text == ""
    assert [b.sequence for b in batches] == list(range(len(batches)))


def test_qwen_auto_lazy_grammar_turns_an_opened_block_into_a_valid_call(qwen: Client) -> None:
    client, ref = qwen
    marker = _endpoint(client, ref)._tool_marker_token
    assert marker is not None
    # Push the model to open a call block at once: from that token on, the lazy grammar
    # alone decides what the call looks like. The tool takes no free text (where the
    # grammar would let the pushed marker in), so the bias cannot derail the call.
    units = FunctionTool(
        name="set_units",
        description="Choose the temperature unit",
        parameters={
            "type": "object",
            "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
        },
    )
    local = LocalTextOptions(sampling=SamplingRuntimeConfig(logit_bias={marker: 100.0}))
    options = _options(tools=[units], tool_choice="auto", parallel_tool_calls=False)
    response = client.chat(ASK, endpoint=ref, options=options, local=local).result()
    _check_calls(response, (units,))
    assert len(response.tool_calls) == 1 and response.text == ""


def test_qwen_tool_loop_renders_the_result_and_generates(qwen: Client) -> None:
    client, ref = qwen
    response = client.chat(LOOP, endpoint=ref, options=_options(max_tokens=48)).result()
    # This model may well call again instead of answering: only the shape is checked.
    _check_shape(response, TOOLS)
    assert response.usage is not None and response.usage.input_tokens > 200


def test_qwen_tool_choice_none_answers_in_text(qwen: Client) -> None:
    client, ref = qwen
    response = client.chat(
        ASK, endpoint=ref, options=_options(tool_choice="none", max_tokens=16)
    ).result()
    assert response.tool_calls == () and response.finish_reason in ("stop", "length")
    assert response.text.strip()


def test_smollm_generic_required_makes_a_valid_call(text_client: Client) -> None:
    client, ref = text_client
    options = _options(tool_choice="required", parallel_tool_calls=False)
    response = client.chat(ASK, endpoint=ref, options=options).result()
    _check_calls(response, TOOLS)
    assert len(response.tool_calls) == 1 and response.text == ""


def test_a_schema_with_defs_gets_valid_arguments(qwen: Client) -> None:
    client, ref = qwen
    # The shape pydantic (and so the OpenAI SDK's pydantic_function_tool) writes.
    contact = FunctionTool(
        name="add_contact",
        description="Save a contact",
        parameters={
            "$defs": {
                "Address": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                }
            },
            "type": "object",
            "properties": {"name": {"type": "string"}, "home": {"$ref": "#/$defs/Address"}},
            "required": ["name", "home"],
        },
    )
    options = _options(tools=[*TOOLS, contact], tool_choice=NamedToolChoice("add_contact"))
    response = client.chat(
        [ChatMessage("user", "Save Ada Lovelace, who lives in London.")],
        endpoint=ref,
        options=options,
    ).result()
    _check_calls(response, (contact,))  # jsonschema follows the $ref


def test_smollm_generic_auto_answers_or_calls(text_client: Client) -> None:
    client, ref = text_client
    for messages in ([ChatMessage("user", "Hi! How are you?")], LOOP):
        response = client.chat(messages, endpoint=ref, options=_options(max_tokens=48)).result()
        _check_shape(response, TOOLS)


def test_generic_format_describes_tools_and_writes_the_history_itself(
    text_client: Client,
) -> None:
    template = _endpoint(*text_client).loaded.chat_template
    plan = plan_tools(template.tool_support, LOOP, _options(), None)
    rendered = template.render(plan.messages, tools=plan.template_tools)
    assert json.dumps(WEATHER.parameters) in rendered  # the schema the model must follow
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in rendered
    assert '{"tool_response": {"name": "get_weather", "content": ' in rendered
    assert "<|im_start|>tool" not in rendered


def test_tools_refuse_a_grammar_of_the_caller_and_query(text_client: Client) -> None:
    client, ref = text_client
    with pytest.raises(InvalidRequestError, match="cannot be combined with tools"):
        client.chat(
            ASK, endpoint=ref, options=_options(), local=LocalTextOptions(grammar='root ::= "x"')
        )
    with pytest.raises(UnsupportedOperationError, match="tools need chat"):
        client.query("Weather?", endpoint=ref, options=_options())
    bad_schema = FunctionTool(name="bad", parameters={"type": "object", "$ref": "#/nowhere"})
    with pytest.raises(InvalidRequestError, match="parameters schema"):
        client.chat(ASK, endpoint=ref, options=_options(tools=[bad_schema]))
    deep: dict[str, object] = {"type": "string"}
    for _ in range(3000):  # past Python's recursion limit
        deep = {"type": "array", "items": deep}
    nested = FunctionTool(name="deep", parameters={"type": "object", "properties": {"a": deep}})
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        client.chat(ASK, endpoint=ref, options=_options(tools=[nested], tool_choice="required"))
    assert client.chat(ASK, endpoint=ref, options=_options()).result() is not None
