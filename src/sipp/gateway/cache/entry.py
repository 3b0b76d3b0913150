"""What a cache entry holds, and its bytes.

An entry is one answer: per choice, the whole response (text, finish reason, usage,
tool calls, logprobs) and, when it was streamed, the deltas it was streamed in, so a
replay streams the same pieces. An answer that was not streamed is replayed in pieces
cut from its text (one per token when logprobs give the tokens, else one per word)
and one delta per tool call: never one blob.

A `SemanticRecord` is what the semantic cache keeps of an entry (its partition, last
user message, embedding model id and vector); the store writes it with the entry and
drops it with the entry, so the semantic index can be rebuilt from the store alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..._types import (
    FinishReason,
    SippTextResponse,
    TokenBatch,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from ..request import ChoiceDone, Event, TextDelta, UsageTotal, total_usage

__all__ = [
    "CachedChoice",
    "CachedEntry",
    "SemanticRecord",
    "decode_entry",
    "decode_record",
    "encode_entry",
    "encode_record",
    "replay_events",
]

FORMAT = 1  # bumped when the layout changes: older entries then read as misses
_WORD = re.compile(r"\s*\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class CachedChoice:
    response: SippTextResponse
    deltas: tuple[TokenBatch, ...] = ()  # as streamed; empty when it was not


@dataclass(frozen=True, slots=True)
class CachedEntry:
    choices: tuple[CachedChoice, ...]

    @property
    def responses(self) -> tuple[SippTextResponse, ...]:
        return tuple(c.response for c in self.choices)

    @property
    def usage(self) -> Usage | None:
        return total_usage(self.responses)


@dataclass(frozen=True, slots=True)
class SemanticRecord:
    """One entry's question for the semantic index."""

    partition: str
    text: str
    model: str  # the embedding model's id: vectors of two models are never compared
    vector: npt.NDArray[np.float32]

    def vector_bytes(self) -> bytes:
        return np.ascontiguousarray(self.vector, dtype="<f4").tobytes()


def replay_events(entry: CachedEntry) -> Iterator[Event]:
    """The events a live run of `entry`'s answer produced: each choice's deltas, its
    end, then the total usage (choices one after another: no need to interleave)."""
    for index, choice in enumerate(entry.choices):
        for batch in choice.deltas or _pieces(choice.response):
            yield TextDelta(batch, index)
        yield ChoiceDone(choice.response, index)
    yield UsageTotal(entry.usage)


def _pieces(response: SippTextResponse) -> list[TokenBatch]:
    logprobs = response.logprobs or ()
    if logprobs and "".join(lp.token for lp in logprobs) == response.text:
        pieces = [TokenBatch(lp.token, logprobs=(lp,)) for lp in logprobs]
    else:
        pieces = [TokenBatch(word) for word in _WORD.findall(response.text)]
    for i, call in enumerate(response.tool_calls):
        pieces.append(TokenBatch("", tool_calls=(ToolCallDelta(i, call.id, call.name),)))
        if call.arguments:
            pieces.append(TokenBatch("", tool_calls=(ToolCallDelta(i, arguments=call.arguments),)))
    return [replace(piece, sequence=i) for i, piece in enumerate(pieces)]


# ------------------------------------------------------------------ bytes
def encode_entry(entry: CachedEntry) -> bytes:
    data = {"v": FORMAT, "choices": [_choice(c) for c in entry.choices]}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_record(record: SemanticRecord) -> bytes:
    """A JSON line (partition, text, model) then the vector's little-endian float32s."""
    head = {"v": FORMAT, "p": record.partition, "t": record.text, "m": record.model}
    line = json.dumps(head, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return line + b"\n" + record.vector_bytes()


def decode_record(raw: bytes) -> SemanticRecord | None:
    """The record, or None when `raw` is of another layout version or is malformed (a
    record the index cannot use is skipped, never fatal)."""
    line, sep, vector = raw.partition(b"\n")
    try:
        head = json.loads(line)
        if not sep or head.get("v") != FORMAT or not vector or len(vector) % 4:
            return None
        return SemanticRecord(str(head["p"]), str(head["t"]), str(head["m"]), vector_from(vector))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def vector_from(raw: bytes) -> npt.NDArray[np.float32]:
    """A vector stored by `SemanticRecord.vector_bytes`."""
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def decode_entry(raw: bytes) -> CachedEntry | None:
    """The entry, or None when `raw` is of another layout version (a miss, not an error)."""
    data = json.loads(raw)
    if data.get("v") != FORMAT:
        return None
    return CachedEntry(tuple(_read_choice(c) for c in data["choices"]))


def _choice(choice: CachedChoice) -> dict[str, Any]:
    r = choice.response
    out: dict[str, Any] = {"text": r.text, "finish": r.finish_reason}
    if r.usage is not None:
        out["usage"] = [r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens]
    if r.tool_calls:
        out["calls"] = [[c.id, c.name, c.arguments] for c in r.tool_calls]
    if r.logprobs is not None:
        out["logprobs"] = [_logprob(lp) for lp in r.logprobs]
    if r.stop_sequence is not None:
        out["stop_sequence"] = r.stop_sequence
    if choice.deltas:
        out["deltas"] = [_batch(b) for b in choice.deltas]
    return out


def _batch(b: TokenBatch) -> dict[str, Any]:
    out: dict[str, Any] = {"t": b.text}
    if b.token_ids:
        out["ids"] = list(b.token_ids)
    if b.sequence:
        out["s"] = b.sequence
    if b.logprobs:
        out["lp"] = [_logprob(lp) for lp in b.logprobs]
    if b.tool_calls:
        out["calls"] = [[d.index, d.id, d.name, d.arguments] for d in b.tool_calls]
    return out


def _logprob(lp: TokenLogprob) -> list[Any]:
    return [
        lp.token,
        list(lp.bytes),
        lp.logprob,
        [[t.token, list(t.bytes), t.logprob] for t in lp.top],
    ]


def _read_logprob(raw: Sequence[Any]) -> TokenLogprob:
    top = tuple(TopLogprob(t[0], tuple(t[1]), t[2]) for t in raw[3])
    return TokenLogprob(raw[0], tuple(raw[1]), raw[2], top)


def _read_choice(raw: dict[str, Any]) -> CachedChoice:
    usage = Usage(*raw["usage"]) if "usage" in raw else None
    logprobs = raw.get("logprobs")
    response = SippTextResponse(
        raw["text"],
        cast(FinishReason, raw["finish"]),
        usage,
        None,  # local stats describe a generation that a replay did not run
        tuple(_read_logprob(lp) for lp in logprobs) if logprobs is not None else None,
        tuple(ToolCall(*c) for c in raw.get("calls", ())),
        raw.get("stop_sequence"),
    )
    deltas = tuple(
        TokenBatch(
            d["t"],
            tuple(d.get("ids", ())),
            d.get("s", 0),
            tuple(_read_logprob(lp) for lp in d.get("lp", ())),
            tuple(ToolCallDelta(*c) for c in d.get("calls", ())),
        )
        for d in raw.get("deltas", ())
    )
    return CachedChoice(response, deltas)
