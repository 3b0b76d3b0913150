"""Tool calling pieces that need no model: the output parsers, template rendering of
tool turns, and the typed errors templates raise. The model-backed tests are in
test_tools.py."""

from __future__ import annotations

import json
import re

import pytest

from sipp import ChatMessage, FunctionTool, InvalidRequestError, ToolCall, ToolCallDelta
from sipp.local.chat_template import ChatTemplate
from sipp.local.tool_parser import GenericParser, HermesParser

NAMES = frozenset({"get_weather"})
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


def _stream(
    parser: HermesParser | GenericParser, chunks: list[str]
) -> tuple[str, list[ToolCallDelta]]:
    text, deltas = "", []
    for chunk in chunks:
        out, found = parser.feed(chunk)
        text, deltas = text + out, deltas + found
    out, found = parser.finish()
    return text + out, deltas + found


def _chars(text: str) -> list[str]:
    return list(text)  # one character per feed: every marker split is exercised


def test_hermes_parser_splits_text_and_calls_whatever_the_chunking() -> None:
    output = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    for chunks in ([output], _chars(output)):
        parser = HermesParser(NAMES)
        text, deltas = _stream(parser, chunks)
        assert text == parser.text == "Let me check."
        assert [(d.index, d.name, d.arguments) for d in deltas] == [
            (0, "get_weather", '{"city":"Paris"}'),
            (1, "get_weather", '{"city":"Oslo"}'),
        ]
        assert [(c.id, c.name, c.arguments) for c in parser.calls] == [
            (d.id, d.name, d.arguments) for d in deltas
        ]
        assert all(CALL_ID.match(c.id) for c in parser.calls)
        assert parser.calls[0].id != parser.calls[1].id


def test_hermes_parser_holds_back_only_a_possible_marker() -> None:
    parser = HermesParser(NAMES)
    assert parser.feed("Hello <tool") == ("Hello", [])
    # Not a marker after all: the held text comes out unchanged.
    assert parser.feed("kit> here") == (" <toolkit> here", [])
    assert parser.finish() == ("", [])
    assert parser.text == "Hello <toolkit> here"


@pytest.mark.parametrize(
    "block",
    [
        "not json at all",
        '{"name": "launch_rockets", "arguments": {}}',  # not one of the request's tools
        '{"name": ["get_weather"], "arguments": {}}',  # a name that does not even hash
        '{"name": "get_weather", "arguments": [1, 2]}',
        '{"name": "get_weather", "arguments": {"city": "Par',  # cut short, never closed
        '{"name": "get_weather", "arguments": {"days": ' + "9" * 5000 + "}}",  # int limit
        '{"name": "get_weather", "arguments": {"a": ' + "[" * 3000 + "]" * 3000 + "}}",
    ],
)
def test_an_unparseable_call_block_stays_text(block: str) -> None:
    closed = "</tool_call>" if block.endswith("}") or "json" in block else ""
    output = f"Sure: <tool_call>\n{block}\n{closed}"
    parser = HermesParser(NAMES)
    text, deltas = _stream(parser, _chars(output))
    assert deltas == [] and parser.calls == []
    assert text == output


def test_hermes_parser_accepts_quoted_arguments_and_compacts_them() -> None:
    parser = HermesParser(NAMES)
    quoted = json.dumps(json.dumps({"city": "Zürich", "days": 2}))
    _, deltas = _stream(
        parser, [f'<tool_call>{{"name": "get_weather", "arguments": {quoted}}}</tool_call>']
    )
    assert [d.arguments for d in deltas] == ['{"city":"Zürich","days":2}']


def test_generic_parser_reads_calls_or_an_answer_and_keeps_anything_else_as_text() -> None:
    calls = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    parser = GenericParser(NAMES)
    assert parser.feed(calls) == ("", [])  # one JSON object: nothing before the end
    text, deltas = parser.finish()
    assert text == "" and [(d.index, d.name, d.arguments) for d in deltas] == [
        (0, "get_weather", '{"city":"Paris"}')
    ]
    answer = GenericParser(NAMES)
    assert _stream(answer, ['{"response": "It is sunny."}']) == ("It is sunny.", [])
    for raw in (
        '{"tool_calls": [{"name": "get_weather", "argu',
        '{"tool_calls": [{"name": "x"}]}',
        '{"tool_calls": ' + "[" * 3000 + "]" * 3000 + "}",
    ):
        cut = GenericParser(NAMES)
        assert _stream(cut, [raw]) == (raw, []) and cut.calls == []


TOOL = FunctionTool(
    name="get_weather",
    description="Weather now",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}},
)
CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
HISTORY = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", (CALL,)),
    ChatMessage("tool", "18C", tool_call_id="call_1"),
]
# A template in the shape Hermes templates are written in, enough to see what it receives.
PROBE = (
    "{% for t in tools or [] %}T:{{ t | tojson }}\n{% endfor %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% for c in m.tool_calls or [] %}|{{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% if m.tool_call_id %}|{{ m.tool_call_id }} {{ m.name }}{% endif %}{{ '\\n' }}{% endfor %}"
)


def test_templates_get_tools_and_tool_turns_in_hugging_face_shape() -> None:
    rendered = ChatTemplate(PROBE).render(HISTORY, tools=[TOOL])
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    assert rendered.splitlines() == [
        f"T:{json.dumps(tool)}",
        "user:Weather in Paris?",
        # Arguments arrive parsed, so `tojson` writes an object, not a quoted string.
        'assistant:|call_1 get_weather {"city": "Paris"}',
        "tool:18C|call_1 get_weather",
    ]


def test_tojson_takes_separators_and_sort_keys() -> None:
    template = ChatTemplate("{{ messages[0] | tojson(separators=(',', ':'), sort_keys=True) }}")
    assert template.render([ChatMessage("user", "x")]) == '{"content":"x","role":"user"}'


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError
        "{{ ['a'].index(messages[0]['content']) }}",  # ValueError
        "{{ '%(tool_call_id)s' % messages[0] }}",  # KeyError
        "{{ 1 // (messages | length - 1) }}",  # ZeroDivisionError
        "{{ range(10 ** 6) | list }}",  # OverflowError: the sandbox caps ranges
    ],
)
def test_a_template_that_raises_on_input_is_an_invalid_request(source: str) -> None:
    with pytest.raises(InvalidRequestError, match="chat template"):
        ChatTemplate(source).render([ChatMessage("user", "x")])


def test_bad_tool_call_arguments_are_an_invalid_request() -> None:
    for arguments, why in (("{oops", "not valid JSON"), ("[1]", "must be a JSON object")):
        bad = ChatMessage("assistant", "", (ToolCall("call_9", "get_weather", arguments),))
        with pytest.raises(InvalidRequestError, match=why):
            ChatTemplate(PROBE).render([ChatMessage("user", "x"), bad])
