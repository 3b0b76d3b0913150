"""A provider target's failures reach gateway callers as 502 `upstream` with a
generic message (429 stays 429 with the provider's Retry-After): never the
provider's status, message or key. The details go to the log, keyed by target,
and to `sipp_gateway_upstream_errors_total{target,status}`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ..remote.loopback import Action, Request, json_reply, sse_reply
from .test_server import ENV, TOKEN, Gateway, running_gateway
from .upstreams import CountingUpstream, add_targets, text_reply

SECRET = ENV["TEST_PROVIDER_TOKEN"]
LEAKY = f"Incorrect API key provided: {SECRET}. Find your key at platform.example"
FAILURES: dict[str, tuple[int, str]] = {  # upstream model -> (status, provider message)
    "expired": (401, LEAKY),
    "forbidden": (403, f"project of key {SECRET} may not use this model"),
    "bad-config": (400, "The model `gpt-nope` does not exist or you do not have access to it"),
    "crashed": (500, "upstream worker 7 segfaulted"),
}
TARGETS = {f"t-{model}": model for model in [*FAILURES, "busy", "mid-stream"]}
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _provider(req: Request) -> list[Action]:
    model = req.json()["model"]
    if model in FAILURES:
        status, message = FAILURES[model]
        return json_reply({"error": {"message": message, "type": "x", "code": "x"}}, status)
    if model == "busy":
        body = {"error": {"message": f"quota of {SECRET} exceeded", "type": "requests"}}
        return json_reply(body, 429, {"retry-after": "7"})
    if req.json().get("stream"):  # mid-stream: some text, then an error event
        chunk = {"choices": [{"index": 0, "delta": {"content": "par"}}]}
        error = {"error": {"message": f"overloaded shard for key {SECRET}"}}
        return sse_reply([f"data: {json.dumps(c)}\n\n".encode() for c in (chunk, error)])
    return text_reply(req)


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with CountingUpstream(_provider) as upstream:

        def edit(toml: str) -> str:
            return add_targets(toml, upstream.url, TARGETS, "TEST_PROVIDER_TOKEN")

        with running_gateway(smollm_path, tmp_path_factory.mktemp("up"), edit) as gw:
            yield gw
    # The details stay with the operator: logged under the target (the key masked).
    for model, (status, message) in FAILURES.items():
        logged = message.replace(SECRET, "[redacted]")
        assert f"target t-{model}: upstream failure (status {status}" in gw.stderr
        assert logged in gw.stderr


def _no_leak(text: str) -> None:
    assert SECRET not in text
    for _, message in FAILURES.values():
        assert message not in text
    assert "HTTP 4" not in text and "HTTP 5" not in text


@pytest.fixture()
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0) as c:
        yield c


@pytest.mark.parametrize("model", list(FAILURES))
def test_openai_routes_answer_502_upstream(
    gateway: Gateway, client: openai.OpenAI, model: str
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=f"t-{model}", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 502
    body: Any = info.value.body
    assert body["code"] == "upstream" and body["type"] == "upstream_error"
    _no_leak(info.value.response.text)
    status = str(FAILURES[model][0])
    labels = f'{{status="{status}",target="t-{model}"}}'
    assert gateway.metric("sipp_gateway_upstream_errors_total", labels) >= 1


@pytest.mark.parametrize("model", list(FAILURES))
def test_native_routes_answer_502_upstream(gateway: Gateway, model: str) -> None:
    for route, body in [
        ("/v1/query", {"model": f"t-{model}", "prompt": "hi"}),
        ("/v1/chat", {"model": f"t-{model}", "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/embed", {"model": f"t-{model}", "input": "hi"}),
    ]:
        r = httpx.post(f"{gateway.public}{route}", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream", r.text
        _no_leak(r.text)


@pytest.mark.parametrize("model", ["expired", "crashed", "mid-stream"])
def test_streams_end_with_a_generic_error_event(gateway: Gateway, model: str) -> None:
    body = {"model": f"t-{model}", "prompt": "hi", "stream": True}
    native = httpx.post(f"{gateway.public}/v1/query", json=body, headers=AUTH, timeout=60)
    assert native.status_code == 200
    frames = native.text.strip().split("\n\n")
    assert frames[-1].startswith("event: error")
    error = json.loads(frames[-1].split("data: ", 1)[1])["error"]
    assert error["code"] == "upstream"
    _no_leak(native.text)
    openai_stream = httpx.post(
        f"{gateway.public}/v1/completions",
        json={**body, "model": body["model"]},
        headers=AUTH,
        timeout=60,
    )
    last = openai_stream.text.strip().split("\n\n")[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "upstream"
    _no_leak(openai_stream.text)


def test_upstream_429_stays_429_with_retry_after(gateway: Gateway, client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="t-busy", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after"] == "7"
    _no_leak(info.value.response.text)
    native = httpx.post(
        f"{gateway.public}/v1/query",
        json={"model": "t-busy", "prompt": "x"},
        headers=AUTH,
        timeout=60,
    )
    assert native.status_code == 429 and native.headers["retry-after"] == "7"
    assert native.json()["error"]["code"] == "rate_limited"
    assert SECRET not in native.text
