"""How one chat request with tools runs on a local model: what the template sees, the
grammar that constrains the reply, and the parser that reads it.

Two formats, chosen per template by `ChatTemplate.tool_support`:

- `hermes` (Qwen and other templates that render `<tool_call>` blocks): the template
  gets the tools and describes them itself; the model writes
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks.
- `generic` (any other template, e.g. SmolLM2's, which ignores tools): Sipp describes
  the tools in a system message and the reply is one JSON object,
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or, under `auto`,
  `{"response": "..."}`. Past calls and results are written into the history in
  that same shape, since the template has no way to show them.

`tool_choice`: `required` or a named function forces a call from the first token
(the grammar admits only calls, of that function when named, with arguments that
follow its parameters schema); `parallel_tool_calls=False` admits exactly one.
`auto` on a Hermes template leaves the model free until it samples the `<tool_call>`
token, then the same grammar takes over (a lazy grammar); if the marker is not one
token, `auto` runs unconstrained and malformed blocks stay text. `none` renders no
tools and applies no grammar.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._errors import InvalidRequestError
from .._types import ChatMessage, FunctionTool, NamedToolChoice, SippTextOptions
from . import _llama
from .chat_template import HERMES_OPEN, ToolSupport, message_dicts, tool_dict
from .tool_parser import CLOSE, GenericParser, HermesParser, ToolCallParser

__all__ = ["ToolPlan", "plan_tools"]


@dataclass(frozen=True)
class ToolPlan:
    messages: list[dict[str, Any]]  # template input
    template_tools: tuple[FunctionTool, ...] | None  # tools the template renders itself
    grammar: str | None
    trigger_token: int | None  # set: the grammar is lazy and starts at this token
    format: str
    names: frozenset[str]  # functions a call may name; empty: no calls expected

    def parser(self) -> ToolCallParser | None:
        if not self.names:
            return None
        if self.format == "hermes":
            return HermesParser(self.names)
        return GenericParser(self.names)


def plan_tools(
    support: ToolSupport,
    messages: Sequence[ChatMessage],
    options: SippTextOptions,
    marker_token: int | None,
) -> ToolPlan:
    """`marker_token`: the id of `<tool_call>` when it is a single token."""
    hermes = support.format == "hermes"
    history = message_dicts(messages)
    if not hermes:
        history = _generic_history(history)
    choice = options.tool_choice or "auto"
    if not options.tools or choice == "none":
        return ToolPlan(history, None, None, None, support.format, frozenset())
    tools = tuple(options.tools)
    allowed = (
        tuple(t for t in tools if t.name == choice.name)
        if isinstance(choice, NamedToolChoice)
        else tools
    )
    forced = choice != "auto"
    parallel = options.parallel_tool_calls is not False
    names = frozenset(t.name for t in allowed)
    if hermes:
        block = f"{_literal(HERMES_OPEN + chr(10))} sipp-tool-call {_literal(chr(10) + CLOSE)}"
        grammar = _grammar(
            f"root ::= {_repeat('sipp-tool-block', _literal(chr(10)), parallel)}\n"
            f"sipp-tool-block ::= {block}",
            {"sipp-tool-call": _call_schema(allowed)},
        )
        if forced:
            return ToolPlan(history, tools, grammar, None, "hermes", names)
        if marker_token is None:  # nothing to trigger on: parse only
            return ToolPlan(history, tools, None, None, "hermes", names)
        return ToolPlan(history, tools, grammar, marker_token, "hermes", names)
    schemas: dict[str, Mapping[str, Any]] = {"sipp-tool-call": _call_schema(allowed)}
    answer = ""
    if not forced:
        answer = " | sipp-answer"
        schemas["sipp-answer"] = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
        }
    # The `space` rule comes with the converter's output (every object uses it).
    calls = _repeat("sipp-tool-call", 'space "," space', parallel)
    key = _literal('"tool_calls"')
    grammar = _grammar(
        f"root ::= sipp-tool-calls{answer}\n"
        f'sipp-tool-calls ::= "{{" space {key} space ":" space "[" space {calls} space "]" '
        'space "}" space',
        schemas,
    )
    prompt = _generic_prompt(tools, allowed, forced)
    return ToolPlan(_with_system(history, prompt), None, grammar, None, "generic", names)


def _repeat(item: str, separator: str, parallel: bool) -> str:
    return f"{item} ({separator} {item})*" if parallel else item


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF string literal escapes like a JSON one


def _call_schema(tools: Sequence[FunctionTool]) -> Mapping[str, Any]:
    """One `{"name", "arguments"}` call of any of `tools`.

    A parameters schema may keep its subschemas in `$defs` (pydantic writes them so)
    and point at them with `#/$defs/...`: nested here, those pointers would resolve
    against the call schema, so each tool's definitions move up to it, renamed per
    tool so two tools' `Address` cannot collide."""
    variants: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        params: dict[str, Any] = dict(tool.parameters or {"type": "object"})
        prefix = f"sipp-tool-{i}-"
        for key in ("$defs", "definitions"):
            found = params.pop(key, None)
            if isinstance(found, Mapping):
                defs.update((prefix + name, _move_refs(sub, prefix)) for name, sub in found.items())
        variants.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.name},
                    "arguments": _move_refs(params, prefix),
                },
                "required": ["name", "arguments"],
            }
        )
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def _move_refs(value: Any, prefix: str) -> Any:
    """`value` with `#/$defs/X` and `#/definitions/X` pointers renamed to `#/$defs/{prefix}X`."""
    try:
        return _renamed(value, prefix)
    except RecursionError:
        raise InvalidRequestError("a tool's parameters schema is nested too deeply") from None


