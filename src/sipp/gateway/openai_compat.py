"""OpenAI-compatible routes on the public listener, so the official `openai` client
and OpenAI-compatible tools can use a Sipp gateway unchanged.

`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` (float or base64) and
`/v1/models`, with the same bearer tokens, allowlists, limits and metrics as the
first-party routes. Errors use OpenAI's envelope (`{"error": {"message", "type",
"param", "code"}}`) with the same statuses, so OpenAI clients raise their usual
exception classes.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import protocol
from .._descriptors import EndpointRef
from .._errors import InvalidRequestError, SippError
from .._runs import AsyncTextRun
from .._types import ChatMessage, ChatRole, SippTextOptions, SippTextResponse
from .activity import RequestRecord
from .app import (
    GatewayState,
    PublicCall,
    _release,
    check_client,
    error_headers,
    for_caller,
    serve_public,
    settle,
    unless_disconnected,
)
from .embed_batch import embed_all

__all__ = ["OPENAI_ROUTES", "openai_routes"]

OPENAI_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models")

_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
}
_CHAT = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETIONS = _COMMON | {"prompt"}
_EMBEDDINGS = {"model", "input", "encoding_format", "user"}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
}


def _openai_error(exc: SippError, request_id: str) -> JSONResponse:
    status = protocol.status_for(exc)
    body = {
        "error": {
            "message": exc.message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": getattr(exc, "field", None),
            "code": exc.code,
        }
    }
    return JSONResponse(body, status_code=status, headers=error_headers(exc, request_id))


def _object(body: bytes, allowed: set[str]) -> dict[str, Any]:
    try:
        obj = json.loads(body)
    except ValueError:
        raise InvalidRequestError("request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidRequestError("request body must be a JSON object")
    for key in obj:
        if key not in allowed:
            raise _field_error(key, f"'{key}' is not supported by this gateway")
    if obj.get("n", 1) != 1:
        raise InvalidRequestError("only n=1 is supported")
    if not isinstance(obj.get("model"), str) or not obj["model"]:
        raise InvalidRequestError("'model' is required (the gateway target name)")
    return obj


def _options(obj: dict[str, Any], max_key: str = "max_tokens") -> SippTextOptions:
    max_tokens = obj.get(max_key, obj.get("max_tokens"))
    stop = obj.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequestError("'stop' must be a string or an array of strings")
    return SippTextOptions(
        max_tokens=max_tokens, temperature=obj.get("temperature"), top_p=obj.get("top_p"), stop=stop
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(f"{where}: only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidRequestError(f"{where}: content must be a string or an array of text parts")


def _messages(raw: Any) -> list[ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object")
        role: ChatRole = "system"
        if m.get("role") in ("user", "assistant"):
            role = m["role"]
        elif m.get("role") not in ("system", "developer"):
            raise InvalidRequestError(
                f"messages[{i}].role must be system, developer, user or assistant"
            )
        out.append(ChatMessage(role, _content(m.get("content"), f"messages[{i}]")))
    return out


def _usage(response: SippTextResponse) -> dict[str, int] | None:
    if response.usage is None:
        return None
    u = response.usage
    return {
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
    }


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _stream_flags(obj: dict[str, Any]) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`), both checked before anything runs."""
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _field_error("stream", "'stream' must be true or false")
    options = obj.get("stream_options")
    if options is None:
        return bool(stream), False
    if not isinstance(options, dict) or not set(options) <= {"include_usage"}:
        raise _field_error(
            "stream_options", "'stream_options' must be an object with only 'include_usage'"
        )
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _field_error("stream_options", "'stream_options.include_usage' must be a boolean")
    return bool(stream), include_usage


def _field_error(name: str, message: str) -> InvalidRequestError:
    error = InvalidRequestError(message)
    error.field = name  # type: ignore[attr-defined]
    return error


def _prompt(obj: dict[str, Any]) -> str:
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequestError("'prompt' must be a string (or an array of one string)")
    return prompt


def _inputs(obj: dict[str, Any], cap: int) -> list[str]:
    inputs = obj.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise _field_error("input", "'input' must be a string or an array of strings")
    if len(inputs) > cap:
        raise _field_error(
            "input",
            f"'input' has {len(inputs)} items; this gateway takes at most {cap} per request "
            "([limits] max_embedding_inputs)",
        )
    return inputs


# Decoded and fully validated body -> the work that starts runs. Everything that can
# reject a body runs before the target is admitted, so no run starts for a bad request.
Work = Callable[[EndpointRef, PublicCall], Awaitable[Response]]


