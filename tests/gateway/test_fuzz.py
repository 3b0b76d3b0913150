"""Fuzz the public routes of a live gateway with generated bodies: whatever arrives,
the answer is a 2xx or a 4xx with the error envelope; never a 5xx, never a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_server import TOKEN, Gateway, running_gateway

ROUTES = [
    "/v1/query",
    "/v1/chat",
    "/v1/embed",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
]
# Generation runs only against the loopback provider target, so valid bodies stay fast.
TARGETS = st.sampled_from(["mock-openai", "nope", "", "local "])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "robot", ""]),
            "content": st.one_of(st.text(max_size=20), values),
        }
    ),
    max_size=3,
)
field_names = st.sampled_from(
    [
        "prompt",
        "messages",
        "input",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "context_key",
        "grammar",
        "provider_options",
        "n",
        "encoding_format",
        "maxTokens",
        "stream_options",
        "x",
    ]
)
bodies = st.fixed_dictionaries(
    {"model": TARGETS},
    optional={
        "prompt": st.text(max_size=40),
        "messages": messages,
        "input": st.one_of(st.text(max_size=20), values),
    },
).flatmap(
    lambda base: st.dictionaries(field_names, values, max_size=3).map(
        lambda extra: {**base, **extra}
    )
)


@pytest.fixture(scope="module")
def gateway(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def roomy(toml: str) -> str:
        return toml.replace("max_concurrent_requests = 2", "max_concurrent_requests = 64")

    with running_gateway(smollm_path, tmp_path_factory.mktemp("fuzz"), roomy) as gw:
        yield gw
    assert "unexpected error serving" not in gw.stderr  # no request hit an internal failure


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and isinstance(error["code"], str)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(ROUTES), body=bodies)
def test_generated_json_bodies(gateway: Gateway, route: str, body: dict[str, Any]) -> None:
    with httpx.Client(timeout=30) as client:
        _check(
            client.post(
                f"{gateway.public}{route}",
                content=json.dumps(body),
                headers={"authorization": f"Bearer {TOKEN}"},
            )
        )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    route=st.sampled_from(ROUTES),
    raw=st.binary(max_size=200),
    auth=st.sampled_from([None, f"Bearer {TOKEN}", "Bearer", "bearer  x y", "Basic Zm9v"]),
)
def test_generated_raw_bytes_and_headers(
    gateway: Gateway, route: str, raw: bytes, auth: str | None
) -> None:
    headers = {"authorization": auth} if auth else {}
    with httpx.Client(timeout=30) as client:
        _check(client.post(f"{gateway.public}{route}", content=raw, headers=headers))
