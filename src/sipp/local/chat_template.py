"""Render a GGUF's own `tokenizer.chat_template` in a sandboxed Jinja2 environment.

The template is data that came with a model file, so it runs sandboxed and
immutable: it can format messages but not reach Python objects or mutate its
inputs. The environment mirrors the conventions model authors write against
(`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`, `strftime_now`).

Messages reach the template in the shape Hugging Face templates expect: an assistant
turn's `tool_calls` as OpenAI function calls whose `arguments` is a parsed object
(templates apply `tojson` to it), a tool turn with its `tool_call_id` and the name of
the function it answers, and the request's tools as OpenAI function-tool dicts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, Literal

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .._errors import InvalidRequestError, SippError, UnsupportedOperationError
from .._types import ChatMessage, FunctionTool, ToolCall

__all__ = ["ChatTemplate", "ToolSupport", "tool_dict"]

ToolFormat = Literal["hermes", "generic"]
HERMES_OPEN = "<tool_call>"
_PROBE_TOOL = FunctionTool(
    name="sipp_probe_function",
    description="probe",
    parameters={"type": "object", "properties": {"sipp_probe_arg": {"type": "string"}}},
)
# How a Hermes template writes a past call: the marker, then a JSON object led by "name".
_HERMES_PAST_CALL = re.compile(
    re.escape(HERMES_OPEN) + r'\s*\{\s*"name"\s*:\s*"' + _PROBE_TOOL.name + '"'
)
_PROBE_CALL = ToolCall("call_sipp_probe", _PROBE_TOOL.name, '{"sipp_probe_arg": "x"}')


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    indent: int | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@dataclass(frozen=True)
class ToolSupport:
    """What a template does with tools: `renders_tools` when passing tools changes its
    output; `format` is how calls are written: `hermes` (`<tool_call>{json}</tool_call>`
    blocks, which the template also renders for past calls) or `generic` (Sipp
    describes the tools itself and the model answers in JSON)."""

    renders_tools: bool
    format: ToolFormat


def tool_dict(tool: FunctionTool) -> dict[str, Any]:
    """`tool` as the OpenAI function-tool dict chat templates are written against."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = (
        dict(tool.parameters)
        if tool.parameters is not None
        else {"type": "object", "properties": {}}
    )
    return {"type": "function", "function": function}


def _call_arguments(call: ToolCall) -> Any:
    if not call.arguments.strip():
        return {}  # some clients send "" for a function without parameters
    try:
        value = json.loads(call.arguments)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(
            f"tool call {call.id!r}: arguments are not valid JSON ({exc.msg})"
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"tool call {call.id!r}: arguments must be a JSON object")
    return value


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as template input; see the module docstring for the shape."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _call_arguments(c)},
                }
                for c in m.tool_calls
            ]
            names.update((c.id, c.name) for c in m.tool_calls)
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
            if m.tool_call_id in names:
                d["name"] = names[m.tool_call_id]
        out.append(d)
    return out


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise UnsupportedOperationError(
                f"the model's tokenizer.chat_template does not compile: {exc}"
            ) from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: Sequence[ChatMessage] | Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[FunctionTool] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render `messages` (ChatMessages, or dicts already in template shape) and
        `tools`. Whatever the template raises becomes `InvalidRequestError`."""
        if not messages:
            raise InvalidRequestError("chat needs at least one message")
        if isinstance(messages[0], ChatMessage):
            items = message_dicts([ChatMessage.coerce(m) for m in messages])
        else:
            items = [dict(m) for m in messages]
        try:
            return self._template.render(
                messages=items,
                tools=[tool_dict(t) for t in tools] if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateRaised as exc:
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {exc}"
            ) from exc
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the model's chat template failed to render: {exc}") from exc
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            # Templates index and concatenate freely: a message shape they did not
            # expect (e.g. `content + ...` on a tool-call turn) is a bad request here.
            raise InvalidRequestError(
                f"the model's chat template cannot render these messages "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    @cached_property
    def tool_support(self) -> ToolSupport:
        """Found by rendering probe conversations, not by reading the source: a
        template that mentions `tools` may still ignore them."""
        user = ChatMessage("user", "sipp probe")
        try:
            plain = self.render([user])
            with_tools = self.render([user], tools=[_PROBE_TOOL])
            history = self.render(
                [user, ChatMessage("assistant", "", (_PROBE_CALL,))], tools=[_PROBE_TOOL]
            )
        except SippError:
            return ToolSupport(False, "generic")
        renders = with_tools != plain and _PROBE_TOOL.name in with_tools
        hermes = renders and HERMES_OPEN in with_tools and bool(_HERMES_PAST_CALL.search(history))
        return ToolSupport(renders, "hermes" if hermes else "generic")
