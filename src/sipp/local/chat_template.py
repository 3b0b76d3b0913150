"""Render a GGUF's own `tokenizer.chat_template` in a sandboxed Jinja2 environment.

The template is data that came with a model file, so it runs sandboxed and
immutable: it can format messages but not reach Python objects or mutate its
inputs. The environment mirrors the conventions model authors write against
(`trim_blocks`, `lstrip_blocks`, `raise_exception`, `tojson`, `strftime_now`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .._errors import InvalidRequestError, UnsupportedOperationError
from .._types import ChatMessage

__all__ = ["ChatTemplate"]


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


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

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        if not messages:
            raise InvalidRequestError("chat needs at least one message")
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
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
