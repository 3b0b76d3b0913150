"""Your own gateway route, built from `sipp.protocol` in Starlette.

The application owns everything a library should not: routes, auth, limits,
which targets exist. The library supplies the endpoint (here a local GGUF)
and the wire profile: decode the body, run the request, encode the answer.
Any `GatewayDescriptor` client (or curl) can talk to it.

    pip install "sipppy[local,server]"
    python examples/custom_gateway.py MODEL.gguf --port 8787
    curl -sS localhost:8787/v1/query -d '{"model":"local","prompt":"Hello","max_tokens":16}'
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sipp import (
    AsyncSippClient,
    EndpointNotFoundError,
    EndpointRef,
    LocalModelDescriptor,
    PayloadTooLargeError,
    SippError,
    protocol,
)
from sipp.protocol.streaming import SSE_HEADERS, text_stream_frames_async

MAX_BODY_BYTES = 1 << 20


def build_app(model_path: str, target: str = "local") -> Starlette:
    client = AsyncSippClient()
    targets: dict[str, EndpointRef] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        targets[target] = await client.add(target, LocalModelDescriptor(model_path))
        yield
        await client.close()

    def error(exc: SippError) -> JSONResponse:
        return JSONResponse(
            protocol.error_body(exc.code, exc.message), status_code=protocol.status_for(exc)
        )

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():  # counted as received, chunked bodies included
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise PayloadTooLargeError(f"request body exceeds {MAX_BODY_BYTES} bytes")
        return bytes(body)

    def resolve(name: str) -> EndpointRef:
        if name not in targets:
            raise EndpointNotFoundError(f"unknown target {name!r}")
        return targets[name]

    async def text_route(request: Request) -> Response:
        try:
            body = await read_body(request)
            decode = (
                protocol.decode_query_body
                if request.url.path.endswith("query")
                else protocol.decode_chat_body
            )
            req = decode(body)
            endpoint = resolve(req.target)
            if req.operation == "query":
                assert req.prompt is not None
                run = client.query(
                    req.prompt, endpoint=endpoint, options=req.options, emit_tokens=req.stream
                )
            else:
                assert req.messages is not None
                run = client.chat(
                    req.messages, endpoint=endpoint, options=req.options, emit_tokens=req.stream
                )
            if req.stream:
                return StreamingResponse(text_stream_frames_async(run), headers=SSE_HEADERS)
            return JSONResponse(protocol.text_response_body(req.target, await run))
        except SippError as exc:
            return error(exc)

    async def embed_route(request: Request) -> Response:
        try:
            req = protocol.decode_embed_body(await read_body(request))
            response = await client.embed(req.input, endpoint=resolve(req.target))
            return JSONResponse(protocol.embedding_response_body(req.target, response))
        except SippError as exc:
            return error(exc)

    routes = [
        Route("/v1/query", text_route, methods=["POST"]),
        Route("/v1/chat", text_route, methods=["POST"]),
        Route("/v1/embed", embed_route, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--target", default="local")
    args = parser.parse_args()
    uvicorn.run(build_app(args.model, args.target), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
