"""Nothing an OpenAI-compatible request does leaves work behind: every body is
validated before a run starts, and a run that started is cancelled on any failure.

Fuzzed against a live gateway whose provider target streams slowly (a leaked
upstream request stays open for a minute), checking after every example that
the in-flight gauge, the local engine's busy slots and the provider's open
requests all return to zero."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ..remote.loopback import Action, Request, Sleep, sse_reply
from .test_fuzz import values
from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import CountingUpstream, embeddings_reply, poll, text_reply

ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/responses",
]
AUTH = {"authorization": f"Bearer {TOKEN}"}
ANTHROPIC_AUTH = {"x-api-key": TOKEN, "anthropic-version": "2023-06-01"}
CHAT, HI = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
RESPONSES = "/v1/responses"


def _slow(req: Request) -> list[Action]:
    """Streams start at once, then stall for a minute: only a cancel ends them early."""
    if req.path.endswith("/embeddings"):
        return embeddings_reply(req)
    if not req.json().get("stream"):
        return text_reply(req)
    choice = {"index": 0, "delta": {"content": "hi"}, "text": "hi", "finish_reason": None}
    first = {"id": "c", "object": "chunk", "created": 1, "model": "m", "choices": [choice]}
    return [*sse_reply([b"data: " + json.dumps(first).encode() + b"\n\n"]), Sleep(60)]


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_slow) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    def slow_target(toml: str) -> str:
        toml = toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 64")
        return toml + (
            '\n[[targets]]\nname = "slow"\ntype = "openai_compatible"\nmodel = "m"\n'
            f'base_url = "{upstream.url}/v1"\ntoken_env = "TEST_PROVIDER_TOKEN"\n'
        )

    with running_gateway(smollm_path, tmp_path_factory.mktemp("cleanup"), slow_target) as gw:
        yield gw
    assert "unexpected error serving" not in gw.stderr


def _settled(gw: Gateway, upstream: CountingUpstream) -> None:
    """Every permit, engine slot and upstream request this test started is released."""
    poll(lambda: gw.metric("sipp_gateway_in_flight_requests") == 0, "in-flight permits")
    poll(lambda: gw.metric("sipp_local_busy_slots", '{target="local"}') == 0, "engine slots")
    poll(lambda: gw.metric("sipp_local_running", '{target="local"}') == 0, "engine runs")
    poll(lambda: upstream.open_requests == 0, "open upstream requests")


@pytest.mark.parametrize("target", ["slow", "local"])
@pytest.mark.parametrize("stream_options", [1, "yes", [], {"include_usage": "yes"}])
def test_a_bad_stream_options_starts_nothing(
    gateway: Gateway, upstream: CountingUpstream, target: str, stream_options: Any
) -> None:
    started = len(upstream.requests), gateway.metric("sipp_local_requests", '{target="local"}')
    r = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        json={
            "model": target,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 300,
            "stream": True,
            "stream_options": stream_options,
        },
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stream_options"
    assert started == (
        len(upstream.requests),
        gateway.metric("sipp_local_requests", '{target="local"}'),
    )
    _settled(gateway, upstream)


valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=12)}),
    min_size=1,
    max_size=2,
)
stream_options = st.one_of(
    st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), values)}),
    st.integers(),
    st.text(min_size=1, max_size=5),
    st.lists(values, min_size=1, max_size=2),
    values,
)
FUNCTION = {"type": "function", "name": "f", "parameters": {"type": "object"}}
# A valid body for the route, then up to three fields replaced with generated values.
mutated = st.sets(
    st.sampled_from(
        [
            *("messages", "prompt", "input", "stream", "max_tokens", "temperature", "stop"),
            *("n", "encoding_format", "user", "seed", "logit_bias", "logprobs"),
            *("top_logprobs", "presence_penalty", "frequency_penalty", "response_format"),
            *("metadata", "store", "system", "top_k", "output_config", "thinking"),
            *("instructions", "tools", "tool_choice", "parallel_tool_calls", "text"),
            *("max_output_tokens", "truncation", "include", "reasoning", "previous_response_id"),
        ]
    ),
    max_size=3,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    route = draw(st.sampled_from(ROUTES))
    body: dict[str, Any] = {"model": draw(st.sampled_from(["slow", "local", "nope"]))}
    if route == "/v1/embeddings":
        body["input"] = draw(st.one_of(st.text(max_size=10), st.lists(st.text(max_size=8))))
    elif route == RESPONSES:
        body["input"] = draw(st.one_of(st.text(min_size=1, max_size=20), valid_messages))
        body["stream"] = draw(st.booleans())
        body["max_output_tokens"] = draw(st.integers(1, 4))
        if draw(st.booleans()):
            body["tools"] = [dict(FUNCTION, name=draw(st.sampled_from(["f", "g"])))]
            body["tool_choice"] = draw(
                st.sampled_from(["auto", "required", {"type": "function", "name": "f"}])
            )
    else:
        if route in (CHAT, "/v1/messages"):
            body["messages"] = draw(valid_messages)
        else:
            body["prompt"] = draw(st.text(min_size=1, max_size=20))
        body["stream"] = draw(st.booleans())
        body["max_tokens"] = draw(st.integers(1, 4))
        if draw(st.booleans()):
            body["stream_options"] = draw(stream_options)
    for name in draw(mutated):
        body[name] = draw(values)
    key = "max_output_tokens" if route == RESPONSES else "max_tokens"
    limit = body.get(key)
    if body["model"] == "local" and (limit is None or (type(limit) is int and limit > 4)):
        body[key] = 4  # keep valid local generations short; invalid values stay
    return route, body


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(request=requests())
@example(request=(CHAT, {"model": "slow", "messages": HI, "stream": True, "stream_options": 1}))
@example(request=(CHAT, {"model": "local", "messages": HI, "stream": True, "stream_options": "x"}))
@example(request=(RESPONSES, {"model": "slow", "input": HI, "stream": True, "tools": [FUNCTION]}))
@example(request=(RESPONSES, {"model": "local", "input": [{"role": ["user"], "content": "x"}]}))
def test_fuzzed_openai_bodies_release_everything(
    gateway: Gateway, upstream: CountingUpstream, request: tuple[str, dict[str, Any]]
) -> None:
    route, body = request
    anthropic = route == "/v1/messages"
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST",
            f"{gateway.public}{route}",
            content=json.dumps(body),
            headers=ANTHROPIC_AUTH if anthropic else AUTH,
        ) as r,
    ):
        assert r.status_code < 500, r.read()
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            next(r.iter_raw())  # read the first frame, then hang up mid-stream
        else:
            r.read()
            if r.status_code >= 400:
                error = r.json()["error"]
                code = error["type"] if anthropic else error["code"]
                assert isinstance(error["message"], str) and isinstance(code, str)
    _settled(gateway, upstream)
