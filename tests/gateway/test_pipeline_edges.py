"""Edges of the request pipeline: what is refused before admission, how a stream that
fails is recorded, choices that die, hostile JSON on every route, clients gone before
their body arrived, and tool-call streams a format cannot express."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from sipp import SippTextResponse, TokenBatch, ToolCallDelta
from sipp._errors import ExecutionError, InvalidRequestError, SippError
from sipp.gateway.activity import RequestRecord
from sipp.gateway.call import _merged
from sipp.gateway.config import parse_config
from sipp.gateway.config import tomllib as toml
from sipp.gateway.formats.anthropic import AnthropicFormat
from sipp.gateway.formats.anthropic_tools import BlockStream
from sipp.gateway.formats.base import WireFormat
from sipp.gateway.formats.native import NativeFormat
from sipp.gateway.formats.openai import OpenAIFormat
from sipp.gateway.formats.openai_responses import OpenAIResponsesFormat
from sipp.gateway.joined import joined
from sipp.gateway.request import ChoiceDone

from ..remote.loopback import Action, Request, Sleep, sse_reply
from .test_server import TOKEN, Gateway, _config
from .upstreams import CountingUpstream, poll, provider_gateway, text_reply

AUTH = {"authorization": f"Bearer {TOKEN}"}
ASK = [{"role": "user", "content": "hi"}]
ROUTES = {
    "/v1/chat/completions": AUTH,
    "/v1/completions": AUTH,
    "/v1/embeddings": AUTH,
    "/v1/responses": AUTH,
    "/v1/messages": {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
    "/v1/query": AUTH,
    "/v1/chat": AUTH,
    "/v1/embed": AUTH,
}


def _upstream(req: Request) -> list[Action]:
    """Streams for seed 1001 fail after their first chunk; `stall` models stall a minute."""
    body = req.json()
    if body.get("model") == "stall":
        first = {"id": "c", "object": "chunk", "created": 1, "model": "m", "choices": []}
        return [*sse_reply([b"data: " + json.dumps(first).encode() + b"\n\n"]), Sleep(60)]
    if body.get("seed") == 1001 and body.get("stream"):
        chunk = {
            "id": "c",
            "object": "chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
        }
        return sse_reply([b"data: " + json.dumps(chunk).encode() + b"\n\n", b"data: {broken\n\n"])
    return text_reply(req)


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_upstream) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    def one_permit(toml: str) -> str:
        toml = toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 1")
        return toml.replace("max_request_bytes = 65536", "max_request_bytes = 1048576")

    targets = {"up": "up-model", "slow": "stall"}
    directory = tmp_path_factory.mktemp("edges")
    with provider_gateway(smollm_path, directory, upstream, targets, one_permit) as gw:
        yield gw
    assert "unexpected error serving" not in gw.stderr


def test_a_field_the_target_cannot_honour_is_400_even_when_admission_is_full(
    gateway: Gateway,
) -> None:
    body = {"model": "slow", "messages": ASK, "stream": True}
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", f"{gateway.public}/v1/chat/completions", json=body, headers=AUTH
        ) as held,
    ):
        assert held.status_code == 200  # holds the only admission permit
        refused = client.post(
            f"{gateway.public}/v1/chat/completions",
            json={"model": "up", "messages": ASK, "logprobs": True},
            headers=AUTH,
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        busy = client.post(
            f"{gateway.public}/v1/chat/completions",
            json={"model": "up", "messages": ASK},
            headers=AUTH,
        )
        assert busy.status_code == 429
    poll(lambda: gateway.metric("sipp_gateway_in_flight_requests") == 0, "permit released")


def test_a_choice_that_fails_mid_stream_is_recorded_as_its_failure(gateway: Gateway) -> None:
    before = (
        gateway.metric("sipp_gateway_errors_total", '{code="upstream",operation="chat"}'),
        gateway.metric("sipp_gateway_errors_total", '{code="client_closed",operation="chat"}'),
    )
    r = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        json={"model": "up", "messages": ASK, "stream": True, "n": 2, "seed": 1000},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200 and '"code": "upstream"' in r.text  # the error frame
    poll(
        lambda: (
            gateway.metric("sipp_gateway_errors_total", '{code="upstream",operation="chat"}')
            == before[0] + 1
        ),
        "the stream recorded as an upstream failure",
    )
    after = gateway.metric("sipp_gateway_errors_total", '{code="client_closed",operation="chat"}')
    assert after == before[1]


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_hostile_json_is_a_400_on_every_route(gateway: Gateway, route: str) -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"model": NaN}', b'{"model": Infinity}'):
        r = httpx.post(f"{gateway.public}{route}", content=body, headers=ROUTES[route], timeout=60)
        assert r.status_code == 400, (route, r.text[:200])


@pytest.mark.parametrize(
    "route, body",
    [
        (
            "/v1/chat/completions",
            {
                "model": "up",
                "messages": ASK,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "number", "maximum": "NAN"}},
                },
            },
        ),
        (
            "/v1/responses",
            {
                "model": "up",
                "input": "hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": "DEEP"}},
            },
        ),
        (
            "/v1/messages",
            {
                "model": "up",
                "max_tokens": 5,
                "messages": ASK,
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": ["f"]},
            },
        ),
    ],
)
def test_schemas_and_names_that_cannot_be_used_are_400(
    gateway: Gateway, upstream: CountingUpstream, route: str, body: dict[str, Any]
) -> None:
    text = json.dumps(body).replace('"NAN"', "NaN")
    deep: Any = {"type": "object"}
    for _ in range(100):
        deep = {"type": "object", "properties": {"a": deep}}
    text = text.replace('"DEEP"', json.dumps(deep))
    before = len(upstream.requests)
    r = httpx.post(f"{gateway.public}{route}", content=text, headers=ROUTES[route], timeout=60)
    assert r.status_code == 400, r.text
    assert len(upstream.requests) == before


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "up", "\\udfff": 1}',  # a field's name: echoed by the 400 that names it
        b'{"model": "up", "metadata": {"k": "\\udfff"}}',  # echoed by /v1/responses' answer
    ],
)
def test_a_lone_surrogate_anywhere_in_a_body_is_the_formats_400(
    gateway: Gateway, route: str, body: bytes
) -> None:
    # A JSON escape puts a lone surrogate in a str; echoed back, no UTF-8 encoder can
    # write it, and the response failed as a 500 (in the error handler, or after the run).
    r = httpx.post(f"{gateway.public}{route}", content=body, headers=ROUTES[route], timeout=60)
    assert r.status_code == 400, (route, r.text[:200])
    assert r.headers["content-type"] == "application/json"
    assert "not valid Unicode" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "fmt",
    [
        OpenAIFormat("chat"),
        AnthropicFormat(),
        OpenAIResponsesFormat(),
        NativeFormat("chat"),
    ],
)
def test_error_frames_and_bodies_replace_lone_surrogates(fmt: WireFormat) -> None:
    def shown(payload: str) -> str:  # the JSON's text, escapes decoded
        return json.dumps(json.loads(payload), ensure_ascii=False)

    exc = InvalidRequestError("field '\udfff' is not a known field", field="\udfff")
    frame = fmt.stream_error(exc).decode()  # strict UTF-8
    assert "\ufffd" in shown(frame.split("data: ", 1)[1].split("\n", 1)[0])
    assert "\ufffd" in shown(bytes(fmt.error(exc, "r1").body).decode())


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_number_past_a_doubles_range_is_a_400_on_every_route(
    gateway: Gateway, route: str
) -> None:
    for number in (b"1e400", b"-1e400", b"1" + b"0" * 400):
        body = b'{"model": "up", "x": ' + number + b"}"
        r = httpx.post(f"{gateway.public}{route}", content=body, headers=ROUTES[route], timeout=60)
        assert r.status_code == 400, (route, r.text[:200])
        assert "number out of range" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "field",
    [
        '"text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA}}',
        '"tools": [{"type": "function", "name": "f", "parameters": SCHEMA}]',
    ],
)
def test_responses_refuses_an_infinite_number_before_it_runs(
    gateway: Gateway, upstream: CountingUpstream, field: str, stream: bool
) -> None:
    # The Response object echoes these fields: infinity there made the answer a 500
    # after the generation ran, and a stream carried `Infinity`, which is not JSON.
    schema = '{"type": "object", "properties": {"a": {"type": "number", "maximum": 1e400}}}'
    head = f'{{"model": "up", "input": "hi", "stream": {json.dumps(stream)}, '
    body = head + field.replace("SCHEMA", schema) + "}"
    before = len(upstream.requests)
    r = httpx.post(f"{gateway.public}/v1/responses", content=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text[:300]
    assert r.json()["error"]["code"] == "invalid_request"
    assert len(upstream.requests) == before


def test_a_client_gone_before_its_body_arrived_is_client_closed(gateway: Gateway) -> None:
    def errors(code: str) -> float:
        return gateway.metric("sipp_gateway_errors_total", f'{{code="{code}",operation="chat"}}')

    before = errors("client_closed"), errors("execution")
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    port = int(gateway.public.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head.encode() + b'{"model": "up",')  # then hang up mid-body
        time.sleep(0.5)  # the gateway is waiting for the rest of the body
    poll(lambda: errors("client_closed") == before[0] + 1, "the hang-up recorded")
    assert errors("execution") == before[1]  # not an internal failure (and no traceback)


@pytest.mark.parametrize(
    ("route", "body", "field", "most"),
    [
        ("/v1/chat/completions", {"model": "up", "messages": ASK}, "stop", 4),
        ("/v1/completions", {"model": "up", "prompt": "hi"}, "stop", 4),
        ("/v1/messages", {"model": "up", "max_tokens": 5, "messages": ASK}, "stop_sequences", 16),
        ("/v1/chat", {"model": "up", "messages": ASK}, "stop", 16),
        ("/v1/query", {"model": "up", "prompt": "hi"}, "stop", 16),
    ],
)
def test_stop_strings_are_capped_in_number_and_length(
    gateway: Gateway,
    upstream: CountingUpstream,
    route: str,
    body: dict[str, Any],
    field: str,
    most: int,
) -> None:
    # The engine checks every stop string after every token of every request it decodes.
    def post(stops: list[str]) -> httpx.Response:
        return httpx.post(
            f"{gateway.public}{route}",
            json={**body, field: stops},
            headers=ROUTES[route],
            timeout=60,
        )

    stops = [f"<{i}>" for i in range(most + 1)]
    assert post(stops[:most]).status_code == 200
    assert post(["x" * 1000]).status_code == 200
    before = len(upstream.requests)
    for refused in (stops, ["x" * 1001]):
        r = post(refused)
        assert r.status_code == 400, r.text[:200]
        assert field in r.json()["error"]["message"]
        if "param" in r.json()["error"]:  # OpenAI's envelope names it there too
            assert r.json()["error"]["param"] == field
    assert len(upstream.requests) == before


def test_n_costs_one_rate_limit_token_per_choice() -> None:
    config = parse_config(toml.loads(_config(Path("m.gguf"), "http://127.0.0.1:9", 1, 2)))
    req = OpenAIFormat("chat").decode(
        json.dumps({"model": "m", "messages": ASK, "n": 3}).encode(), Headers(), config
    )
    assert req.cost == 3 and req.generation.n == 3


def test_a_choice_that_dies_of_a_non_sipp_error_ends_the_merge() -> None:
    class Run:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        @property
        def done(self) -> bool:
            return True

        def cancel(self, reason: str | None = None) -> None:
            pass

        async def result(self) -> SippTextResponse:
            return SippTextResponse("ok", "stop")

        async def __aiter__(self) -> AsyncIterator[TokenBatch]:
            if self.fail:
                raise RuntimeError("bug in a run")
            yield TokenBatch("ok")

        def joined(self) -> AsyncIterator[TokenBatch]:  # as HeldRun's, nothing ever queued
            return joined(aiter(self), lambda: False)

    async def consume() -> list[Any]:
        rec = RequestRecord("chat", lambda r: None)
        seen: list[Any] = []
        with pytest.raises(ExecutionError, match="RuntimeError"):
            async for event in _merged(rec, [Run(False), Run(True)]):  # type: ignore[list-item]
                seen.append(event)
        return seen

    seen = asyncio.run(asyncio.wait_for(consume(), 30))
    assert not any(isinstance(e, ChoiceDone) and e.index == 1 for e in seen)


def test_anthropic_stream_refuses_a_tool_call_resumed_after_another_began() -> None:
    blocks = BlockStream()
    list(blocks.call(ToolCallDelta(0, "call_a", "f", '{"x":')))
    list(blocks.call(ToolCallDelta(1, "call_b", "g", "{}")))
    with pytest.raises(SippError, match="resumed tool call 0"):
        list(blocks.call(ToolCallDelta(0, arguments="1}")))
