"""A widely used framework end to end through the gateway: LangChain's `ChatOpenAI` (on the
official `openai` SDK) with `bind_tools` through a full tool loop, streamed too, and
`with_structured_output` on a local target, where the schema becomes a grammar."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from .test_server import TOKEN, Gateway
from .test_tool_routes import ANSWER, _openai
from .upstreams import CountingUpstream, provider_gateway


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return '{"temp_c": 18}'


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingUpstream]:
    with CountingUpstream(_openai) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    smollm_path: Path, tmp_path_factory: pytest.TempPathFactory, upstream: CountingUpstream
) -> Iterator[Gateway]:
    with provider_gateway(
        smollm_path, tmp_path_factory.mktemp("langchain"), upstream, {"up": "up-model"}
    ) as gw:
        yield gw


def _chat(gateway: Gateway, model: str, **kwargs: Any) -> ChatOpenAI:
    return ChatOpenAI(
        model=model,
        base_url=gateway.public + "/v1",
        api_key=TOKEN,  # type: ignore[arg-type]
        max_retries=0,
        timeout=120,
        **kwargs,
    )


def test_bind_tools_through_a_full_loop(gateway: Gateway, upstream: CountingUpstream) -> None:
    llm = _chat(gateway, "up").bind_tools([get_weather])
    question = HumanMessage("What is the weather in Paris?")
    called = llm.invoke([question])
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [  # type: ignore[attr-defined]
        ("get_weather", {"city": "Paris"})
    ]
    sent = upstream.calls("/chat/completions")[-1].json()
    assert sent["tools"][0]["function"]["name"] == "get_weather"

    call = called.tool_calls[0]  # type: ignore[attr-defined]
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answered = llm.invoke([question, called, result])
    assert answered.content == ANSWER

    merged: AIMessageChunk | None = None
    for chunk in llm.stream([question]):
        merged = chunk if merged is None else merged + chunk  # type: ignore[assignment]
    assert merged is not None
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_with_structured_output_on_a_local_target(gateway: Gateway) -> None:
    class Fruit(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=20)
        sweet: bool

    llm = _chat(gateway, "local", temperature=0, max_completion_tokens=60)
    fruit = llm.with_structured_output(Fruit).invoke("Name one fruit and say if it is sweet.")
    assert isinstance(fruit, Fruit)
