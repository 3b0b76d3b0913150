"""The exact cache on a local target (SmolLM2 through llama.cpp in a real `sipp-gateway
serve`): a hit replays the live greedy answer, streamed in the very token frames the
model produced, and `store_finish = ["stop", "length"]` keeps answers cut by max_tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from .test_server import TOKEN, Gateway, running_gateway
from .upstreams import poll


def _chat(gw: Gateway, stream: bool) -> httpx.Response:
    body = {
        "model": "local",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{gw.public}/v1/chat", json=body, headers=headers, timeout=300)


def _frames(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_a_local_answer_is_replayed_token_by_token(smollm_path: Path, tmp_path: Path) -> None:
    cache = f'[targets.cache]\npath = "{tmp_path / "cache"}"\nstore_finish = ["stop", "length"]\n'

    def edit(toml: str) -> str:
        return toml.replace('stats = "basic"\n', f'stats = "basic"\n{cache}', 1)

    with running_gateway(smollm_path, tmp_path, edit) as gw:
        live = _chat(gw, stream=True)
        assert live.status_code == 200 and live.headers["x-sipp-cache"] == "miss"
        poll(
            lambda: gw.metric("sipp_gateway_cache_entries", '{target="local"}') == 1,
            "the streamed answer stored",
            timeout=120,
        )
        generated = gw.metric("sipp_gateway_output_tokens_total", '{target="local"}')
        tokens = [f for f in _frames(live.text) if "sequence" in f]
        assert generated >= len(tokens) > 1
        replay = _chat(gw, stream=True)
        assert replay.headers["x-sipp-cache"] == "hit"
        assert [f for f in _frames(replay.text) if "sequence" in f] == tokens
        ending = _frames(live.text)[len(tokens) :]  # usage, then done
        assert ending and _frames(replay.text)[len(tokens) :] == ending
        answer = _chat(gw, stream=False)
        assert answer.headers["x-sipp-cache"] == "hit"
        assert answer.json()["text"] == "".join(f["text"] for f in tokens)
        assert answer.json()["finish_reason"] == "length"
        # neither hit ran the model
        assert gw.metric("sipp_gateway_output_tokens_total", '{target="local"}') == generated
