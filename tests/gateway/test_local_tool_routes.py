"""Tool calling on a local target through a real `sipp-gateway serve`: Qwen2.5-Coder 0.5B
(a template that renders tools) behind both wire formats, driven by the official SDKs
through a full tool loop, streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import jsonschema
import openai
import pytest

from .test_server import TOKEN, Gateway, running_gateway
from .test_tool_routes import WEATHER

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMETERS = WEATHER["function"]["parameters"]  # type: ignore[index]
# One forced call of get_weather, greedy: the same request streamed and not.
FORCED: dict[str, Any] = {
    "model": "local",
    "messages": ASK,
    "tools": [WEATHER],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "max_tokens": 60,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def gateway(qwen_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    def edit(toml: str) -> str:
        toml = toml.replace("max_request_bytes = 4096", "max_request_bytes = 65536")
        return toml.replace("n_ctx = 512", "n_ctx = 2048")

    with running_gateway(qwen_path, tmp_path_factory.mktemp("local-tools"), edit) as gw:
        yield gw


@pytest.fixture()
def oa(gateway: Gateway) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=gateway.public + "/v1", api_key=TOKEN, max_retries=0, timeout=300)
    yield c
    c.close()


def test_openai_sdk_tool_loop_on_a_local_target(oa: openai.OpenAI) -> None:
    first = oa.chat.completions.create(**FORCED)  # type: ignore[call-overload]
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls  # type: ignore[misc]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)

    with oa.chat.completions.stream(**FORCED) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls  # type: ignore[misc]
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )

    answer = oa.chat.completions.create(
        model="local",
        messages=[
            *ASK,
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 18}'},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=30,
        temperature=0,
    )
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_anthropic_sdk_tool_use_on_a_local_target(gateway: Gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.public, api_key=TOKEN, max_retries=0, timeout=300)
    tool = {"name": "get_weather", "description": "Current weather", "input_schema": PARAMETERS}
    message = client.messages.create(
        model="local",
        max_tokens=60,
        messages=ASK,
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use"
    [use] = [b for b in message.content if b.type == "tool_use"]
    jsonschema.validate(use.input, PARAMETERS)  # type: ignore[union-attr]
    client.close()