def openai_routes(state: GatewayState) -> list[Route]:
    Prepare = Callable[[dict[str, Any], PublicCall], Work]

    async def run_route(
        request: Request, operation: str, prepare: Prepare, allowed: set[str]
    ) -> Response:
        async def admitted(call: PublicCall) -> Response:
            caller, body = await call.open()
            obj = _object(body, allowed)
            work = prepare(obj, call)
            return await work(call.admit(caller, obj["model"]), call)

        return await serve_public(PublicCall(state, request, operation), admitted, _openai_error)

    def text_work(kind: str) -> Prepare:
        def prepare(obj: dict[str, Any], _: PublicCall) -> Work:
            target = obj["model"]
            stream, include_usage = _stream_flags(obj)
            if kind == "chat":
                messages = _messages(obj.get("messages"))
                options = _options(obj, "max_completion_tokens")
            else:
                prompt = _prompt(obj)
                options = _options(obj)

            async def work(ref: EndpointRef, call: PublicCall) -> Response:
                if kind == "chat":
                    run = state.client.chat(
                        messages, endpoint=ref, options=options, emit_tokens=stream
                    )
                else:
                    run = state.client.query(
                        prompt, endpoint=ref, options=options, emit_tokens=stream
                    )
                call.track(run)
                request_id = call.request_id
                ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
                created = int(time.time())
                if stream:
                    await call.accepted(run)
                    rec = call.hand_over()
                    frames = _chunks(state, run, rec, kind, ident, created, target, include_usage)
                    return StreamingResponse(
                        frames,
                        media_type="text/event-stream",
                        headers={"x-request-id": request_id},
                    )
                response = await call.wait(run)
                choice: dict[str, Any] = {
                    "index": 0,
                    "finish_reason": _finish(response.finish_reason),
                    "logprobs": None,
                }
                if kind == "chat":
                    choice["message"] = {"role": "assistant", "content": response.text}
                else:
                    choice["text"] = response.text
                body = {
                    "id": ident,
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": created,
                    "model": target,
                    "choices": [choice],
                    "usage": _usage(response),
                }
                return JSONResponse(body, headers={"x-request-id": request_id})

            return work

        return prepare

    def embeddings_work(obj: dict[str, Any], call: PublicCall) -> Work:
        target = obj["model"]
        inputs = _inputs(obj, state.config.max_embedding_inputs)
        fmt = obj.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _field_error("encoding_format", "'encoding_format' must be float or base64")
        call.charge(len(inputs))

        async def work(ref: EndpointRef, call: PublicCall) -> Response:
            t0 = time.perf_counter()
            embeddings = await unless_disconnected(
                call.request, embed_all(state.client, ref, inputs, call.track)
            )
            data, tokens = [], 0
            for index, emb in enumerate(embeddings):
                tokens += emb.usage.input_tokens if emb.usage else 0
                vector: Any = emb.values
                if fmt == "base64":
                    vector = base64.b64encode(
                        struct.pack(f"<{len(emb.values)}f", *emb.values)
                    ).decode()
                data.append({"object": "embedding", "index": index, "embedding": vector})
            call.rec.waited = time.perf_counter() - t0
            call.rec.input_tokens += tokens
            body = {
                "object": "list",
                "data": data,
                "model": target,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
            return JSONResponse(body, headers={"x-request-id": call.request_id})

        return work

    async def chat_completions(request: Request) -> Response:
        return await run_route(request, "chat", text_work("chat"), _CHAT)

    async def completions(request: Request) -> Response:
        return await run_route(request, "query", text_work("completion"), _COMPLETIONS)

    async def embeddings(request: Request) -> Response:
        return await run_route(request, "embed", embeddings_work, _EMBEDDINGS)

    async def models(request: Request) -> Response:
        try:
            check_client(state, request)  # blocked addresses and rate limits, like every route
            caller = state.tokens.authenticate(request.headers.get("authorization"))
        except SippError as exc:
            return _openai_error(exc, uuid.uuid4().hex)
        data = [
            {"id": t.name, "object": "model", "created": 0, "owned_by": "sipp"}
            for t in state.config.targets
            if caller.may_use(t.name)
        ]
        return JSONResponse({"object": "list", "data": data})

    handlers = (chat_completions, completions, embeddings, models)
    return [
        Route(path, fn, methods=["GET" if fn is models else "POST"])
        for path, fn in zip(OPENAI_ROUTES, handlers)
    ]


async def _chunks(
    state: GatewayState,
    run: AsyncTextRun,
    rec: RequestRecord,
    kind: str,
    ident: str,
    created: int,
    target: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    obj_type = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {
            "id": ident,
            "object": obj_type,
            "created": created,
            "model": target,
            "choices": choices,
            **extra,
        }
        return (
            b"data: "
            + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
        )

    def piece(text: str | None, finish: str | None) -> dict[str, Any]:
        if kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    try:
        if kind == "chat":
            yield chunk(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        async for batch in run:
            rec.first_token()
            yield chunk([piece(batch.text, None)])
        response = await run.result()
        yield chunk([piece(None, _finish(response.finish_reason))])
        if include_usage:
            yield chunk([], usage=_usage(response))
        yield b"data: [DONE]\n\n"
    except SippError as raw:
        exc = for_caller(state, rec.target, raw)
        body = {
            "error": {
                "message": exc.message,
                "type": "server_error",
                "param": None,
                "code": exc.code,
            }
        }
        yield b"data: " + json.dumps(body).encode() + b"\n\n"
    finally:
        _release(state)
        await settle(rec, run)
        rec.finish()
        if not run.done:
            run.cancel("stream consumer went away")
