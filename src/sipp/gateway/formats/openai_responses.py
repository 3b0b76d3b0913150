"""OpenAI's Responses API (`POST /v1/responses`) as a wire format: the subset the official
`openai` client (`responses.create`, `.stream`, `.parse`) and the OpenAI Agents SDK use.

The gateway keeps no state: every request carries the whole conversation in `input`
(`previous_response_id`, `conversation` and `store: true` are refused). A list input
becomes chat turns; consecutive `function_call` items become one assistant turn with
several tool calls and each `function_call_output` a tool turn. The answer is a
Response object whose `output` holds a `message` item when the model said something,
then one `function_call` item per call. Streams follow OpenAI's typed events with a
`sequence_number`; a failure after the stream started is one `error` event. Errors
before it use OpenAI's envelope.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from ..._errors import ExecutionError, InvalidRequestError, SippError
from ..._types import (
    ChatMessage,
    FunctionTool,
    NamedToolChoice,
    SippTextOptions,
    ToolChoice,
)
from ..config import GatewayConfig
from ..request import (
    ChoiceDone,
    Completion,
    Event,
    GatewayRequest,
    Generation,
    Operation,
    ResponseFormat,
    TextDelta,
)
from .base import EVENT_STREAM_HEADERS, BearerFormat, check_schema, distinct_tools, field_error
from .openai import body_object, openai_error
from .openai_fields import attribution
from .openai_responses_input import STATELESS, chat_turns
from .openai_responses_output import (
    ResponseStream,
    call_item,
    error_frame,
    message_item,
    message_status,
    response_object,
)

__all__ = ["OpenAIResponsesFormat"]

logger = logging.getLogger("sipp.gateway")

_FIELDS = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "metadata",
        "user",
        "store",
        "truncation",
        "include",
        "reasoning",
        "previous_response_id",
        "conversation",
    }
)
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters", "strict"})
_MODES = ("auto", "none", "required")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for schema names


class OpenAIResponsesFormat(BearerFormat):
    operation: Operation = "chat"
    stream_headers = EVENT_STREAM_HEADERS

    # ------------------------------------------------------------- decode
    def decode(self, body: bytes, headers: Headers, config: GatewayConfig) -> GatewayRequest:
        obj = body_object(body, _FIELDS)
        _refuse_unserved(obj)
        stream = obj.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise field_error("stream", "'stream' must be true or false")
        options, echo = _options(obj)
        text, response_format = _text(obj.get("text"))
        instructions = obj.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise field_error("instructions", "'instructions' must be a string")
        messages = chat_turns(obj.get("input"))
        if instructions:
            messages = (ChatMessage("system", instructions), *messages)
        user, metadata = attribution(obj)
        echo |= {
            "instructions": instructions,
            "metadata": dict(metadata or {}),
            "text": text,
            "user": user,
        }
        return GatewayRequest(
            "chat",
            obj["model"],
            messages=messages,
            options=options,
            stream=bool(stream),
            generation=Generation(response_format=response_format),
            user=user,
            metadata=metadata,
            wire={"echo": echo},
        )

    # ------------------------------------------------------------- encode
    def encode(self, request: GatewayRequest, done: Completion, request_id: str) -> Response:
        response = done.choices[0]
        output: list[dict[str, Any]] = []
        if response.text or not response.tool_calls:
            output.append(message_item(request_id, 0, response.text, message_status(response)))
        for call in response.tool_calls:
            output.append(call_item(request_id, len(output), call, call.arguments, "completed"))
        body = response_object(request, request_id, int(time.time()), output, response)
        return JSONResponse(body, headers={"x-request-id": request_id})

    async def encode_stream(
        self, request: GatewayRequest, events: AsyncIterator[Event], request_id: str
    ) -> AsyncIterator[bytes]:
        stream = ResponseStream(request, request_id, int(time.time()))
        for frame in stream.start():
            yield frame
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    frames = stream.delta(event.batch.text, event.batch.tool_calls)
                elif isinstance(event, ChoiceDone):
                    frames = stream.finish(event.response)
                else:
                    continue
                for frame in frames:
                    yield frame
        # Failures are reported here rather than by the pipeline: the frame needs its number.
        except SippError as exc:
            yield stream.error(exc)
        except Exception:
            logger.exception("unexpected error in a responses stream (request %s)", request_id)
            yield stream.error(ExecutionError("internal error"))

    def stream_error(self, exc: SippError) -> bytes:
        # Only reached if encode_stream itself could not report (it numbers its own).
        return error_frame(exc, 0)

    def error(self, exc: SippError, request_id: str) -> Response:
        return openai_error(exc, request_id)


# ----------------------------------------------------------------- decoding helpers
def _refuse_unserved(obj: Mapping[str, Any]) -> None:
    """Fields only server-side state (which the gateway never keeps) or a feature it does
    not have could honour: refused unless absent or set to their no-op value."""
    for name in ("previous_response_id", "conversation"):
        if obj.get(name) is not None:
            raise field_error(name, f"'{name}' is not supported: {STATELESS}")
    store = obj.get("store")
    if store is not None and not isinstance(store, bool):
        raise field_error("store", "'store' must be true or false")
    if store:
        raise field_error("store", f"'store': true is not supported: {STATELESS}")
    if obj.get("truncation") not in (None, "disabled"):
        raise field_error(
            "truncation",
            "'truncation' must be 'disabled': the gateway never drops input "
            "(an input over the target's context is refused)",
        )
    include = obj.get("include")
    if include is not None and include != []:
        raise field_error("include", "'include' must be empty: no extra output is served")
    reasoning = obj.get("reasoning")
    if reasoning is not None and not (
        isinstance(reasoning, dict) and all(v is None for v in reasoning.values())
    ):
        raise field_error("reasoning", "'reasoning' is not supported by this gateway")


def _options(obj: Mapping[str, Any]) -> tuple[SippTextOptions, dict[str, Any]]:
    """The sampling and tool fields, and how the response echoes them."""
    tools = _tools(obj.get("tools"))
    choice, echo_choice = _tool_choice(obj.get("tool_choice"), tools)
    parallel = obj.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise field_error("parallel_tool_calls", "'parallel_tool_calls' must be true or false")
    max_tokens = obj.get("max_output_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise field_error("max_output_tokens", "'max_output_tokens' must be a positive integer")
    temperature = _number(obj, "temperature", 0.0, 2.0, low_open=False)
    top_p = _number(obj, "top_p", 0.0, 1.0, low_open=True)
    options = SippTextOptions(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        tools=tools or None,
        tool_choice=choice,
        # Without tools there is nothing to call in parallel: the flag is only echoed.
        parallel_tool_calls=parallel if tools else None,
    )
    echo = {
        "max_output_tokens": max_tokens,
        "parallel_tool_calls": True if parallel is None else parallel,
        "temperature": temperature,
        "tool_choice": echo_choice,
        "tools": [_tool_json(tool) for tool in tools],
        "top_p": top_p,
    }
    return options, echo


def _number(
    obj: Mapping[str, Any], name: str, low: float, high: float, *, low_open: bool
) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (low < value if low_open else low <= value)
        or not value <= high
    ):
        bound = f"greater than {low:g}" if low_open else f"from {low:g}"
        raise field_error(name, f"'{name}' must be a number {bound} up to {high:g}")
    return float(value)


def _tools(raw: Any) -> tuple[FunctionTool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise field_error("tools", "'tools' must be an array of function tools")
    tools: list[FunctionTool] = []
    for i, tool in enumerate(raw):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise field_error(
                "tools",
                f"tools[{i}]: only function tools are served by this gateway (got {kind!r})",
            )
        if not set(tool) <= _TOOL_KEYS:
            extra = ", ".join(sorted(set(tool) - _TOOL_KEYS))
            raise field_error("tools", f"tools[{i}]: unsupported fields: {extra}")
        strict = tool.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise field_error("tools", f"tools[{i}].strict must be a boolean")
        check_schema(tool.get("parameters"), "tools", f"tools[{i}].parameters")
        try:
            tools.append(
                FunctionTool(
                    name=tool.get("name"),
                    description=tool.get("description"),
                    parameters=tool.get("parameters"),
                    strict=bool(strict),
                )
            )
        except InvalidRequestError as exc:
            raise field_error("tools", f"tools[{i}]: {exc.message}") from None
    return distinct_tools(tools) or ()


def _tool_choice(raw: Any, tools: tuple[FunctionTool, ...]) -> tuple[ToolChoice | None, Any]:
    """(the library's choice, what the response echoes). Without tools, `auto` and
    `none` mean the same thing as no choice; anything forcing a call is refused."""
    if raw is None:
        return None, "auto"
    if raw in _MODES:
        if not tools:
            if raw == "required":
                raise field_error("tool_choice", "'tool_choice': 'required' needs 'tools'")
            return None, raw
        return raw, raw
    if not isinstance(raw, dict) or raw.get("type") != "function" or set(raw) != {"type", "name"}:
        raise field_error(
            "tool_choice",
            "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}",
        )
    name = raw["name"]
    if not isinstance(name, str) or name not in {tool.name for tool in tools}:
        raise field_error("tool_choice", f"'tool_choice' names {name!r}, which is not in 'tools'")
    return NamedToolChoice(name), {"type": "function", "name": name}


def _text(raw: Any) -> tuple[dict[str, Any], ResponseFormat | None]:
    """`text.format` as (what the response echoes, the structured output it asks for)."""
    if raw is None:
        return {"format": {"type": "text"}}, None
    if not isinstance(raw, dict) or not set(raw) <= {"format", "verbosity"}:
        raise field_error("text", "'text' must be an object with only 'format'")
    if raw.get("verbosity") is not None:
        raise field_error("text", "'text.verbosity' is not supported by this gateway")
    fmt = raw.get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or (kind == "text" and set(fmt) == {"type"}):
        return {"format": {"type": "text"}}, None
    if kind == "json_object" and set(fmt) == {"type"}:
        return {"format": {"type": "json_object"}}, ResponseFormat("json_object")
    if kind != "json_schema" or not set(fmt) <= {"type", "name", "schema", "strict", "description"}:
        raise field_error(
            "text",
            "'text.format' must be {'type': 'text'}, {'type': 'json_object'} or "
            "{'type': 'json_schema', 'name': ..., 'schema': {...}}",
        )
    name, schema = fmt.get("name"), fmt.get("schema")
    strict, description = fmt.get("strict"), fmt.get("description")
    if not isinstance(name, str) or not _NAME.match(name):
        raise field_error("text", "'text.format.name' must be 1-64 letters, digits, '_' or '-'")
    if not isinstance(schema, dict):
        raise field_error("text", "'text.format.schema' must be a JSON Schema object")
    check_schema(schema, "text", "'text.format.schema'")
    if strict is not None and not isinstance(strict, bool):
        raise field_error("text", "'text.format.strict' must be a boolean")
    if description is not None and not isinstance(description, str):
        raise field_error("text", "'text.format.description' must be a string")
    echo = {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}
    if description is not None:
        echo["description"] = description
    return {"format": echo}, ResponseFormat("json_schema", schema, name, description, bool(strict))


def _tool_json(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": dict(tool.parameters) if tool.parameters is not None else None,
        "strict": tool.strict,
    }