def _renamed(value: Any, prefix: str) -> Any:
    if isinstance(value, dict):
        out = {k: _renamed(v, prefix) for k, v in value.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            for old in ("#/$defs/", "#/definitions/"):
                if ref.startswith(old):
                    out["$ref"] = "#/$defs/" + prefix + ref[len(old) :]
        return out
    if isinstance(value, list):
        return [_renamed(v, prefix) for v in value]
    return value


def _grammar(head: str, schemas: Mapping[str, Mapping[str, Any]]) -> str:
    try:
        rules = _llama.json_schema_rules(schemas)
    except Exception as exc:  # the converter raises plain exceptions
        raise InvalidRequestError(
            f"a tool's parameters schema cannot be turned into a grammar: {exc}"
        ) from exc
    return f"{head}\n{rules}"


def _generic_prompt(
    tools: Sequence[FunctionTool], allowed: Sequence[FunctionTool], forced: bool
) -> str:
    listing = "\n".join(json.dumps(tool_dict(t)["function"], ensure_ascii=False) for t in tools)
    call_form = '{"tool_calls": [{"name": <function name>, "arguments": <arguments object>}]}'
    if forced:
        only = f" Call {allowed[0].name}." if len(allowed) == 1 and len(tools) > 1 else ""
        how = f"Reply with one JSON object that calls functions: {call_form}.{only}"
    else:
        how = (
            f"Reply with one JSON object: either {call_form} to call functions, "
            'or {"response": <your answer as a string>} to answer directly.'
        )
    return (
        "You can call the following functions. Each line describes one, with the "
        f"JSON Schema of its arguments:\n{listing}\n\n{how}"
    )


def _with_system(history: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    if history and history[0]["role"] == "system":
        first = dict(history[0])
        first["content"] = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
        return [first, *history[1:]]
    return [{"role": "system", "content": prompt}, *history]


def _generic_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Past calls and results in the generic JSON shape, as plain assistant/user turns."""
    out: list[dict[str, Any]] = []
    for m in history:
        if m.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in m["tool_calls"]
            ]
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            content = f"{m['content']}\n{text}" if m["content"] else text
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            result = {"tool_response": {"name": m.get("name"), "content": m["content"]}}
            out.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append(m)
    return out
