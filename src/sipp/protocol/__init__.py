"""The gateway wire profile as pure functions: no I/O, no web framework.

Build your own gateway route in any ASGI framework: decode the body, run the
request with a `SippClient`, encode the response (JSON or SSE frames).
"""

from .codec import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    DecodedEmbedRequest,
    DecodedTextRequest,
    chat_body,
    decode_chat_body,
    decode_embed_body,
    decode_query_body,
    done_frame,
    embed_body,
    embedding_response_body,
    error_frame,
    load_json_object,
    parse_embedding_response,
    parse_text_response,
    query_body,
    stop_problem,
    text_response_body,
    token_frame,
    usage_frame,
)
from .errors import (
    STATUS_BY_CODE,
    encodable,
    error_body,
    error_from_body,
    error_from_status,
    status_for,
)
from .sse import SSEDecoder, SSEEvent, encode_sse

__all__ = [
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "STATUS_BY_CODE",
    "DecodedEmbedRequest",
    "DecodedTextRequest",
    "SSEDecoder",
    "SSEEvent",
    "chat_body",
    "decode_chat_body",
    "decode_embed_body",
    "decode_query_body",
    "done_frame",
    "embed_body",
    "embedding_response_body",
    "encodable",
    "encode_sse",
    "error_body",
    "error_frame",
    "error_from_body",
    "error_from_status",
    "load_json_object",
    "parse_embedding_response",
    "parse_text_response",
    "query_body",
    "status_for",
    "stop_problem",
    "text_response_body",
    "token_frame",
    "usage_frame",
]
