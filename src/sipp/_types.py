"""Request options and responses shared by every endpoint kind.

Everything here is a frozen dataclass validated in `__post_init__`, so a bad
value fails where the caller wrote it, with a typed `InvalidRequestError`.
Responses also read like mappings (`response["text"]`) because the spec's
examples index them that way.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

from ._errors import InvalidRequestError, PayloadTooLargeError

if TYPE_CHECKING:  # for the annotation only: at run time _types imports no other layer
    from ._runtime_config import SamplingRuntimeConfig

__all__ = [
    "MAX_IMAGE_BYTES",
    "MEDIA_MARKER",
    "ChatMessage",
    "ChatRole",
    "FinishReason",
    "FunctionTool",
    "ImageLike",
    "LocalEmbedOptions",
    "LocalStats",
    "LocalTextOptions",
    "MessageLike",
    "NamedToolChoice",
    "SippEmbeddingResponse",
    "SippTextOptions",
    "SippTextResponse",
    "TokenBatch",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolChoiceMode",
    "TopLogprob",
    "Usage",
    "decode_image_data_url",
]

ChatRole = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
ToolChoiceMode = Literal["auto", "none", "required"]
_ROLES: frozenset[str] = frozenset(("system", "user", "assistant", "tool"))
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOP_LOGPROBS = 20  # OpenAI's bound


class _ReadsLikeMapping:
    """`obj["field"]`, `obj.get`, `keys()` and `to_dict()` over dataclass fields."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._field_names() else default

    def keys(self) -> list[str]:
        return list(self._field_names())

    def __contains__(self, key: object) -> bool:
        return key in self._field_names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._field_names())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._field_names():
            value = getattr(self, name)
            if isinstance(value, _ReadsLikeMapping):
                value = value.to_dict()
            elif isinstance(value, tuple) and value and isinstance(value[0], _ReadsLikeMapping):
                value = [v.to_dict() for v in value]
            out[name] = value
        return out

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ToolCall(_ReadsLikeMapping):
    """A function call the model asked for. `arguments` is JSON text, as OpenAI carries
    it: a constrained local call always parses, a provider's usually does."""

    id: str
    name: str
    arguments: str

    def __post_init__(self) -> None:
        for name in ("id", "name", "arguments"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"ToolCall.{name} must be a string")
        if not self.id or not self.name:
            raise InvalidRequestError("ToolCall.id and ToolCall.name must not be empty")

    @classmethod
    def coerce(cls, call: ToolCall | Mapping[str, Any]) -> ToolCall:
        """Accept a `ToolCall` or a `{"id", "name", "arguments"}` mapping."""
        if isinstance(call, ToolCall):
            return call
        if isinstance(call, Mapping) and set(call) == {"id", "name", "arguments"}:
            return cls(call["id"], call["name"], call["arguments"])
        raise InvalidRequestError(
            "a tool call must be a ToolCall or a mapping with exactly id, name and arguments"
        )


@dataclass(frozen=True)
class ToolCallDelta(_ReadsLikeMapping):
    """A piece of tool call `index` of a streamed response: its `id` and `name` come in
    the call's first delta, then `arguments` fragments that concatenate to its JSON."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True, kw_only=True)
class FunctionTool(_ReadsLikeMapping):
    """A function the model may call: `parameters` is the JSON Schema of its arguments."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _TOOL_NAME.match(self.name):
            raise InvalidRequestError(
                f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'"
            )
        if self.description is not None and not isinstance(self.description, str):
            raise InvalidRequestError(f"tool {self.name!r}: description must be a string")
        if self.parameters is not None and not isinstance(self.parameters, Mapping):
            raise InvalidRequestError(
                f"tool {self.name!r}: parameters must be a JSON Schema mapping"
            )
        if not isinstance(self.strict, bool):
            raise InvalidRequestError(f"tool {self.name!r}: strict must be a bool")


@dataclass(frozen=True)
class NamedToolChoice(_ReadsLikeMapping):
    """`tool_choice` that makes the model call this one function."""

    name: str


ToolChoice: TypeAlias = ToolChoiceMode | NamedToolChoice


