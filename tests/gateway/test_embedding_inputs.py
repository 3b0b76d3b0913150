"""`/v1/embeddings` with many inputs: capped per request, counted against the rate
limit input by input, one upstream call for a provider target, and no work left
running once the request failed or its client went away."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sipp import models

from ..remote.loopback import Action, Request, Sleep, json_reply
from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import CountingUpstream, add_targets, embeddings_reply, poll

AUTH = {"authorization": f"Bearer {TOKEN}"}
MINILM = """
[[targets]]
name = "minilm"
type = "local"
model = "{path}"
backend = "cpu"
stats = "basic"

[targets.runtime.context]
n_ctx = 256
n_parallel = 2
embeddings = true
pooling = "mean"
"""


def _provider(req: Request) -> list[Action]:
    if req.json()["model"] == "broken":
        return json_reply({"error": {"message": "boom", "type": "server_error"}}, 500)
    if req.json()["model"] == "stalled":  # headers, then a minute before the body
        status, body = embeddings_reply(req)
        return [status, Sleep(60), body]
    return embeddings_reply(req)


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_provider) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    minilm = models.pull("all-minilm-l6-v2", verify=False)

    def edit(toml: str) -> str:
        toml = toml.replace("max_request_bytes = 4096", "max_request_bytes = 4194304")
        toml = toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 16")
        toml = add_targets(
            toml,
            upstream.url,
            {"emb": "m", "emb-broken": "broken", "emb-stalled": "stalled"},
            "TEST_PROVIDER_TOKEN",
        )
        per_token = MINILM.replace('"minilm"', '"minilm-tokens"').replace('"mean"', '"none"')
        return toml + MINILM.format(path=minilm) + per_token.format(path=minilm)

    with running_gateway(smollm_path, tmp_path_factory.mktemp("emb"), edit) as gw:
        yield gw


def test_300_inputs_are_one_upstream_call(gateway: Gateway, upstream: CountingUpstream) -> None:
    before = len(upstream.calls("/embeddings"))
    with openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0) as client:
        result = client.embeddings.create(model="emb", input=[f"text {i}" for i in range(300)])
    calls = upstream.calls("/embeddings")[before:]
    assert len(calls) == 1 and calls[0].json()["input"] == [f"text {i}" for i in range(300)]
    assert [d.embedding[0] for d in result.data] == [float(i) for i in range(300)]
    assert [d.index for d in result.data] == list(range(300))
    assert result.usage.prompt_tokens == 300  # the batch's usage, counted once


def test_more_inputs_than_the_cap_is_a_400_naming_it(
    gateway: Gateway, upstream: CountingUpstream
) -> None:
    before = len(upstream.requests)
    with (
        openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0) as client,
        pytest.raises(openai.BadRequestError) as info,
    ):
        client.embeddings.create(model="emb", input=["x"] * 2049)
    assert "max_embedding_inputs" in str(info.value) and "2048" in str(info.value)
    assert len(upstream.requests) == before


def test_a_failing_batch_is_one_failed_call(gateway: Gateway, upstream: CountingUpstream) -> None:
    before = len(upstream.calls("/embeddings"))
    r = httpx.post(
        f"{gateway.public}/v1/embeddings",
        json={"model": "emb-broken", "input": [f"t{i}" for i in range(50)]},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream"
    assert len(upstream.calls("/embeddings")) - before == 1
    poll(lambda: upstream.open_requests == 0, "open upstream requests")
    poll(lambda: gateway.metric("sipp_gateway_in_flight_requests") == 0, "in-flight permits")


def test_a_client_that_goes_away_cancels_the_upstream_batch(
    gateway: Gateway, upstream: CountingUpstream
) -> None:
    before = len(upstream.calls("/embeddings"))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.public}/v1/embeddings",
            json={"model": "emb-stalled", "input": [f"t{i}" for i in range(100)]},
            headers=AUTH,
            timeout=httpx.Timeout(60, read=1),
        )
    poll(lambda: upstream.open_requests == 0, "open upstream requests")
    poll(lambda: gateway.metric("sipp_gateway_in_flight_requests") == 0, "in-flight permits")
    assert len(upstream.calls("/embeddings")) - before == 1


def test_a_client_that_goes_away_cancels_the_inputs_not_yet_embedded(gateway: Gateway) -> None:
    label = '{target="minilm"}'
    before = gateway.metric("sipp_local_requests", label)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # ~200 tokens
    inputs = [f"{i} {text}" for i in range(200)]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.public}/v1/embeddings",
            json={"model": "minilm", "input": inputs},
            headers=AUTH,
            timeout=httpx.Timeout(60, read=0.5),
        )
    poll(lambda: gateway.metric("sipp_gateway_in_flight_requests") == 0, "in-flight permits")
    poll(lambda: gateway.metric("sipp_local_busy_slots", label) == 0, "engine slots")
    poll(lambda: gateway.metric("sipp_local_queue_depth", label) == 0, "engine queue")
    started = gateway.metric("sipp_local_requests", label) - before
    assert 0 < started < len(inputs)  # the rest never started


def test_a_local_batch_embeds_every_input_in_order(gateway: Gateway) -> None:
    inputs = [f"sentence number {i}" for i in range(20)]
    with openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0) as client:
        batch = client.embeddings.create(model="minilm", input=inputs)
        singles = [client.embeddings.create(model="minilm", input=t) for t in inputs[:3]]
    assert len(batch.data) == 20
    for one, many in zip(singles, batch.data[:3]):
        # same input, same vector up to batched-decode rounding (the engine shares batches)
        a, b = one.data[0].embedding, many.embedding
        cosine = sum(x * y for x, y in zip(a, b)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )
        assert cosine > 0.999


def test_every_input_takes_a_rate_limit_token(smollm_path: Path, tmp_path: Path) -> None:
    def edit(toml: str) -> str:
        toml = toml.replace(
            "[security.rate_limit]\nenabled = false\nrequests_per_minute = 60\nburst = 60",
            "[security.rate_limit]\nenabled = true\nrequests_per_minute = 6\nburst = 10",
        )
        return add_targets(toml, upstream.url, {"emb": "m"}, "TEST_PROVIDER_TOKEN")

    with (
        CountingUpstream(_provider) as upstream,
        running_gateway(smollm_path, tmp_path, edit) as gw,
    ):

        def embed(n: int) -> httpx.Response:
            body = {"model": "emb", "input": ["x"] * n}
            return httpx.post(f"{gw.public}/v1/embeddings", json=body, headers=AUTH, timeout=60)

        too_many = embed(11)  # more than the whole burst: waiting cannot help
        assert too_many.status_code == 429 and "burst" in too_many.json()["error"]["message"]
        # (the refused request still took its first token on arrival: 9 left)
        assert embed(5).status_code == 200
        refused = embed(5)  # 4 tokens left
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        assert len(upstream.calls("/embeddings")) == 1
        assert gw.metric("sipp_gateway_rate_limited_total") == 2


def test_per_token_vectors_have_no_openai_form(gateway: Gateway) -> None:
    # Pooling 'none' gives a vector per token; flattened into one 'embedding', an
    # OpenAI client read a vector ten times too long without a word.
    with openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match="pooling"):
            client.embeddings.create(model="minilm-tokens", input="turn on dark mode")
        assert len(client.embeddings.create(model="minilm", input="x").data[0].embedding) == 384
