"""The exact prompt token count of a request to a local target, for reserving tokens.

It tokenizes what the engine will: a query's prompt, a chat rendered by the model's own
chat template (tools included), each embedding input. That is CPU work, so it runs on a
worker thread, and only for requests some token limit covers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .._endpoint import TextRequest
from .._errors import SippError
from .request import GatewayRequest

if TYPE_CHECKING:  # the gateway loads the engine only when it serves a local target
    from ..local.endpoint import LocalEndpoint

__all__ = ["local_prompt_tokens"]

logger = logging.getLogger("sipp.gateway")


async def local_prompt_tokens(endpoint: LocalEndpoint, req: GatewayRequest) -> int | None:
    """The prompt's token count, or None when it cannot be rendered (the run itself will
    then refuse the request with the reason)."""
    try:
        return await asyncio.to_thread(_count, endpoint, req)
    except SippError:
        return None


def _count(endpoint: LocalEndpoint, req: GatewayRequest) -> int:
    with endpoint.model_in_use():
        return _tokens(endpoint, req)


def _tokens(endpoint: LocalEndpoint, req: GatewayRequest) -> int:
    model = endpoint.loaded.model
    if req.operation == "embed":
        return sum(
            len(model.tokenize(text, add_special=True, parse_special=False)) for text in req.inputs
        )
    if req.messages is None:
        assert req.prompt is not None
        return len(model.tokenize(req.prompt, add_special=True, parse_special=True))
    request = TextRequest("chat", None, req.messages, req.options, None, False)
    text, _ = endpoint.render_chat(request)
    template = endpoint.loaded.chat_template
    bos = template.bos_token if template is not None else None
    # as the engine does: no second BOS when the template wrote one
    add_special = not (bos and text.startswith(bos))
    return len(model.tokenize(text, add_special=add_special, parse_special=True))
