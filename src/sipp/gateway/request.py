"""The one request and the one event stream every wire format translates to and from.

A format decodes its body into a `GatewayRequest` (nothing runs until the whole
body is valid) and encodes a `Completion` or a stream of `TextDelta` /
`ChoiceDone` / `UsageTotal` events into its own bytes. Stages between the two
(authorize, admit, execute, settle) see only these types, never a wire format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from .._types import (
    ChatMessage,
    SippEmbeddingResponse,
    SippTextOptions,
    SippTextResponse,
    TokenBatch,
    Usage,
)

__all__ = [
    "PLAIN_GENERATION",
    "ChoiceDone",
    "Completion",
    "Event",
    "GatewayRequest",
    "Generation",
    "ImageURL",
    "Operation",
    "ResponseFormat",
    "TextDelta",
    "UsageTotal",
    "total_usage",
]

Operation = Literal["query", "chat", "embed"]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Structured output: any JSON object, or JSON matching `schema` (`name`,
    `description` and `strict` as the caller gave them, for targets that take them)."""

    type: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    description: str | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class Generation:
    """How to generate, beyond `SippTextOptions`: every field here either reaches the
    target or the request is refused naming it (see `target_options`)."""

    n: int = 1
    seed: int | None = None
    top_k: int | None = None
    logit_bias: Mapping[int, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


PLAIN_GENERATION = Generation()  # a body without any of the fields: shared, compared by identity


@dataclass(frozen=True, slots=True)
class ImageURL:
    """An http(s) image a chat message names: `index` is its place among the message's
    images. Only a target that lists the URL's host has it fetched (`image_fetch`)."""

    message: int
    index: int
    url: str


@dataclass(frozen=True, slots=True)
class GatewayRequest:
    """A decoded, validated public request.

    Exactly one of `prompt` (query), `messages` (chat) or `inputs` (embed) is set.
    `single_input` keeps a one-string embed a one-input upstream call; a list of
    inputs (even of one) goes to the target as a batch. `cost` is what the
    request takes from the caller's rate limit (one per embedding input).
    """

    operation: Operation
    target: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    inputs: tuple[str, ...] = ()
    single_input: bool = False
    options: SippTextOptions = field(default_factory=SippTextOptions)
    stream: bool = False
    include_usage: bool = False
    cost: int = 1
    generation: Generation = PLAIN_GENERATION
    image_urls: tuple[ImageURL, ...] = ()  # images still to fetch into `messages`
    # Caller attribution: recorded in the gateway's log, never forwarded to a target.
    user: str | None = None
    metadata: Mapping[str, str] | None = None
    # What the format asks of the encoder but the stages never read (e.g. an
    # embeddings encoding); kept here so a format's decode and encode stay paired.
    wire: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished non-streamed request: one text response per choice, or embeddings."""

    choices: tuple[SippTextResponse, ...] = ()
    embeddings: tuple[SippEmbeddingResponse, ...] = ()

    @property
    def usage(self) -> Usage | None:
        return total_usage(self.choices)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """What choice `index` produced since its previous delta (whole UTF-8 characters)."""

    batch: TokenBatch
    index: int = 0


@dataclass(frozen=True, slots=True)
class ChoiceDone:
    """Choice `index` ended; `response` is its whole result (finish reason, usage)."""

    response: SippTextResponse
    index: int = 0


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """The last event of a successful stream: token counts over every choice."""

    usage: Usage | None


Event: TypeAlias = TextDelta | ChoiceDone | UsageTotal


def total_usage(choices: Sequence[SippTextResponse]) -> Usage | None:
    """Token counts over the choices of one request (None if the target reported none)."""
    usages = [c.usage for c in choices if c.usage is not None]
    if not usages:
        return None
    if len(usages) == 1:
        return usages[0]
    # n choices of one prompt: the prompt counts once, as OpenAI reports it.
    output = sum(u.output_tokens for u in usages)
    return Usage(usages[0].input_tokens, output, usages[0].input_tokens + output)
