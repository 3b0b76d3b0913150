"""OpenAI's generation fields (`seed`, `n`, penalties, `logit_bias`, `logprobs`,
`response_format`, `user`, `metadata`, `store`), validated as OpenAI documents them.

Each bad value is refused with a 400 naming the field (`param` in the envelope),
before anything runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..request import PLAIN_GENERATION, Generation, ResponseFormat
from .base import check_schema, field_error

__all__ = ["MAX_N", "attribution", "generation"]

MAX_N = 16  # choices per request: each is a sequence on the target
_MAX_LOGIT_BIAS = 300  # entries (OpenAI's own cap)
_MAX_TOP_LOGPROBS = 20
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOKEN_ID = re.compile(r"[0-9]{1,9}")  # ASCII digits: str.isdigit() also takes "²"
_MAX_USER = 256
_MAX_METADATA = 16


_GENERATION_FIELDS = frozenset(
    {
        "n",
        "seed",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "response_format",
    }
)


def generation(obj: Mapping[str, Any], *, chat: bool) -> Generation:
    """The generation fields of a chat (or legacy completions) body."""
    if _GENERATION_FIELDS.isdisjoint(obj):  # the common case costs one set test
        return PLAIN_GENERATION
    n = _integer(obj, "n", 1, MAX_N, default=None) or 1
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise field_error("seed", "'seed' must be an integer")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise field_error("seed", "'seed' is out of range (a signed 64-bit integer)")
    if chat:
        logprobs = obj.get("logprobs", False)
        if logprobs is None:
            logprobs = False
        if not isinstance(logprobs, bool):
            raise field_error("logprobs", "'logprobs' must be true or false")
        top = _integer(obj, "top_logprobs", 0, _MAX_TOP_LOGPROBS, default=None)
        if top is not None and not logprobs:
            raise field_error("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    else:  # the legacy completions API: `logprobs` is how many alternatives to return
        top = _integer(obj, "logprobs", 0, 5, default=None)
        logprobs = top is not None
    return Generation(
        n=n,
        seed=seed,
        logit_bias=_logit_bias(obj.get("logit_bias")),
        presence_penalty=_penalty(obj, "presence_penalty"),
        frequency_penalty=_penalty(obj, "frequency_penalty"),
        response_format=_response_format(obj.get("response_format")) if chat else None,
        logprobs=logprobs,
        top_logprobs=top,
    )


def attribution(obj: Mapping[str, Any]) -> tuple[str | None, Mapping[str, str] | None]:
    """(`user`, `metadata`): recorded by the gateway, never forwarded to a target."""
    user = obj.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > _MAX_USER):
        raise field_error("user", f"'user' must be a string of at most {_MAX_USER} characters")
    metadata = obj.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict) or len(metadata) > _MAX_METADATA:
            raise field_error(
                "metadata", f"'metadata' must be an object of at most {_MAX_METADATA} pairs"
            )
        for key, value in metadata.items():
            if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
                raise field_error(
                    "metadata",
                    "'metadata' keys are strings of at most 64 characters and values "
                    "strings of at most 512",
                )
    store = obj.get("store")
    if store is not None and not isinstance(store, bool):
        raise field_error("store", "'store' must be true or false")
    if store:
        raise field_error("store", "this gateway does not store completions; send 'store': false")
    return user, metadata


def _integer(
    obj: Mapping[str, Any], name: str, low: int, high: int, *, default: int | None
) -> int | None:
    value = obj.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise field_error(name, f"'{name}' must be an integer from {low} to {high}")
    return value


def _penalty(obj: Mapping[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not -2.0 <= value <= 2.0
    ):
        raise field_error(name, f"'{name}' must be a number from -2 to 2")
    return float(value)


def _logit_bias(raw: Any) -> Mapping[int, float] | None:
    if raw is None:
        return None
    message = "'logit_bias' must map token ids (integer strings) to numbers from -100 to 100"
    if not isinstance(raw, dict) or len(raw) > _MAX_LOGIT_BIAS:
        raise field_error("logit_bias", message)
    out: dict[int, float] = {}
    for key, bias in raw.items():
        if not _TOKEN_ID.fullmatch(key):
            raise field_error("logit_bias", message)
        if (
            isinstance(bias, bool)
            or not isinstance(bias, (int, float))
            or not math.isfinite(bias)
            or not -100 <= bias <= 100
        ):
            raise field_error("logit_bias", message)
        out[int(key)] = float(bias)
    return out or None


def _response_format(raw: Any) -> ResponseFormat | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text" and set(raw) == {"type"}:
        return None
    if kind == "json_object" and set(raw) == {"type"}:
        return ResponseFormat("json_object")
    if kind != "json_schema" or not set(raw) <= {"type", "json_schema"}:
        raise field_error(
            "response_format",
            "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or "
            "{'type': 'json_schema', 'json_schema': {...}}",
        )
    spec = raw.get("json_schema")
    if not isinstance(spec, dict) or not set(spec) <= {"name", "description", "schema", "strict"}:
        raise field_error(
            "response_format",
            "'response_format.json_schema' must be an object with 'name' and optionally "
            "'description', 'schema' and 'strict'",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise field_error(
            "response_format",
            "'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
        )
    schema = spec.get("schema", {})
    check_schema(schema, "response_format", "'response_format.json_schema.schema'")
    if not isinstance(schema, dict):
        raise field_error(
            "response_format", "'response_format.json_schema.schema' must be an object"
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise field_error(
            "response_format", "'response_format.json_schema.strict' must be a boolean"
        )
    description = spec.get("description")
    if description is not None and not isinstance(description, str):
        raise field_error(
            "response_format", "'response_format.json_schema.description' must be a string"
        )
    return ResponseFormat("json_schema", schema, name, description, bool(strict))
