"""Prompt-token conditions count a local target's prompt exactly: the tokens of the chat
as the model's own template renders it, not the byte estimate used for remote targets."""

from __future__ import annotations

from pathlib import Path

import httpx

from .test_server import TOKEN, running_gateway

RULES = """
[[route_rules]]
name = "tiny-local"
match = "small"
max_prompt_tokens = 15
target = "local"

[[route_rules]]
name = "short-mock"
match = "small"
max_prompt_tokens = 15
target = "mock-openai"

[[route_rules]]
name = "fits-local"
match = "small"
max_prompt_tokens = 400
target = "local"

[[route_rules]]
name = "rest-mock"
match = "small"
target = "mock-openai"
"""


def test_local_prompt_is_counted_with_its_chat_template(smollm_path: Path, tmp_path: Path) -> None:
    with running_gateway(smollm_path, tmp_path, lambda toml: toml + RULES) as gw:
        body = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        headers = {"authorization": f"Bearer {TOKEN}"}
        response = httpx.post(
            f"{gw.public}/v1/chat/completions", json=body, headers=headers, timeout=300
        )
        assert response.status_code == 200, response.text
        # "hi" is 8 tokens by the remote estimate (3 + 4 + 1), but SmolLM2's template adds
        # its system prompt: well over 15 tokens for "local", so tiny-local does not hold,
        # while the same 15 for the remote "mock-openai" does
        assert response.headers["x-sipp-route"] == "short-mock"
        assert response.headers["x-sipp-target"] == "mock-openai"
        long = {**body, "messages": [{"role": "user", "content": "hello there " * 30}]}
        response = httpx.post(
            f"{gw.public}/v1/chat/completions", json=long, headers=headers, timeout=300
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-sipp-route"] == "fits-local"
        assert response.headers["x-sipp-target"] == "local"