# An image for a vision model: a file path, the encoded file's bytes (JPEG, PNG, WebP),
# or a `data:image/...;base64,...` URL. Local endpoints only (with a projector).
ImageLike: TypeAlias = "str | bytes | os.PathLike[str]"


# llama.cpp's multimodal marker: where an image goes in a message's text.
MEDIA_MARKER = "<__media__>"
MAX_IMAGE_BYTES = 20 << 20  # one encoded image
_DATA_URL = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?(;[^,;]+=[^,;]*)*;base64,", re.IGNORECASE)


def decode_image_data_url(
    url: str, field: str = "images", max_bytes: int = MAX_IMAGE_BYTES
) -> bytes:
    """The bytes of a base64 `data:` URL, refused unread when its length says it is too big."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequestError(
            "an image data URL must look like data:image/png;base64,...", field=field
        )
    payload = url[match.end() :]
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise PayloadTooLargeError(f"image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("an image data URL holds invalid base64", field=field) from None


def coerce_images(value: Any, where: str) -> tuple[str | bytes | os.PathLike[str], ...]:
    """`value` as a tuple of images, each checked for its type (read and decoded later)."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, bytearray, os.PathLike)):
        value = (value,)
    if isinstance(value, Mapping) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{where} must be a list of images", field=where)
    out: list[str | bytes | os.PathLike[str]] = []
    for item in value:
        if isinstance(item, bytearray):
            item = bytes(item)
        if isinstance(item, (str, bytes)) and not item:
            raise InvalidRequestError(f"{where}: an image must not be empty", field=where)
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise InvalidRequestError(
                f"{where}: an image is a file path, bytes or a data URL, got {type(item).__name__}",
                field=where,
            )
        out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class ChatMessage(_ReadsLikeMapping):
    """One conversation turn: `ChatMessage("user", "Hello")`.

    An assistant turn that called tools carries them in `tool_calls` (its `content` may
    be empty); each result comes back as a `tool` turn naming the call it answers in
    `tool_call_id`. `images` (file paths, encoded bytes or data URLs) go to a local
    vision model: each takes the place of a media marker (`<__media__>`) in `content`,
    or, without markers, comes before the text."""

    role: ChatRole
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    images: tuple[ImageLike, ...] = ()

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise InvalidRequestError(
                f"unknown chat role {self.role!r}; valid roles are system, user, assistant, tool"
            )
        if not isinstance(self.content, str):
            raise InvalidRequestError(
                f"chat message content must be a string, got {type(self.content).__name__}"
            )
        if self.tool_calls:
            if self.role != "assistant":
                raise InvalidRequestError("only assistant messages carry tool_calls")
            object.__setattr__(
                self, "tool_calls", tuple(ToolCall.coerce(c) for c in self.tool_calls)
            )
        if self.role == "tool":
            if not isinstance(self.tool_call_id, str) or not self.tool_call_id:
                raise InvalidRequestError("a tool message needs the tool_call_id it answers")
        elif self.tool_call_id is not None:
            raise InvalidRequestError("only tool messages carry a tool_call_id")
        object.__setattr__(self, "images", coerce_images(self.images, "images"))

    @classmethod
    def coerce(cls, message: MessageLike) -> ChatMessage:
        """Accept a `ChatMessage` or a mapping with `role` and `content` (and optionally
        `tool_calls`, `tool_call_id` or `images`)."""
        if isinstance(message, ChatMessage):
            return message
        if isinstance(message, Mapping):
            extra = set(message) - {"role", "content", "tool_calls", "tool_call_id", "images"}
            if extra or "role" not in message or "content" not in message:
                raise InvalidRequestError(
                    "a chat message mapping needs the keys 'role' and 'content' "
                    "(and optionally 'tool_calls', 'tool_call_id' or 'images')"
                )
            calls = message.get("tool_calls") or ()
            if isinstance(calls, (str, bytes, Mapping)) or not isinstance(calls, Sequence):
                raise InvalidRequestError("tool_calls must be a list of tool calls")
            return cls(
                cast(ChatRole, message["role"]),
                message["content"],
                tuple(ToolCall.coerce(c) for c in calls),
                message.get("tool_call_id"),
                coerce_images(message.get("images"), "images"),
            )
        raise InvalidRequestError(
            f"a chat message must be a ChatMessage or a mapping, got {type(message).__name__}"
        )


