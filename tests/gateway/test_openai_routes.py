"""The gateway's OpenAI-compatible routes, driven by the official `openai` package."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from sipp import LocalEmbedOptions, LocalModelDescriptor, SippClient, SippTextOptions, models

from .test_server import LIMITED, TOKEN, Gateway, running_gateway

EMBED_TARGET = """
[[targets]]
name = "minilm"
type = "local"
model = "{path}"
backend = "cpu"
stats = "off"

[targets.runtime.context]
n_ctx = 256
embeddings = true
pooling = "mean"
"""


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    minilm = models.pull("all-minilm-l6-v2", verify=False)

    def with_embedder(toml: str) -> str:
        return toml + EMBED_TARGET.format(path=minilm)

    with running_gateway(smollm_path, tmp_path_factory.mktemp("oa"), with_embedder) as gw:
        yield gw


@pytest.fixture()
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0)
    yield c
    c.close()


def test_chat_completions_match_the_library(client: openai.OpenAI, smollm_path: Path) -> None:
    completion = client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Name a fruit."}],
        max_tokens=12,
        temperature=0,
    )
    with SippClient() as sipp:
        ref = sipp.add("l", LocalModelDescriptor(smollm_path))
        direct = sipp.chat(
            [{"role": "user", "content": "Name a fruit."}],
            endpoint=ref,
            options=SippTextOptions(max_tokens=12, temperature=0),
        ).result()
    assert completion.choices[0].message.content == direct.text
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert (
        completion.usage is not None
        and completion.usage.completion_tokens == direct.usage.output_tokens
    )  # type: ignore[union-attr]


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="local",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 8


def test_completions_and_models(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model="local", prompt="The sky is", max_tokens=5, temperature=0
    )
    assert completion.choices[0].text and completion.usage is not None
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="local", prompt="The sky is", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text
    assert sorted(m.id for m in client.models.list()) == ["local", "minilm", "mock-openai"]


def test_provider_target_through_openai_routes(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="mock-openai", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.choices[0].message.content == "from the provider"


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    # The openai client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(
        model="minilm", input=["turn on dark mode", "turn off dark mode"]
    )
    floats = client.embeddings.create(
        model="minilm", input="turn on dark mode", encoding_format="float"
    )
    assert len(default.data) == 2 and len(default.data[0].embedding) == 384
    assert (
        max(abs(a - b) for a, b in zip(default.data[0].embedding, floats.data[0].embedding)) < 1e-6
    )
    with SippClient() as sipp:
        ref = sipp.add(
            "m", LocalModelDescriptor(models.cached_path("all-minilm-l6-v2"), _embed_config())
        )
        direct = (
            sipp.embed("turn on dark mode", endpoint=ref, local=LocalEmbedOptions()).result().values
        )
    assert max(abs(a - b) for a, b in zip(direct, floats.data[0].embedding)) < 1e-4


def _embed_config():  # type: ignore[no-untyped-def]
    from sipp import ContextRuntimeConfig, NativeRuntimeConfig

    return NativeRuntimeConfig(
        context=ContextRuntimeConfig(n_ctx=256, embeddings=True, pooling="mean")
    )


def test_openai_errors_map_to_openai_exceptions(gateway: Gateway) -> None:
    bad = openai.OpenAI(base_url=gateway.public + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="local", messages=[{"role": "user", "content": "x"}])
    limited = openai.OpenAI(base_url=gateway.public + "/v1", api_key=LIMITED, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        limited.chat.completions.create(
            model="mock-openai", messages=[{"role": "user", "content": "x"}]
        )
    assert [m.id for m in limited.models.list()] == ["local"]
    good = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="service_tier"):
        good.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "x"}], service_tier="flex"
        )
    r = httpx.post(
        f"{gateway.public}/v1/chat/completions",
        content=b"{",
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_request_ids_are_echoed_only_when_well_formed(gateway: Gateway) -> None:
    def post(request_id: str) -> httpx.Response:
        return httpx.post(
            f"{gateway.public}/v1/completions",
            json={"model": "local", "prompt": "Hi", "max_tokens": 1},
            headers={"authorization": f"Bearer {TOKEN}", "x-request-id": request_id},
            timeout=60,
        )

    assert post("trace-42").headers["x-request-id"] == "trace-42"
    odd = post("has spaces\tand tabs" + "x" * 200)
    assert odd.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", odd.headers["x-request-id"])
    assert odd.json()["id"] == "cmpl-" + odd.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "chat/completions",
            b'{"model":"local","messages":[{"role":"user","content":"a \\ud800"}]}',
        ),
        ("completions", b'{"model":"local","prompt":"a \\ud800","max_tokens":2}'),
        ("embeddings", b'{"model":"minilm","input":"a \\ud800"}'),
    ],
)
def test_a_lone_surrogate_is_a_bad_request(gateway: Gateway, path: str, body: bytes) -> None:
    # JSON's \u escapes carry it into a Python str; UTF-8, and so the tokenizer, refuse it.
    r = httpx.post(
        f"{gateway.public}/v1/{path}",
        content=body,
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "not valid Unicode" in r.json()["error"]["message"]
