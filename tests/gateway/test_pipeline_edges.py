"""Edges of the request pipeline: what is refused before admission, how a stream that
fails is recorded, choices that die, hostile JSON on every route, and tool-call streams
a format cannot express."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.datastructures import Headers

from sipp import SippTextResponse, TokenBatch, ToolCallDelta
from sipp._errors import ExecutionError, SippError
from sipp.gateway.activity import RequestRecord
from sipp.gateway.call import _merged
from sipp.gateway.config import parse_config
from sipp.gateway.config import tomllib as toml
from sipp.gateway.formats.anthropic_tools import BlockStream
from sipp.gateway.formats.openai import OpenAIFormat
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
