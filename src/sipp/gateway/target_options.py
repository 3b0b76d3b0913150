"""How a request's generation fields reach each kind of target, or why they cannot.

Local targets get them as llama.cpp sampling and grammar options; OpenAI and
OpenAI-compatible targets get them in their own wire spelling; a field a target
cannot honour is refused with a 400 naming the field and the target, never
dropped. `user` and `metadata` stay in the gateway (see `call`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import InvalidRequestError
from .._runtime_config import SamplingRuntimeConfig
from .._types import LocalTextOptions
from .config import LocalTarget, ProviderTarget
from .request import PLAIN_GENERATION, GatewayRequest, Generation

__all__ = ["TargetArgs", "target_args"]

# llama.cpp seeds are 32-bit and 0xFFFFFFFF means "pick one at random".
_LOCAL_SEEDS = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TargetArgs:
    """The library call's extra arguments for one choice of a request."""

    local: LocalTextOptions | None = None
    provider_options: Mapping[str, Any] | None = None


NO_ARGS = TargetArgs()


def target_args(
    req: GatewayRequest, target: LocalTarget | ProviderTarget, choice: int = 0
) -> TargetArgs:
    """Arguments for choice `choice` of `req` on `target`. Choices differ only in their
    seed, so `n` samples of one seeded request are distinct and each reproducible."""
    gen = req.generation
    if gen is PLAIN_GENERATION or gen == PLAIN_GENERATION:
        return NO_ARGS
    if isinstance(target, LocalTarget):
        return _local(gen, choice)
    if target.type == "anthropic":
        _refuse(gen, target, ("seed", "logit_bias", "presence_penalty", "frequency_penalty"))
        _refuse(gen, target, ("logprobs",))
        return TargetArgs(provider_options=_anthropic_fields(gen) or None)
    _refuse(gen, target, ("logprobs", "top_k"))
    return TargetArgs(provider_options=_openai_fields(gen, choice) or None)


def _local(gen: Generation, choice: int) -> TargetArgs:
    sampling_fields: dict[str, Any] = {}
    if gen.seed is not None:
        sampling_fields["seed"] = (gen.seed + choice) % _LOCAL_SEEDS
    if gen.top_k is not None:
        sampling_fields["top_k"] = gen.top_k
    if gen.logit_bias:
        sampling_fields["logit_bias"] = gen.logit_bias
    if gen.presence_penalty:
        sampling_fields["presence_penalty"] = gen.presence_penalty
    if gen.frequency_penalty:
        sampling_fields["frequency_penalty"] = gen.frequency_penalty
    schema: Mapping[str, Any] | None = None
    if gen.response_format is not None:
        schema = gen.response_format.schema or {"type": "object"}
    sampling = SamplingRuntimeConfig(**sampling_fields) if sampling_fields else None
    if sampling is None and schema is None and not gen.logprobs:
        return NO_ARGS
    local = LocalTextOptions(
        sampling=sampling,
        json_schema=schema,
        logprobs=gen.logprobs or None,
        top_logprobs=gen.top_logprobs if gen.logprobs else None,
    )
    return TargetArgs(local=local)


def _openai_fields(gen: Generation, choice: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if gen.seed is not None:  # choice i samples with seed + i, wrapped into int64
        out["seed"] = (gen.seed + choice + 2**63) % 2**64 - 2**63
    if gen.logit_bias:
        out["logit_bias"] = {str(token): bias for token, bias in gen.logit_bias.items()}
    if gen.presence_penalty is not None:
        out["presence_penalty"] = gen.presence_penalty
    if gen.frequency_penalty is not None:
        out["frequency_penalty"] = gen.frequency_penalty
    fmt = gen.response_format
    if fmt is not None and fmt.type == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif fmt is not None:
        spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema or {}}
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict:
            spec["strict"] = True
        out["response_format"] = {"type": "json_schema", "json_schema": spec}
    return out


def _anthropic_fields(gen: Generation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if gen.top_k is not None:
        out["top_k"] = gen.top_k
    if gen.response_format is not None:  # Anthropic's structured outputs take a schema
        schema = gen.response_format.schema or {"type": "object"}
        out["output_config"] = {"format": {"type": "json_schema", "schema": dict(schema)}}
    return out


def _refuse(gen: Generation, target: ProviderTarget, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(gen, name)
        if value not in (None, False):
            raise InvalidRequestError(
                f"'{name}' is not supported by target '{target.name}' "
                f"({target.type} provider targets cannot honour it)",
                field=name,
            )