MessageLike: TypeAlias = ChatMessage | Mapping[str, Any]


def real_number(value: object) -> float | None:
    """`value` as a float when it is a real number: not a bool, not NaN, and not an int
    too large for a float (math.isnan and float() raise OverflowError on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return None if math.isnan(number) else number


def not_unicode(exc: UnicodeEncodeError, where: str) -> InvalidRequestError:
    """The refusal of text UTF-8 cannot encode: a lone surrogate, which a JSON escape or
    a Python str can hold."""
    return InvalidRequestError(
        f"{where} holds {exc.object[exc.start : exc.end]!r}, which is not valid Unicode "
        "(a lone surrogate)"
    )


def shown(value: object) -> str:
    """`value` for an error message: short, and never the 4,300-digit int whose str()
    itself raises."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_probability(name: str, value: float | None, *, allow_zero: bool) -> None:
    if value is None:
        return
    if real_number(value) is None:
        raise InvalidRequestError(f"{name} must be a number, got {shown(value)}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not low_ok or value > 1:
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise InvalidRequestError(f"{name} must be in {bound}, got {value}")


def check_temperature(name: str, value: float | None) -> None:
    if value is None:
        return
    if real_number(value) is None:
        raise InvalidRequestError(f"{name} must be a number, got {shown(value)}")
    if value < 0 or math.isinf(value):
        raise InvalidRequestError(f"{name} must be >= 0 and finite, got {value}")


def check_count(name: str, value: int | None, *, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {shown(value)}")
    if value < minimum:
        raise InvalidRequestError(f"{name} must be >= {minimum}, got {shown(value)}")


@dataclass(frozen=True, kw_only=True)
class SippTextOptions:
    """Generation options every endpoint kind understands."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] | None = None
    tools: Sequence[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def __post_init__(self) -> None:
        _check_tools(self)
        check_count("max_tokens", self.max_tokens, minimum=1)
        check_temperature("temperature", self.temperature)
        _check_probability("top_p", self.top_p, allow_zero=False)
        if self.stop is not None:
            if isinstance(self.stop, str):
                object.__setattr__(self, "stop", (self.stop,))
            stops = tuple(self.stop)
            if any(not isinstance(s, str) or s == "" for s in stops):
                raise InvalidRequestError("stop must be a list of non-empty strings")
            object.__setattr__(self, "stop", stops)


def _check_tools(options: SippTextOptions) -> None:
    """`tools` as a tuple of distinct functions; `tool_choice` and `parallel_tool_calls`
    only with tools, and a named choice only of one of them."""
    tools = options.tools
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise InvalidRequestError("tools must be a list of FunctionTool")
        if not all(isinstance(t, FunctionTool) for t in tools):
            raise InvalidRequestError("tools must be a list of FunctionTool")
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise InvalidRequestError("tool names must be distinct")
        object.__setattr__(options, "tools", tuple(tools) or None)
    choice = options.tool_choice
    if choice is not None:
        if not options.tools:
            raise InvalidRequestError("tool_choice needs tools")
        if isinstance(choice, NamedToolChoice):
            if choice.name not in {t.name for t in options.tools}:
                raise InvalidRequestError(f"tool_choice names {choice.name!r}, which is not a tool")
        elif choice not in ("auto", "none", "required"):
            raise InvalidRequestError(
                "tool_choice must be 'auto', 'none', 'required' or a NamedToolChoice"
            )
    if options.parallel_tool_calls is not None:
        if not isinstance(options.parallel_tool_calls, bool):
            raise InvalidRequestError("parallel_tool_calls must be a bool")
        if not options.tools:
            raise InvalidRequestError("parallel_tool_calls needs tools")


@dataclass(frozen=True, kw_only=True)
class LocalTextOptions:
    """Options only a local endpoint understands; gateway endpoints reject them.

    `sampling` overrides the endpoint's load-time `SamplingRuntimeConfig` for
    this one request (same fields, e.g. `seed`, `top_k`, `min_p`).
    `json_schema` is a JSON Schema mapping; the output is constrained to match.
    `logprobs=True` reports each generated token's log probability, and
    `top_logprobs=k` (0..20, needs `logprobs=True`) the k likeliest tokens at each step.
    `media` are images (file paths, encoded bytes or data URLs) for the last user
    message of a chat, after that message's own `images`; they need a vision projector.
    """

    context_key: str | None = None
    grammar: str | None = None
    json_schema: Mapping[str, Any] | None = None
    sampling: SamplingRuntimeConfig | None = None  # checked by the local endpoint
    media: Sequence[ImageLike] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.context_key is not None and (
            not isinstance(self.context_key, str) or not self.context_key
        ):
            raise InvalidRequestError("context_key must be a non-empty string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise InvalidRequestError("grammar must be a GBNF string")
        if self.grammar is not None and self.json_schema is not None:
            raise InvalidRequestError("set either grammar or json_schema, not both")
        if self.json_schema is not None and not isinstance(self.json_schema, Mapping):
            raise InvalidRequestError("json_schema must be a mapping (a parsed JSON Schema)")
        if self.media is not None:
            object.__setattr__(self, "media", coerce_images(self.media, "media") or None)
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise InvalidRequestError(f"logprobs must be a bool, got {self.logprobs!r}")
        check_count("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs is not None:
            if self.top_logprobs > MAX_TOP_LOGPROBS:
                raise InvalidRequestError(
                    f"top_logprobs must be <= {MAX_TOP_LOGPROBS}, got {shown(self.top_logprobs)}"
                )
            if self.logprobs is not True:
                raise InvalidRequestError("top_logprobs needs logprobs=True")


@dataclass(frozen=True, kw_only=True)
class LocalEmbedOptions:
    """Local embedding options: `normalize=True` scales the vector to unit L2 norm.
    `context_key` keeps the endpoint's results for that key: the same input embedded
    again under the same key is answered from memory, without running the model."""

    context_key: str | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.context_key is not None and (
            not isinstance(self.context_key, str) or not self.context_key
        ):
            raise InvalidRequestError("context_key must be a non-empty string")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize must be a bool")


@dataclass(frozen=True)
class TopLogprob(_ReadsLikeMapping):
    """One candidate token at a step: its text piece, raw bytes and log probability."""

    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob(_ReadsLikeMapping):
    """A generated token's log probability under the model (before penalties, grammar
    and temperature); `top` holds the likeliest tokens at that step, best first."""

    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenBatch(_ReadsLikeMapping):
    """Text produced since the previous batch. `text` is always whole UTF-8 characters.

    `token_ids` are the tokens whose text this batch releases (a token whose bytes
    were held back, e.g. half a character, arrives with the batch that releases
    them); `logprobs` has one entry per token id when the request asked for them."""

    text: str
    token_ids: tuple[int, ...] = ()
    sequence: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class Usage(_ReadsLikeMapping):
    input_tokens: int
    output_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class LocalStats(_ReadsLikeMapping):
    """Timing of one local request. `tokens_per_second` is decode throughput."""

    prompt_tokens: int
    cached_prompt_tokens: int
    generated_tokens: int
    prefill_ms: float
    decode_ms: float
    tokens_per_second: float
    queue_ms: float = 0.0


@dataclass(frozen=True)
class SippTextResponse(_ReadsLikeMapping):
    """A finished text run. When the model called tools, `tool_calls` holds them (in
    order) and `finish_reason` is `tool_calls`; `text` is whatever it said besides.
    `stop_sequence` is the stop string that ended the text, when the endpoint says
    which (local models and Anthropic do; OpenAI does not)."""

    text: str
    finish_reason: FinishReason
    usage: Usage | None = None
    local_stats: LocalStats | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None  # only when requested
    tool_calls: tuple[ToolCall, ...] = ()
    stop_sequence: str | None = None


@dataclass(frozen=True)
class SippEmbeddingResponse(_ReadsLikeMapping):
    """One embedding. With pooling `none`, `values` holds every token's vector
    back to back (`len(values) == token_count * dimensions`)."""

    values: list[float]
    pooling: str
    normalized: bool
    dimensions: int
    usage: Usage | None = None
    token_count: int = field(default=1)
