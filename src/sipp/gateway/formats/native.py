"""The first-party gateway profile (`/v1/query`, `/v1/chat`, `/v1/embed`) as a wire format.

Bodies are decoded and responses encoded by `sipp.protocol`, the same pure
functions a custom route uses; errors are the profile's envelope, and a stream
that fails after it started ends with one `event: error` frame.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from ... import protocol
from ..._errors import SippError
from ...protocol.streaming import SSE_HEADERS
from ..config import GatewayConfig
from ..request import ChoiceDone, Completion, Event, GatewayRequest, Operation, TextDelta
from .base import BearerFormat, error_response

__all__ = ["NativeFormat"]


class NativeFormat(BearerFormat):
    stream_headers = SSE_HEADERS

    def __init__(self, operation: Operation) -> None:
        self.operation = operation

    def decode(self, body: bytes, headers: Headers, config: GatewayConfig) -> GatewayRequest:
        if self.operation == "embed":
            embed = protocol.decode_embed_body(body)
            return GatewayRequest("embed", embed.target, inputs=(embed.input,), single_input=True)
        decode = (
            protocol.decode_query_body if self.operation == "query" else protocol.decode_chat_body
        )
        req = decode(body)
        return GatewayRequest(
            req.operation,
            req.target,
            prompt=req.prompt,
            messages=req.messages,
            options=req.options,
            stream=req.stream,
        )

    def encode(self, request: GatewayRequest, done: Completion, request_id: str) -> Response:
        if request.operation == "embed":
            body = protocol.embedding_response_body(
                request.target, done.embeddings[0], id=request_id
            )
        else:
            body = protocol.text_response_body(request.target, done.choices[0], id=request_id)
        return JSONResponse(body, headers={"x-request-id": request_id})

    async def encode_stream(
        self, request: GatewayRequest, events: AsyncIterator[Event], request_id: str
    ) -> AsyncIterator[bytes]:
        async for event in events:
            if isinstance(event, TextDelta):
                yield protocol.token_frame(event.batch)
            elif isinstance(event, ChoiceDone):
                response = event.response
                if response.usage is not None:
                    yield protocol.usage_frame(response.usage)
                yield protocol.done_frame(response.finish_reason)

    def stream_error(self, exc: SippError) -> bytes:
        return protocol.error_frame(exc)

    def error(self, exc: SippError, request_id: str) -> Response:
        return error_response(protocol.error_body(exc.code, exc.message), exc, request_id)
